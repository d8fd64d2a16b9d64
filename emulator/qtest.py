"""The qtest accelerator: a machine whose guest never runs (QEMU's accel/qtest/qtest.c).

``-accel qtest`` is what qemu-iotests start QEMU with: the VM goes through its run states
(``running`` after start, ``paused`` after ``stop``, snapshots stop and resume it), but no
guest instruction executes (the dummy vCPU thread of accel/dummy-cpus.c only waits to be
kicked) and the virtual clock moves only when the qtest protocol says so.  snaplab has no
qtest protocol, so the clock stays at 0, which is what the iotests' golden output shows
(``VM CLOCK 00:00:00.000``).

Imports the run control's clock and nothing of the machine; machine.py picks these parts
when ``MachineConfig.accel`` is ``"qtest"``.
"""

from __future__ import annotations

import threading

from emulator.cpu import GuestFault
from emulator.runctl import VCPU, VirtualClock

ACCELERATORS = ("tcg", "qtest")  # what -accel takes (tcg: snaplab's Unicorn vCPU)


class QtestClock(VirtualClock):
    """QEMU_CLOCK_VIRTUAL under qtest: it stands still unless set (qtest_clock_warp)."""

    def now_ns(self) -> int:
        return self._base

    def start(self) -> None:
        """The guest "runs", the clock does not."""

    def stop(self) -> None:
        """Nothing to stop."""

    def set(self, ns: int) -> None:
        self._base = ns


class QtestCPU:
    """The vCPU under qtest (dummy_cpu_thread_fn): leaves "the guest" only when kicked.

    Registers are the real CPU's (savevm saves them, loadvm restores them); :meth:`run`
    executes nothing and returns when :meth:`stop` is called.
    """

    def __init__(self, cpu: VCPU) -> None:
        self._cpu = cpu
        self._kick = threading.Event()

    @property
    def pc(self) -> int:
        return self._cpu.pc

    def run(self, count: int = 0) -> GuestFault | None:
        self._kick.wait()
        self._kick.clear()
        return None

    def stop(self) -> None:
        self._kick.set()

    def halted(self) -> bool:
        """Always "halted": a spurious return waits as a halted vCPU does."""
        return True
