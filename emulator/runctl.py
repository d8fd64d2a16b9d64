"""Run control: the vCPU thread, the run state and the virtual clock.

Owns every cross-thread hand-off of the machine (the rule itself is written once, in
machine.py's docstring): the condition variable and the flags it guards, the vCPU thread's
loop, parking and unparking it, the run_on_cpu() work queue, the host-error and guest-panic
latches, the run state (with its STOP, RESUME, RESET and SHUTDOWN events) and the exit hook
that parks the vCPUs a process forgot to close.

The hand-off (:class:`RunControl`), in two locks.  ``_bql`` (QEMU's big lock, for the run state
only) is held by every verb from start to end: verbs on different threads never interleave, a
snapshot operation's stopped section is whole against the user's verbs (:class:`OperationHold`),
and after a quit nothing runs the guest again.  ``_cond`` guards the flags the vCPU thread reads:
it enters the guest only while ``_want_run`` and no verb holds it out (``_holds``), saying so in
``_in_guest`` under the same lock; a verb that wants it out clears one of the two and waits for
``_in_guest`` to drop, kicking it meanwhile, and what it sees stays true until it lets go.
run_on_cpu() work runs on the vCPU thread under ``_bql`` too (its verbs nest), and a guest fault
is turned into a run state under it.  ``_waiting`` says the vCPU thread is asleep in a wait, not
between leaving emu_start and dealing with what it came out for (a fault, a halt's deadline):
only then may another thread do a vCPU's work with it held out (``with_vcpu_out``).

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
import contextlib
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

from emulator.cpu import GuestFault
from emulator.errors import SnaplabError
from emulator.runstate import RunState

Emit = Callable[[str, dict[str, Any] | None], None]  # an event's name and data (None: no data)
# The states only a snapshot operation or a migration stops the VM in: from that vm_stop to
# its vm_resume (or the operation's end) the VM is the operation's (OperationHold).
OPERATION_STATES = frozenset({RunState.SAVE_VM, RunState.RESTORE_VM, RunState.FINISH_MIGRATE})


class VirtualClock:
    """QEMU's QEMU_CLOCK_VIRTUAL: nanoseconds that advance only while the guest runs."""

    def __init__(self) -> None:
        self._base = 0
        self._t0: int | None = None
        self._lock = threading.Lock()
        self._watchers: list[Callable[[int | None], None]] = []

    def now_ns(self) -> int:
        t0 = self._t0
        return self._base + (time.monotonic_ns() - t0 if t0 is not None else 0)

    def watch(self, cb: Callable[[int | None], None]) -> None:
        """``cb(now_ns() - monotonic ns)`` now and whenever that changes; None while stopped
        (the lab port's machine-code doorbell stamps samples with it)."""
        with self._lock:
            self._watchers.append(cb)
            cb(self._offset())

    def _offset(self) -> int | None:
        return None if self._t0 is None else self._base - self._t0

    def _changed(self) -> None:
        for cb in self._watchers:
            cb(self._offset())

    def start(self) -> None:
        with self._lock:
            if self._t0 is None:
                self._t0 = time.monotonic_ns()
                self._changed()

    def stop(self) -> None:
        with self._lock:
            if self._t0 is not None:
                self._base += time.monotonic_ns() - self._t0
                self._t0 = None
                self._changed()

    def set(self, ns: int) -> None:
        """The clock jumps to ``ns`` (a load).  Like :meth:`start` and :meth:`stop`, called
        only with the vCPU out of the guest: a doorbell rung meanwhile would stamp its sample
        with the offset before the change."""
        with self._lock:
            running = self._t0 is not None
            self._base = ns
            self._t0 = time.monotonic_ns() if running else None
            self._changed()


class VCPU(Protocol):
    """What the run control needs from the CPU (emulator.cpu.X86CPU)."""

    @property
    def pc(self) -> int: ...

    def run(self, count: int = 0) -> GuestFault | None: ...

    def stop(self) -> None: ...

    def halted(self) -> bool: ...


