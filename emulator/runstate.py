"""Run states, with QEMU's names (qapi/run-state.json ``RunState``)."""

from __future__ import annotations

from enum import Enum


class RunState(Enum):
    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"

    @property
    def needs_reset(self) -> bool:
        """runstate_needs_reset(): cont is refused until a system_reset."""
        return self in (RunState.INTERNAL_ERROR, RunState.SHUTDOWN, RunState.GUEST_PANICKED)
