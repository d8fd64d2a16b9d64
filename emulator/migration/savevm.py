"""Internal snapshots of the whole VM: save_snapshot, load_snapshot, delete_snapshot.

Mirrors the entry points of QEMU's migration/savevm.c: one snapshot operation at a time per
VM, the engine chosen by name from the registry (engines/__init__.py), ``delete_snapshot``.
The checks run in QEMU's order with QEMU's texts (engine.py, group.py); where QEMU 7.2 is
plainly wrong snaplab does the sane thing and docs/deviations.md says so.

The controller gets narrow collaborators from the machine (the block graph, the attachments,
run-state control, the save handlers, RAM), never the machine itself.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

from emulator.block.node import BlockGraph
from emulator.errors import SnapshotBusyError
from emulator.memory import GuestRAM
from emulator.migration import group
from emulator.migration.cow import WriteProtector
from emulator.migration.engine import (
    EngineContext,
    LoadEngine,
    LoadRequest,
    LoadSteps,
    SaveEngine,
    SaveRequest,
    SnapshotMetrics,
    VMOps,
)
from emulator.migration.engines import LOAD_ENGINES, SAVE_ENGINES, load_engine, save_engine
from emulator.migration.vmstate import SaveHandler


class SnapshotController:
    """The snapshot operations of one VM; one at a time."""

    def __init__(self, graph: BlockGraph, attached: Callable[[], list[str]], vm: VMOps,
                 handlers: Callable[[], list[SaveHandler]], ram: GuestRAM, machine_name: str) -> None:
        # "auto": userfaultfd, else the Unicorn TLB fallback; or force one ("userfaultfd", "unicorn-tlb").
        self.ctx = EngineContext(graph, attached, vm, handlers, ram, machine_name,
                                 os.environ.get("SNAPLAB_WP_BACKEND", "auto"))
        self._busy = threading.Lock()
        self._shut = False
        self.busy_with = ""
        self._save: dict[str, SaveEngine] = {}
        self._load: dict[str, LoadEngine] = {}
        for s in SAVE_ENGINES:
            self._save_engine(s.name)
        for lo in LOAD_ENGINES:
            self._load_engine(lo.name)

    @property
    def last(self) -> SnapshotMetrics | None:
        """The figures of the last operation that completed."""
        return self.ctx.last

    @property
    def wp_backend(self) -> str:
        return self.ctx.wp_backend

    @wp_backend.setter
    def wp_backend(self, value: str) -> None:
        self.ctx.wp_backend = value

    def write_protector(self) -> WriteProtector:
        """The VM's userfaultfd, set up once (see EngineContext.write_protector)."""
        return self.ctx.write_protector()

    def _save_engine(self, name: str) -> SaveEngine:
        eng = self._save.get(name)
        if eng is None:
            eng = self._save[name] = save_engine(name)(self.ctx)
        return eng

    def _load_engine(self, name: str) -> LoadEngine:
        cls = load_engine(name)  # an alias (LOAD_ALIASES) gives the engine it names
        eng = self._load.get(cls.name)
        if eng is None:
            eng = self._load[cls.name] = cls(self.ctx)
            self.ctx.on_write_protector.append(eng.on_write_protector)
        return eng

    # -- one operation at a time -------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """The VM's one snapshot operation (or migration) for the duration of the block; QEMU's
        refusal wording when another one runs."""
        if not self._busy.acquire(blocking=False):
            raise SnapshotBusyError(f"Another snapshot operation is in progress ({self.busy_with}); "
                                    "try again once it has concluded")
        self.busy_with = what
        try:
            yield
        finally:
            self.busy_with = ""
            self.ctx.vm.release_hold()  # the VM is no longer the operation's, however it ended
            self._busy.release()

    def shutdown(self, timeout: float) -> bool:
        """Machine teardown: wait for the running operation (its threads read and write guest
        RAM), refuse new ones, stop the fault-service thread.  False if an operation is still
        running after ``timeout`` seconds: then guest RAM must stay mapped."""
        if self._shut:
            return True
        for load in self._load.values():
            load.hurry()  # a load that fills RAM only on demand fills the rest now
        if not self._busy.acquire(timeout=timeout):
            return False
        self._shut = True
        self.busy_with = "machine shutdown"
        for load in self._load.values():
            load.close()
        for save in self._save.values():
            save.close()
        self.ctx.close()
        return True

    # -- the operations -------------------------------------------------------------------------------
    def save_snapshot(self, name: str | None, overwrite: bool, vmstate: str | None,
                      devices: list[str] | None, engine: str | None = None,
                      wp_backend: str | None = None) -> SnapshotMetrics:
        """save_snapshot() with the named engine (engines/__init__.py lists them; the first,
        QEMU's own, by default)."""
        engine = engine or SAVE_ENGINES[0].name
        eng = self._save_engine(engine)
        with self.exclusive(f"snapshot save ({engine})"):
            return eng.save(SaveRequest(name, overwrite, vmstate, devices, wp_backend or self.ctx.wp_backend))

    def load_snapshot(self, name: str, vmstate: str | None, devices: list[str] | None,
                      *, stop_first: bool = True, engine: str | None = None) -> SnapshotMetrics:
        """load_snapshot() with the named engine, run to its end (no job: an engine that would
        wait for ``job-complete`` is told to finish at once)."""
        steps = self.load_snapshot_steps(name, vmstate, devices, stop_first=stop_first, engine=engine)
        while True:
            try:
                step = next(steps)
                if step is not None:
                    step.complete()
            except StopIteration as done:
                metrics: SnapshotMetrics = done.value
                return metrics

    def load_snapshot_steps(self, name: str, vmstate: str | None, devices: list[str] | None, *,
                            stop_first: bool = True,
                            engine: str | None = None) -> LoadSteps:
        """:meth:`load_snapshot` in steps: an engine that resumes early yields once, when the
        guest has resumed (the job runs the rest on a thread of its own); others do not yield."""
        eng = self._load_engine(engine or LOAD_ENGINES[0].name)
        with self.exclusive(f"snapshot load ({eng.name})"):
            orig = self.ctx.vm.state
            return (yield from eng.load_steps(LoadRequest(name, vmstate, devices, stop_first), orig))

    def delete_snapshot(self, name: str, devices: list[str] | None) -> None:
        """delete_snapshot(): a missing tag is not an error."""
        with self.exclusive("snapshot delete"):
            nodes = group.devices(self.ctx.graph, self.ctx.attached(), devices)
            group.can_snapshot(nodes)
            group.delete_all(name, nodes)