class OperationHold:
    """A snapshot operation's or migration's stopped section, whole: from its vm_stop in an
    operation state (running or not) to its vm_resume or its end, the VM is its thread's.
    QEMU runs savevm and loadvm in its main loop, so a monitor's ``cont`` or ``stop`` is
    carried out before or after them, never in between; here they run on job threads, and a
    user's verb from another thread waits for the hold's end (:meth:`passed`)."""

    def __init__(self, cond: threading.Condition, bql: threading.RLock, quitting: Callable[[], bool]) -> None:
        self._cond = cond  # the run control's: its waiters are woken together
        self._bql = bql
        self._quitting = quitting
        self.owner: int | None = None
        self.found: RunState | None = None  # where the hold's vm_stop found the VM (RUNNING if running)

    def take(self, found: RunState) -> None:
        """Inside the run-state lock (vm_stop): the calling thread holds the VM from now, and
        the state to go back to is read there too (QEMU reads runstate_is_running() just
        before vm_stop, under its big lock), so no verb can slip in between."""
        with self._cond:
            self.owner, self.found = threading.get_ident(), found

    def release(self) -> None:
        with self._cond:
            if self.owner is not None:
                self.owner = self.found = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def passed(self) -> Iterator[None]:
        """For a user's verb (stop, cont, system_reset): the run-state lock held, with no hold
        but the caller's own (or the machine quitting); checked under that lock, which
        :meth:`take` runs under, so no hold begins in between."""
        me, bql, quitting = threading.get_ident(), self._bql, self._quitting
        while True:
            with self._cond:
                while self.owner not in (None, me) and not quitting():
                    self._cond.wait()
            bql.acquire()
            if self.owner in (None, me) or quitting():
                break
            bql.release()
        try:
            yield
        finally:
            bql.release()


