"""Run control: the vCPU thread, the run state and the virtual clock.

Owns every cross-thread hand-off of the machine (the rule itself is written once, in
machine.py's docstring): the condition variable and the flags it guards, the vCPU thread's
loop, parking and unparking it, the run_on_cpu() work queue, the host-error and guest-panic
latches, the run state (with its STOP, RESUME, RESET and SHUTDOWN events) and the exit hook
that parks the vCPUs a process forgot to close.

Must not import emulator.machine, the board or the devices: it drives the CPU through the
narrow :class:`VCPU` protocol and reaches the board only through the callables the composer
(machine.py) hands it.

Mirrors QEMU's softmmu/cpus.c (vm_stop/do_vm_stop, vm_start/resume_all_vcpus,
pause_all_vcpus, run_on_cpu, qemu_cpu_kick), the TCG vCPU thread's loop and its halt wait
(accel/tcg/tcg-accel-ops-rr.c, qemu_wait_io_event), softmmu/runstate.c (qmp_cont,
qemu_system_reset, qmp_query_status) and softmmu/cpu-timers.c (cpu_enable_ticks and
cpu_disable_ticks: QEMU_CLOCK_VIRTUAL).
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

from emulator.cpu import GuestFault
from emulator.errors import SnaplabError
from emulator.runstate import RunState

Emit = Callable[[str, dict[str, Any] | None], None]  # an event's name and data (None: no data)


class VirtualClock:
    """QEMU's QEMU_CLOCK_VIRTUAL: nanoseconds that advance only while the guest runs."""

    def __init__(self) -> None:
        self._base = 0
        self._t0: int | None = None
        self._lock = threading.Lock()

    def now_ns(self) -> int:
        t0 = self._t0
        return self._base + (time.monotonic_ns() - t0 if t0 is not None else 0)

    def start(self) -> None:
        with self._lock:
            if self._t0 is None:
                self._t0 = time.monotonic_ns()

    def stop(self) -> None:
        with self._lock:
            if self._t0 is not None:
                self._base += time.monotonic_ns() - self._t0
                self._t0 = None

    def set(self, ns: int) -> None:
        with self._lock:
            running = self._t0 is not None
            self._base = ns
            self._t0 = time.monotonic_ns() if running else None


class VCPU(Protocol):
    """What the run control needs from the CPU (emulator.cpu.X86CPU)."""

    @property
    def pc(self) -> int: ...

    def run(self, count: int = 0) -> GuestFault | None: ...

    def stop(self) -> None: ...

    def halted(self) -> bool: ...


