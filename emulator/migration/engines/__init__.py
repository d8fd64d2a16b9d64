"""The registry of snapshot engines: the one place that lists them.

Each engine is one module beside this one (a :class:`~emulator.migration.engine.SaveEngine`
or :class:`~emulator.migration.engine.LoadEngine` subclass); adding one is that module plus
one line below.  Everything else reads this registry: the QMP schema's
``SnaplabSaveEngine`` / ``SnaplabLoadEngine`` enums, the snapshot controller's dispatch,
``lab.spec``, the plots and the widgets.  QEMU lists its migration capabilities and
``register_savevm_live()`` handlers the same way.  The first engine of each list is the
default, QEMU's own.
"""

from __future__ import annotations

from emulator.errors import SnaplabError
from emulator.migration.engine import LoadEngine, SaveEngine
from emulator.migration.engines.load_background import BackgroundLoad
from emulator.migration.engines.load_blocking import BlockingLoad
from emulator.migration.engines.load_ondemand import OnDemandLoad
from emulator.migration.engines.load_prefetch import PrefetchLoad
from emulator.migration.engines.save_blocking import (
    BlockingSave as BlockingSave,  # (re-exported: the lab times its scan)
)
from emulator.migration.engines.save_cow import CowSaveEngine
from emulator.migration.engines.save_precopy import PrecopySave
from emulator.migration.postcopy import (  # (re-exported: lab.diskfloor reads as the prefetch policy's readers do)
    PREFETCH_READERS as PREFETCH_READERS,
)
from emulator.migration.postcopy import (
    group_size as group_size,
)

SAVE_ENGINES: list[type[SaveEngine]] = [
    BlockingSave,
    CowSaveEngine,
    PrecopySave,
]
LOAD_ENGINES: list[type[LoadEngine]] = [
    BlockingLoad,
    OnDemandLoad,
    BackgroundLoad,
    PrefetchLoad,
]
# Names a load engine was known by before: still accepted, mapped to today's engine.
LOAD_ALIASES: dict[str, str] = {"lazy": "background"}


def save_engine_names() -> tuple[str, ...]:
    return tuple(e.name for e in SAVE_ENGINES)


def load_engine_names() -> tuple[str, ...]:
    return tuple(e.name for e in LOAD_ENGINES)


def load_engine_values() -> tuple[str, ...]:
    """What ``__org.snaplab_engine`` of snapshot-load accepts: the engines, then the aliases."""
    return load_engine_names() + tuple(LOAD_ALIASES)


def save_engine(name: str) -> type[SaveEngine]:
    """The save engine of that name; QEMU's error for an enum value it does not know."""
    for e in SAVE_ENGINES:
        if e.name == name:
            return e
    raise SnaplabError(f"Parameter 'engine' does not accept value '{name}'")


def load_engine(name: str) -> type[LoadEngine]:
    """The load engine of that name; QEMU's error for an enum value it does not know."""
    name = LOAD_ALIASES.get(name, name)
    for e in LOAD_ENGINES:
        if e.name == name:
            return e
    raise SnaplabError(f"Parameter 'engine' does not accept value '{name}'")