class EntryStamp:
    """When the vCPU first entered the guest after the last RESUME (``time.monotonic_ns()``,
    taken just before its ``emu_start``: the first guest instruction after a load; -1: not
    since), under the run control's condition variable."""

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self.ns = -1

    def stamp(self) -> None:
        """(On the vCPU thread) the first guest instruction since RESUME is about to run."""
        with self._cond:
            self.ns = time.monotonic_ns()
            self._cond.notify_all()

    def wait(self, timeout: float) -> int:
        """The stamp, waiting up to ``timeout`` seconds for it; 0 if it has not happened (a
        paused guest never enters)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self.ns < 0 and (left := end - time.monotonic()) > 0:
                self._cond.wait(left)
            return max(self.ns, 0)


class RunControl:
    """The vCPU thread and the VM's run state, for one vCPU.

    ``reset`` puts the CPU and the devices back to power-on (no event), ``flush_output``
    pushes the console's pending output out, ``take_deadline`` is the guest timer's next
    deadline (virtual ns; 0: none) for a halted vCPU's wait.

    The hand-off between threads: the module's docstring.
    """

    def __init__(self, cpu: VCPU, clock: VirtualClock, emit: Emit, *, reset: Callable[[], None],
                 flush_output: Callable[[], None], take_deadline: Callable[[], int],
                 before_run: Callable[[], None] | None = None) -> None:
        self.state = RunState.PRELAUNCH
        self.fault: GuestFault | None = None
        self._cpu = cpu
        self._clock = clock
        self._emit = emit
        self._reset = reset
        self._flush_output = flush_output
        self._take_deadline = take_deadline
        self._before_run = before_run  # on the vCPU thread before each emu_start (a device's retry)
        self._bql = threading.RLock()  # one verb at a time (re-entered by nested verbs)
        self._owner: int | None = None  # the thread inside a verb (run_on_cpu() must not queue)
        self._cond = threading.Condition()
        self._want_run = False
        self._holds = 0
        self._in_guest = False
        self._waiting = False  # the vCPU thread asleep in a wait (module docstring)
        self._quit = False
        self._work: deque[tuple[Callable[[], None], Future[None]]] = deque()  # run_on_cpu() items
        self._panic_code: int | None = None  # guest_panic()'s code, for the vCPU thread
        self._host_error: str | None = None  # stop_on_host_error()'s cause, for the vCPU thread
        self._io_error = False  # io_error_stop()'s latch, for the vCPU thread
        self._overtaken: GuestFault | None = None  # a fault a verb got ahead of: the next run's
        self._thread: threading.Thread | None = None
        self._entry = EntryStamp(self._cond)
        self.first_entry_ns = self._entry.wait
        self._hold = OperationHold(self._cond, self._bql, lambda: self._quit)  # a snapshot operation's or migration's stopped section
        self.release_hold = self._hold.release  # its end, resumed or not (a failed load stays stopped)
        _track(self)

    @contextlib.contextmanager
    def _verb(self) -> Iterator[None]:
        """The run-state lock, with its owner remembered (re-entrant)."""
        with self._bql:
            outer, self._owner = self._owner, threading.get_ident()
            try:
                yield
            finally:
                self._owner = outer

    # -- the vCPU thread ---------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._vcpu_main, name="vcpu", daemon=True)
            self._thread.start()

    def _may_run(self) -> bool:
        return self._want_run and self._holds == 0 and not self._quit and not self._work

    def _vcpu_main(self) -> None:
        while True:
            with self._cond:
                while not self._may_run() and not self._quit and not self._work:
                    self._asleep()
                if self._quit:
                    for _, done in self._work:
                        done.set_exception(SnaplabError("the machine quit"))
                    self._work.clear()
                    return
                work = self._work.popleft() if self._work else None
                if work is None:
                    self._in_guest = True
                else:
                    work[1].set_running_or_notify_cancel()  # taken: its caller stops kicking
            if work is not None:
                self._run_work(*work)
                continue
            try:
                fault = self._run_guest()
            finally:
                with self._cond:
                    self._in_guest = False
                    self._cond.notify_all()
            if fault is not None:
                self._guest_stopped(fault)
                continue
            if self._io_error:
                self._io_error_stopped()
                continue
            with self._cond:
                idle = self._may_run()
            if idle and self._cpu.halted():
                self._halt_wait()

    def _run_work(self, fn: Callable[[], None], done: Future[None]) -> None:
        with self._verb():
            if self._quit:
                done.set_exception(SnaplabError("the machine quit"))
                return
            try:
                fn()
            except BaseException as err:  # noqa: BLE001 - raised again on the waiting thread
                done.set_exception(err)
            else:
                done.set_result(None)

    def _run_guest(self) -> GuestFault | None:
        """One emu_start (unless a latch or an overtaken fault is due); the fault it ended in."""
        if self._overtaken is not None:
            overtaken, self._overtaken = self._overtaken, None
            return overtaken
        fault: GuestFault | None = None
        if self._before_run is not None:
            self._before_run()
        if self._host_error is None and self._panic_code is None and not self._io_error:  # a latch: no run
            if self._entry.ns < 0:
                self._entry.stamp()
            fault = self._cpu.run()
        if self._host_error is not None:
            cause, self._host_error = self._host_error, None
            fault = GuestFault(self._cpu.pc, cause, False)
        elif self._panic_code is not None:
            code, self._panic_code = self._panic_code, None
            fault = GuestFault(self._cpu.pc, f"guest reported panic code {code}", True)
        return fault

    def _halt_wait(self) -> None:
        deadline = self._take_deadline()
        wait = 0.001
        if deadline:
            wait = min(max((deadline - self._clock.now_ns()) / 1e9, 0.0), 1.0)
        if wait > 0:
            with self._cond:
                if self._may_run():
                    self._asleep(wait)

    def _asleep(self, timeout: float | None = None) -> None:
        """(vCPU thread, ``_cond`` held) wait, saying so in ``_waiting`` (module docstring)."""
        self._waiting = True
        self._cond.wait(timeout)
        self._waiting = False

    def _guest_stopped(self, fault: GuestFault) -> None:
        """The guest faulted: internal-error or guest-panicked, unless a verb got in first
        (then the fault is the next run's: a stopped guest does not change state)."""
        with self._verb():
            if self._quit:
                return
            if self.state != RunState.RUNNING:
                self._overtaken = fault
                return
            with self._cond:
                self._want_run = False
            self._clock.stop()
            self.fault = fault
            self.state = RunState.GUEST_PANICKED if fault.panicked else RunState.INTERNAL_ERROR
            if fault.panicked:
                self._emit("GUEST_PANICKED", {"action": "pause", "info": {"type": "snaplab", "pc": fault.pc,
                                                                       "cause": fault.cause}})
            self._emit("STOP", None)

    def _io_error_stopped(self) -> None:
        """A device asked for an io-error stop (werror/rerror=stop): the VM stops in
        ``io-error`` (STOP), as QEMU's qemu_system_vmstop_request(RUN_STATE_IO_ERROR); if a verb
        stopped it first, it stays as that verb left it (the device keeps the request for the
        next resume)."""
        with self._verb():
            self._io_error = False
            if self._quit or self.state != RunState.RUNNING:
                return
            with self._cond:
                self._want_run = False
            self._clock.stop()
            self._flush_output()
            self.state = RunState.IO_ERROR
            self._emit("STOP", None)

    def vcpu_alive(self) -> bool:
        """The vCPU thread was started and has not ended."""
        return self._thread is not None and self._thread.is_alive()

    # -- hand-offs to the vCPU thread -------------------------------------------------------
    def run_on_cpu(self, fn: Callable[[], None]) -> None:
        """run_on_cpu(): ``fn`` runs on the vCPU thread, between two guest instructions, and
        this returns when it has.  The vCPU leaves emu_start for it and goes back in after
        (if still wanted), so a stop and resume done inside ``fn`` wake no thread: a downtime
        spent there has no thread hand-off in it.  Its exception is raised here.  Called
        inside a verb (which the vCPU would wait for), ``fn`` runs here with the vCPU held out."""
        if self._thread is None or threading.current_thread() is self._thread:
            fn()
            return
        if self._owner == threading.get_ident():
            self.while_parked(fn)
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

    def with_vcpu_out(self, fn: Callable[[], None]) -> None:
        """``fn`` between two guest instructions, waking no thread: on the vCPU's (run_on_cpu()) unless
        it sleeps (halted, paused), else here, it held out, as QEMU's load_snapshot (~65 us saved)."""
        with self._cond:  # (not just out of emu_start: a fault or a halt's deadline is still its to take)
            here = self._waiting and not self._work  # (never so on the vCPU thread itself)
            self._holds += here  # taken with the check: it stays in its wait until we let go
        if not here:
            self.run_on_cpu(fn)
            return
        with self._verb(), self._held_out(taken=True):
            if self._quit:
                raise SnaplabError("the machine quit")
            fn()

    def stop_on_host_error(self, cause: str) -> None:
        """A host-side failure the guest must not run past (a lazy restore that cannot read the
        snapshot): the vCPU stops at its next instruction boundary, in internal-error with
        ``cause``, as for a guest fault (safe from any thread)."""
        self._host_error = cause
        self._cpu.stop()

    def io_error_stop(self) -> None:
        """A device failed a request under a ``stop`` policy (from a device callback, on the
        vCPU thread): the vCPU stops at the end of its translation block and the VM enters
        io-error."""
        self._io_error = True
        self._cpu.stop()

    def guest_panic(self, code: int) -> None:
        """The guest reported a panic (from a device callback, on the vCPU thread): it stops
        at its next instruction boundary, in guest-panicked."""
        self._panic_code = code
        self._cpu.stop()

    def _out_of_guest(self) -> None:
        """Wait (kicking every 2 ms: a kick that lands before emu_start is lost) until the
        vCPU is out of the guest.  Inside a verb, with ``_want_run`` cleared or a hold taken,
        so it cannot go back in: no guest code, no device callback until the verb lets go."""
        with self._cond:
            while self._in_guest:
                self._cpu.stop()
                self._cond.wait(0.002)

    @contextlib.contextmanager
    def _held_out(self, taken: bool = False) -> Iterator[None]:
        """The vCPU out of the guest for the block, whatever the run state (inside a verb);
        ``taken``: the caller took the hold already (it is let go here all the same)."""
        if not taken:
            with self._cond:
                self._holds += 1
        try:
            self._out_of_guest()
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def while_parked(self, fn: Callable[[], None]) -> None:
        """``fn`` with the vCPU out of the guest for an instant (no event, no state change)."""
        with self._verb(), self._held_out():
            fn()

    # -- run state (QMP stop/cont/system_reset/quit) -----------------------------------------
    def start(self, *, paused: bool = False) -> None:
        """Power on: prelaunch with ``paused`` (``-S``), else running.  A shutdown requested
        before (a signal while the process set up) is carried out now, as QEMU's main loop
        does on its first turn."""
        with self._verb():
            if self._quit:
                return
            self._ensure_thread()
        if _shutdown_reason is not None:
            self.quit(_shutdown_reason)
            return
        if not paused:
            self.cont()

    def vm_stop(self, state: RunState = RunState.PAUSED) -> bool:
        """vm_stop(): park the vCPU, enter ``state``, emit STOP (if running; :class:`OperationHold`)."""
        with self._verb():
            if state in OPERATION_STATES:
                self._hold.take(self.state)
            if self.state != RunState.RUNNING:
                return False
            with self._cond:
                self._want_run = False
            self._out_of_guest()
            self._clock.stop()
            self._flush_output()
            self.state = state
            self._emit("STOP", None)
            return True

    def vm_resume(self, state: RunState | None = None) -> None:
        """vm_resume(): run again if ``state`` is running, else go back to ``state`` (None: where
        the operation's vm_stop found it, if it stopped it); nothing after a quit."""
        with self._verb():
            state = self._hold.found if state is None else state
            self._hold.release()
            if state is None or self._quit:
                return
            if state == RunState.RUNNING:
                self.state = RunState.PAUSED
                self.cont()  # (the hold is released: no wait)
            else:
                self.state = state

    def stop(self) -> None:
        with self._hold.passed(), self._verb():
            self.vm_stop(RunState.PAUSED)

    def cont(self, before: Callable[[], None] | None = None) -> None:
        """qmp_cont(): refused where a reset is needed, else ``before`` (io-status), vm_start()."""
        with self._hold.passed(), self._verb():
            if self.state.needs_reset:
                raise SnaplabError("Resetting the Virtual Machine is required")
            if before is not None:
                before()
            if self.state == RunState.RUNNING or self._quit:
                return
            self._ensure_thread()
            self.state = RunState.RUNNING
            self._clock.start()
            self._emit("RESUME", None)
            with self._cond:
                self._entry.ns = -1
                self._want_run = True
                self._cond.notify_all()

    def system_reset(self, reason: str = "host-qmp-system-reset") -> None:
        with self._hold.passed(), self._verb():
            if self._quit:
                return
            with self._held_out():
                self._reset()
                self.fault = self._overtaken = None
                self._emit("RESET", {"guest": False, "reason": reason})
            if self.state != RunState.RUNNING:
                self.state = RunState.PRELAUNCH

    def reset_for_load(self) -> None:
        """qemu_system_reset(SHUTDOWN_CAUSE_SNAPSHOT_LOAD): devices and CPU, no RESET event."""
        with self._verb(), self._held_out():
            self._reset()
            self.fault = self._overtaken = None

    def quit(self, reason: str = "host-qmp-quit") -> None:
        """Shut down for good (once: a second quit does nothing): the vCPU thread ends, and no
        verb makes the guest run again."""
        with self._verb():
            if not self._quit:
                self._shut_down(reason)
        thread = self._thread  # every caller waits for the vCPU thread's end (bounded)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _shut_down(self, reason: str) -> None:
        if self.state == RunState.RUNNING:
            with self._cond:
                self._want_run = False
            self._out_of_guest()
            self._clock.stop()
        self.state = RunState.SHUTDOWN
        self._flush_output()
        self._emit("SHUTDOWN", {"guest": False, "reason": reason})
        with self._cond:
            self._quit = True
            self._cond.notify_all()

    def query_status(self) -> dict[str, Any]:
        """query-status in QEMU 7.2's shape."""
        return {"status": self.state.value, "singlestep": False, "running": self.state == RunState.RUNNING}

    def run_instructions(self, count: int) -> GuestFault | None:
        """Exactly ``count`` instructions on the caller's thread, machine stopped (emu_start(count=N))."""
        with self._verb(), self._held_out():
            if self.state == RunState.RUNNING:
                raise SnaplabError("run_instructions needs a stopped machine")
            fault = self._cpu.run(count)
            self._io_error = False  # a stop policy's request stays pending: retried at the next run
            if self._panic_code is not None:
                code, self._panic_code = self._panic_code, None
                fault = GuestFault(self._cpu.pc, f"guest reported panic code {code}", True)
            return fault


_LIVE: weakref.WeakSet[RunControl] = weakref.WeakSet()
_exit_hook = False
_shutdown_reason: str | None = None  # request_shutdown()'s reason, once one came


def request_shutdown(reason: str = "host-signal") -> None:
    """qemu_system_shutdown_request() for the whole process (a SIGTERM, SIGINT or SIGHUP):
    every started machine quits with ``reason`` (SHUTDOWN event), and one not yet started
    quits when it is.  Blocks until they have: call it from a thread of its own, never
    from a signal handler (the interrupted code may be inside a verb)."""
    global _shutdown_reason
    _shutdown_reason = reason
    for rc in list(_LIVE):
        if rc.vcpu_alive():
            rc.quit(reason)


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