class RunControl:
    """The vCPU thread and the VM's run state, for one vCPU.

    ``reset`` puts the CPU and the devices back to power-on (no event), ``flush_output``
    pushes the console's pending output out, ``take_deadline`` is the guest timer's next
    deadline (virtual ns; 0: none) for a halted vCPU's wait.
    """

    def __init__(self, cpu: VCPU, clock: VirtualClock, emit: Emit, *, reset: Callable[[], None],
                 flush_output: Callable[[], None], take_deadline: Callable[[], int]) -> None:
        self.state = RunState.PRELAUNCH
        self.fault: GuestFault | None = None
        self._cpu = cpu
        self._clock = clock
        self._emit = emit
        self._reset = reset
        self._flush_output = flush_output
        self._take_deadline = take_deadline
        self._cond = threading.Condition()
        self._want_run = False
        self._stop_req = False
        self._parked = True
        self._quit = False
        self._work: deque[tuple[Callable[[], None], Future[None]]] = deque()  # run_on_cpu() items
        self._panic_code: int | None = None  # guest_panic()'s code, for the vCPU thread
        self._host_error: str | None = None  # stop_on_host_error()'s cause, for the vCPU thread
        self._thread: threading.Thread | None = None
        _track(self)

    # -- the vCPU thread ---------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._vcpu_main, name="vcpu", daemon=True)
            self._thread.start()

    def _vcpu_main(self) -> None:
        while True:
            with self._cond:
                self._parked = True
                self._cond.notify_all()
                while (not self._want_run or self._stop_req) and not self._quit and not self._work:
                    self._cond.wait()
                if self._quit:
                    for _, done in self._work:
                        done.set_exception(SnaplabError("the machine quit"))
                    self._work.clear()
                    return
                work = self._work.popleft() if self._work else None
                self._parked = False  # a _park() from elsewhere waits for the work too
            if work is not None:
                fn, done = work
                done.set_running_or_notify_cancel()  # taken: its caller stops kicking
                try:
                    fn()
                except BaseException as err:  # noqa: BLE001 - raised again on the waiting thread
                    done.set_exception(err)
                else:
                    done.set_result(None)
                continue
            fault = self._cpu.run() if self._host_error is None else None
            if self._host_error is not None:
                cause, self._host_error = self._host_error, None
                fault = GuestFault(self._cpu.pc, cause, False)
            elif self._panic_code is not None:
                code, self._panic_code = self._panic_code, None
                fault = GuestFault(self._cpu.pc, f"guest reported panic code {code}", True)
            with self._cond:
                stop_req = self._stop_req or bool(self._work)
            if fault is not None:
                self._guest_stopped(fault)
                continue
            if stop_req:
                continue
            if self._cpu.halted():
                self._halt_wait()

    def _halt_wait(self) -> None:
        deadline = self._take_deadline()
        wait = 0.001
        if deadline:
            wait = min(max((deadline - self._clock.now_ns()) / 1e9, 0.0), 1.0)
        if wait > 0:
            with self._cond:
                if not self._stop_req and not self._quit and not self._work:
                    self._cond.wait(wait)

    def _guest_stopped(self, fault: GuestFault) -> None:
        with self._cond:
            self._want_run = False
        self._clock.stop()
        self.fault = fault
        self.state = RunState.GUEST_PANICKED if fault.panicked else RunState.INTERNAL_ERROR
        if fault.panicked:
            self._emit("GUEST_PANICKED", {"action": "pause", "info": {"type": "snaplab", "pc": fault.pc,
                                                                   "cause": fault.cause}})
        self._emit("STOP", None)

    def vcpu_alive(self) -> bool:
        """The vCPU thread was started and has not ended."""
        return self._thread is not None and self._thread.is_alive()

    # -- hand-offs to the vCPU thread -------------------------------------------------------
    def run_on_cpu(self, fn: Callable[[], None]) -> None:
        """run_on_cpu(): ``fn`` runs on the vCPU thread, between two guest instructions, and
        this returns when it has.  The vCPU leaves emu_start for it and goes back in after
        (if still wanted), so a stop and resume done inside ``fn`` wake no thread: a downtime
        spent there has no thread hand-off in it.  Its exception is raised here."""
        if self._thread is None or threading.current_thread() is self._thread:
            fn()
            return
        done: Future[None] = Future()
        with self._cond:
            if self._quit:
                raise SnaplabError("the machine quit")
            self._work.append((fn, done))
            self._cond.notify_all()
        self._cpu.stop()
        while True:
            try:
                # Kicked again every 2 ms until the vCPU took the work (a kick that landed
                # before emu_start is lost), then left alone: a waiter that woke while ``fn``
                # runs would take the GIL from it at each of its Unicorn calls.
                return done.result(timeout=0.002 if not done.running() else 0.5)
            except FutureTimeout:
                if not self._thread.is_alive():
                    raise SnaplabError("the vCPU thread is gone") from None
                if not done.running():
                    self._cpu.stop()

    def stop_on_host_error(self, cause: str) -> None:
        """A host-side failure the guest must not run past (a lazy restore that cannot read the
        snapshot): the vCPU stops at its next instruction boundary, in internal-error with
        ``cause``, as for a guest fault (safe from any thread)."""
        self._host_error = cause
        self._cpu.stop()

    def guest_panic(self, code: int) -> None:
        """The guest reported a panic (from a device callback, on the vCPU thread): it stops
        at its next instruction boundary, in guest-panicked."""
        self._panic_code = code
        self._cpu.stop()

    def _park(self) -> None:
        """Stop the vCPU and wait until it is parked (no guest code, no device callback)."""
        with self._cond:
            self._stop_req = True
            self._want_run = False
            self._cond.notify_all()
        if self._thread is not None:
            while True:
                self._cpu.stop()
                with self._cond:
                    if self._cond.wait_for(lambda: self._parked, timeout=0.002):
                        break
        with self._cond:
            self._stop_req = False

    def _unpark(self) -> None:
        """Let the vCPU go back into the guest."""
        with self._cond:
            self._want_run = True
            self._cond.notify_all()

    def while_parked(self, fn: Callable[[], None]) -> None:
        """``fn`` with the vCPU parked for an instant if it runs (no event, no state change)."""
        if self.state == RunState.RUNNING:
            self._park()
            try:
                fn()
            finally:
                self._unpark()
        else:
            fn()

    # -- run state (QMP stop/cont/system_reset/quit) -----------------------------------------
    def start(self, *, paused: bool = False) -> None:
        """Power on: prelaunch with ``paused`` (``-S``), else running."""
        self._ensure_thread()
        if not paused:
            self.cont()

    def vm_stop(self, state: RunState = RunState.PAUSED) -> bool:
        """vm_stop(): park the vCPU, enter ``state`` and emit STOP; nothing if not running."""
        if self.state != RunState.RUNNING:
            return False
        if threading.current_thread() is self._thread:  # in run_on_cpu(): out of the guest already
            with self._cond:
                self._want_run = False
        else:
            self._park()
        self._clock.stop()
        self._flush_output()
        self.state = state
        self._emit("STOP", None)
        return True

    def vm_resume(self, state: RunState) -> None:
        """vm_resume(): run again if ``state`` was running, else just go back to ``state``."""
        if state == RunState.RUNNING:
            self.state = RunState.PAUSED
            self.cont()
        else:
            self.state = state

    def stop(self) -> None:
        self.vm_stop(RunState.PAUSED)

    def cont(self) -> None:
        """vm_start(): refused in states that need a reset, as QEMU's qmp_cont."""
        if self.state.needs_reset:
            raise SnaplabError("Resetting the Virtual Machine is required")
        if self.state == RunState.RUNNING:
            return
        self._ensure_thread()
        self.state = RunState.RUNNING
        self._clock.start()
        self._emit("RESUME", None)
        self._unpark()

    def system_reset(self, reason: str = "host-qmp-system-reset") -> None:
        was_running = self.state == RunState.RUNNING
        if was_running:
            self._park()
        self._reset()
        self.fault = None
        self._emit("RESET", {"guest": False, "reason": reason})
        if was_running:
            self._unpark()
        else:
            self.state = RunState.PRELAUNCH

    def reset_for_load(self) -> None:
        """qemu_system_reset(SHUTDOWN_CAUSE_SNAPSHOT_LOAD): devices and CPU, no RESET event."""
        self._reset()
        self.fault = None

    def quit(self, reason: str = "host-qmp-quit") -> None:
        if self.state == RunState.RUNNING:
            self._park()
            self._clock.stop()
        self.state = RunState.SHUTDOWN
        self._flush_output()
        self._emit("SHUTDOWN", {"guest": False, "reason": reason})
        with self._cond:
            self._quit = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def query_status(self) -> dict[str, Any]:
        """query-status in QEMU 7.2's shape."""
        return {"status": self.state.value, "singlestep": False, "running": self.state == RunState.RUNNING}

    def run_instructions(self, count: int) -> GuestFault | None:
        """Execute exactly ``count`` instructions on the caller's thread (machine not running).

        Deterministic stepping for tests and experiments (``emu_start(count=N)``).
        """
        if self.state == RunState.RUNNING:
            raise SnaplabError("run_instructions needs a stopped machine")
        fault = self._cpu.run(count)
        if self._panic_code is not None:
            code, self._panic_code = self._panic_code, None
            fault = GuestFault(self._cpu.pc, f"guest reported panic code {code}", True)
        return fault


_LIVE: weakref.WeakSet[RunControl] = weakref.WeakSet()
_exit_hook = False


def _track(rc: RunControl) -> None:
    """Remember a vCPU for :func:`_park_all_vcpus`.  The hook is registered after the first
    Unicorn engine exists (the CPU is built before its run control): atexit runs hooks
    last-registered first, and unicorn frees its engines from a weakref.finalize hook that
    registers itself with the first engine."""
    global _exit_hook
    _LIVE.add(rc)
    if not _exit_hook:
        atexit.register(_park_all_vcpus)
        _exit_hook = True


def _park_all_vcpus() -> None:
    """At interpreter exit, stop every vCPU that is still running (a notebook kernel or a
    script that never closed its machine): a daemon thread left inside emu_start while the
    interpreter frees the Unicorn engine crashes the process on its way out."""
    for rc in list(_LIVE):
        try:
            if rc.state != RunState.SHUTDOWN:
                rc.quit("host-signal")
        except Exception:  # exiting anyway: never let one machine keep the others running
            pass
