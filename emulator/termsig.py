"""Termination signals as a shutdown request, as QEMU handles them.

QEMU installs ``termsig_handler`` for SIGINT, SIGHUP and SIGTERM early in its setup
(os-posix.c ``os_setup_signal_handling``, softmmu/runstate.c ``qemu_system_killed``): a
signal becomes a shutdown request that the main loop carries out, with a SHUTDOWN event
(``{"guest": false, "reason": "host-signal"}``) and exit status 0.  Here the handler only
wakes a thread of this module, which calls :func:`emulator.runctl.request_shutdown`: every
started machine quits, and one that is not started yet quits at its start (``-loadvm`` and
``-incoming`` setup finish first, as QEMU's do before its main loop).  A handler does no
more than set an event, because it runs on the main thread between two bytecodes, possibly
inside one of the run control's verbs.

Owns nothing but the handlers and that thread; imports only the run control.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from emulator.runctl import request_shutdown

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
signalled = threading.Event()  # a signal came (a wait before the machine runs gives up on it)


def setup_signal_handling() -> None:
    """From now on SIGTERM, SIGINT and SIGHUP request a shutdown (main thread only, as
    ``signal.signal``)."""
    wake = threading.Event()

    def serve() -> None:
        wake.wait()
        request_shutdown("host-signal")

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signalled.set()
        wake.set()

    threading.Thread(target=serve, name="termsig", daemon=True).start()
    for sig in SIGNALS:
        signal.signal(sig, on_signal)
