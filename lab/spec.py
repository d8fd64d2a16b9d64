"""Experiment specs: frozen, validated, with errors that name the field and the allowed values."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from emulator.errors import SnaplabError
from emulator.migration.cow import WP_BACKENDS
from emulator.migration.engines import (
    LOAD_ALIASES,
    LOAD_ENGINES,
    SAVE_ENGINES,
    load_engine_names,
    save_engine_names,
)


def save_engines() -> tuple[str, ...]:
    """The save engines, from the registry (emulator/migration/engines); the first is QEMU's."""
    return save_engine_names()


def load_engines() -> tuple[str, ...]:
    """The load engines, from the registry; the first is QEMU's."""
    return load_engine_names()


def canonical_engine(name: str) -> str:
    """Today's name of an engine (a former name, in data recorded before a rename, maps to it)."""
    return LOAD_ALIASES.get(name, name)


def engine_title(name: str, kind: str = "save") -> str:
    """A few words that say what the engine does, for legends and widgets: of the save engine
    of that name (``kind`` "save"), or of the load engine ("load"); the two registries share
    names ("blocking"), so a name alone does not say which."""
    if kind == "load":
        return next((e.title for e in LOAD_ENGINES if e.name == canonical_engine(name)), name)
    return next((e.title for e in SAVE_ENGINES if e.name == name), name)


def guest_runs(engine: str) -> bool:
    """Whether the guest keeps running during most of a save with this engine."""
    return any(e.name == engine and e.guest_runs for e in SAVE_ENGINES)


def resumes_early(engine: str) -> bool:
    """Whether a load with this engine resumes the guest before RAM is all back."""
    return any(e.name == engine and e.resumes_early for e in LOAD_ENGINES)


def waits_for_complete(engine: str) -> bool:
    """Whether a load with this engine is ready after RESUME and fills the rest of RAM only
    once told to (``job-complete``)."""
    return any(e.name == engine and e.waits_for_complete for e in LOAD_ENGINES)


def write_protects(engine: str) -> bool:
    """Whether this save engine uses a write-protect backend (``wp_backend`` applies)."""
    return any(e.name == engine and e.write_protects for e in SAVE_ENGINES)


DEFAULT_ENGINE = next(e.name for e in SAVE_ENGINES if e.write_protects)  # an experiment's: copy-on-write


def compare_engines() -> tuple[str, ...]:
    """The main job's engines: QEMU's blocking save and every write-protecting (copy-on-write) one."""
    return tuple(e.name for i, e in enumerate(SAVE_ENGINES) if i == 0 or e.write_protects)

WORKLOADS = ("idle", "dirty", "disk", "mixed")
PATTERNS = ("sequential", "random", "hot-cold")


class SpecError(SnaplabError, ValueError):
    """A spec field is wrong; the message names it and what it accepts."""


@dataclass(frozen=True)
class ExperimentSpec:
    """One snapshot experiment: a guest, an engine, how often."""

    ram_mib: int = 256
    engine: str = DEFAULT_ENGINE
    workload: str = "dirty"
    dirty_rate_mib_s: int = 100  # 0 = unthrottled
    working_set_mib: int = 0  # 0 = half of RAM
    pattern: str = "random"
    seed: int = 1
    repetitions: int = 3
    wp_backend: str = "auto"  # auto, userfaultfd, unicorn-tlb (copy-on-write only)
    warmup_s: float = 0.3
    gap_s: float = 0.2

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, allowed: str) -> SpecError:
            return SpecError(f"spec field '{field}': {value!r} is not allowed; expected {allowed}")

        if self.engine not in save_engines():
            raise bad("engine", self.engine, ", ".join(save_engines()))
        if self.wp_backend not in WP_BACKENDS:
            raise bad("wp_backend", self.wp_backend, ", ".join(WP_BACKENDS))
        if self.workload not in WORKLOADS:
            raise bad("workload", self.workload, ", ".join(WORKLOADS))
        if self.pattern not in PATTERNS:
            raise bad("pattern", self.pattern, ", ".join(PATTERNS))
        for name in ("warmup_s", "gap_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 3600:
                raise bad(name, v, "seconds, a number from 0 to 3600")
        if isinstance(self.repetitions, bool) or isinstance(self.ram_mib, bool):
            raise bad("repetitions" if isinstance(self.repetitions, bool) else "ram_mib",
                      self.repetitions if isinstance(self.repetitions, bool) else self.ram_mib, "an integer")
        if not isinstance(self.ram_mib, int) or not 16 <= self.ram_mib <= 65536:
            raise bad("ram_mib", self.ram_mib, "an integer from 16 to 65536")
        if not isinstance(self.repetitions, int) or not 1 <= self.repetitions <= 1000:
            raise bad("repetitions", self.repetitions, "an integer from 1 to 1000")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise bad("seed", self.seed, "an integer from 0 to 2**64-1")
        if not isinstance(self.dirty_rate_mib_s, int) or self.dirty_rate_mib_s < 0:
            raise bad("dirty_rate_mib_s", self.dirty_rate_mib_s, "a non-negative integer (0: unthrottled)")
        if not isinstance(self.working_set_mib, int) or not 0 <= self.working_set_mib <= self.ram_mib:
            raise bad("working_set_mib", self.working_set_mib, f"an integer from 0 to ram_mib ({self.ram_mib})")

    def with_(self, **kw: Any) -> ExperimentSpec:
        return ExperimentSpec(**{**asdict(self), **kw})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentSpec:
        if not isinstance(d, dict):
            raise SpecError(f"a spec is a table of fields ([experiment] in TOML), not {type(d).__name__} {d!r}")
        known = {f.name for f in fields(cls)}
        for k in d:
            if k not in known:
                raise SpecError(f"spec field '{k}' is unknown; known fields: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path) -> ExperimentSpec:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise SpecError(f"{path}: not valid TOML: {err}") from None
        except UnicodeDecodeError as err:
            raise SpecError(f"{path}: not valid TOML: {err}") from None
        if not data:
            raise SpecError(f"{path}: the spec is empty (write at least one field, e.g. engine = \"cow\")")
        try:
            return cls.from_dict(data.get("experiment", data))
        except SpecError as err:
            raise SpecError(f"{path}: {err}") from None
