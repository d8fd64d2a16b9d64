"""The machine: the only module that composes the board, the run control, QMP and migration.

The parts it puts together, each in its own module: the board (board.py: RAM, firmware,
flash, devices, disks, the savevm handler list), the run control (runctl.py: the vCPU thread,
the run state, the virtual clock), the QMP monitor (qmp/), snapshots and migration
(migration/).  None of them imports this module, and the board and the run control do not
import each other: they meet here, through narrow callables.

Threading rule (the one place it is written down):

* The vCPU runs ``emu_start`` on its own thread (``vcpu``), with the GIL released by ctypes.
  Device callbacks run on that thread, inside ``emu_start``.
* Every other thread (monitor, snapshot jobs, notebooks, the signal thread) changes the run
  state only through the run control (:class:`~emulator.runctl.RunControl`), whose verbs the
  machine binds as its own: ``stop``, ``cont``, ``system_reset``, ``quit``,
  ``vm_stop``/``vm_resume``, ``run_on_cpu``, ``stop_on_host_error``.  Verbs happen one at a
  time, each whole (the run control's ``_bql``, QEMU's big lock for the run state), and a
  snapshot operation's or migration's stopped section (its ``vm_stop`` in ``save-vm``,
  ``restore-vm`` or ``finish-migrate`` ... its ``vm_resume`` or its end) is whole too: a
  ``stop``, ``cont`` or ``system_reset`` from another thread waits for its end, as QEMU's
  monitor waits for savevm and loadvm in its main loop; after ``quit`` no verb makes the
  guest run again.  ``stop`` returns when
  the vCPU is out of ``emu_start`` and cannot go back in, so no guest instruction and no
  device callback is running: CPU registers, RAM, devices and disks (the
  :class:`~emulator.board.Board`) are quiescent and may be read or replaced by the caller,
  who then calls ``cont``.
* Every cross-thread hand-off is in runctl.py and nowhere else: ``RunControl._cond`` guards
  the flags the vCPU thread reads (``_want_run``, ``_holds``, ``_in_guest``, ``_quit``) and
  the run_on_cpu() queue; the vCPU enters the guest only when allowed, saying so under the
  same lock, so what a verb waits for (``_in_guest`` false) stays true until it lets go.
  run_on_cpu() work and a guest fault's state change run on the vCPU thread inside a verb;
  the host-error and guest-panic latches are read by the vCPU thread when it leaves
  ``emu_start``; nothing is held across ``emu_start``.  The board has no thread and takes
  no lock for the run state.
* Signals (SIGTERM, SIGINT, SIGHUP in ``snaplab-system``) are a shutdown request
  (emulator/termsig.py): the handler only wakes a thread, which quits the machine.
* Events (STOP, RESUME, RESET, SHUTDOWN, GUEST_PANICKED) go to listeners registered with
  :meth:`Machine.add_listener`; they may be called from any thread and must not block.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from emulator.block.node import BlockGraph
from emulator.board import MACHINE_NAME, Board, DiskSpec, MachineConfig
from emulator.cpu import GuestFault
from emulator.devices.serial import Sink
from emulator.gc_control import freeze_long_lived
from emulator.migration.migrate import Migration
from emulator.migration.savevm import SnapshotController
from emulator.qmp.client import QMPClient
from emulator.qmp.commands import Monitor
from emulator.qmp.migration import install_migration_commands
from emulator.qmp.snapshot import install_snapshot_commands
from emulator.qtest import QtestClock, QtestCPU
from emulator.runctl import RunControl, VirtualClock
from emulator.runstate import RunState

__all__ = ["DiskSpec", "Listener", "Machine", "MachineConfig"]

Listener = Callable[[str, dict[str, Any], int], None]  # name, data, time raised (ns since the epoch)


class Machine:
    """A small x86-64 PC (the :class:`~emulator.board.Board`) with its vCPU thread, QMP
    monitor, snapshots and migration."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Machine:
        # Before any guest runs, the one full collection stalls nobody (gc_control.py); and
        # before this machine exists, so that it is not frozen with the rest: a machine is a
        # web of reference cycles, and a frozen one would never be freed.
        freeze_long_lived()
        return super().__new__(cls)

    def __init__(self, config: MachineConfig | None = None, graph: BlockGraph | None = None,
                 serial: Sink | None = None) -> None:
        self.config = config = config or MachineConfig()
        self.graph = graph or BlockGraph()
        self.clock = QtestClock() if config.accel == "qtest" else VirtualClock()
        self._listeners: list[Listener] = []
        self._held: list[tuple[str, dict[str, Any], int]] | None = None
        self._monitor: Monitor | None = None

        self.board = board = Board(config, self.graph, serial, self.clock, self._guest_panic, self._disk_error)
        # The parts and services of the board that the machine's users reach for.
        self.ram = board.ram
        self.cpu = board.cpu
        self.serial = board.serial
        self.lab = board.lab
        self.disk = board.disk
        self.disk_nodes = board.disk_nodes
        self.block_attachments = board.block_attachments
        self.savevm_handlers = board.savevm_handlers
        self.hold_block_io = board.hold_block_io

        self.runctl = rc = RunControl(QtestCPU(board.cpu) if config.accel == "qtest" else board.cpu, self.clock, self.emit, reset=board.reset,
                                      flush_output=board.serial.flush, take_deadline=board.timer.take_deadline,
                                      before_run=board.retry_disk)
        # Bound once, so a call goes straight to the run control: no extra frame on
        # run_on_cpu's path, or around a downtime's vm_stop and vm_resume.
        self.start = rc.start
        self.stop = rc.stop
        self.system_reset = rc.system_reset
        self.quit = rc.quit
        self.vm_stop = rc.vm_stop
        self.vm_resume = rc.vm_resume
        self.release_hold = rc.release_hold
        self.reset_for_load = rc.reset_for_load
        self.run_on_cpu = rc.run_on_cpu
        self.with_vcpu_out = rc.with_vcpu_out
        self.stop_on_host_error = rc.stop_on_host_error
        self.first_entry_ns = rc.first_entry_ns
        self.query_status = rc.query_status
        self.run_instructions = rc.run_instructions
        self.vclock_ns = self.clock.now_ns
        self.set_vclock_ns = self.clock.set

        self.snapshots = SnapshotController(self.graph, lambda: [a.node.node_name for a in self.block_attachments()],
                                            self, self.savevm_handlers, self.ram, MACHINE_NAME)
        self.migration = Migration(self.snapshots, self.emit)
        try:
            for path, addr in config.loaders:
                board.load_file(path, addr)
        except BaseException:
            self.ram.close()
            raise

    def _guest_panic(self, code: int) -> None:
        """The lab port's panic report, for the run control (built after the board)."""
        self.runctl.guest_panic(code)

    def cont(self) -> None:
        """qmp_cont(): every disk's io-status back to ``ok``, then vm_start() (refused in a
        state that needs a reset; both after any snapshot operation's stopped section)."""
        self.runctl.cont(before=self.disk.reset_io_status)

    def _disk_error(self, unit: int, operation: str, action: str, nospace: bool, reason: str) -> None:
        """A guest disk request failed (on the vCPU thread): BLOCK_IO_ERROR in QEMU 7.2's shape
        (blk_error_action()'s send_qmp_error_event), and an io-error stop for ``stop``."""
        node = self.board.disk_nodes[unit]
        self.emit("BLOCK_IO_ERROR", {"device": node.backend or "", "node-name": node.node_name,
                                     "operation": operation, "action": action, "nospace": nospace,
                                     "reason": reason})
        if action == "stop":
            self.runctl.io_error_stop()

    # -- run state ------------------------------------------------------------------------------
    @property
    def state(self) -> RunState:
        return self.runctl.state

    @state.setter
    def state(self, state: RunState) -> None:  # -incoming sets inmigrate before the start
        self.runctl.state = state

    @property
    def fault(self) -> GuestFault | None:
        """Why the guest stopped in internal-error or guest-panicked (None after a reset)."""
        return self.runctl.fault

    @property
    def running(self) -> bool:
        return self.runctl.state == RunState.RUNNING

    def enable_write_tracking(self, perms_for: Callable[[int, bool], int]) -> None:
        """Software write tracking for a snapshot window (vCPU parked: called in a downtime)."""
        self.cpu.enable_tlb_tracking(perms_for)

    def disable_write_tracking(self) -> None:
        """Back to Unicorn's own TLB: needs the vCPU parked for an instant (no events)."""
        self.runctl.while_parked(self.cpu.disable_tlb_tracking)

    # -- QMP ---------------------------------------------------------------------------------
    @property
    def monitor(self) -> Monitor:
        """This VM's QMP monitor (created on first use), with the snapshot commands."""
        if self._monitor is None:
            self._monitor = Monitor(self)
            install_snapshot_commands(self._monitor, self.snapshots)
            install_migration_commands(self._monitor, self.migration)
        return self._monitor

    def qmp(self, *, negotiate: bool = True) -> QMPClient:
        """An in-process QMP client (no sockets; safe in notebooks)."""
        return QMPClient(self.monitor, negotiate=negotiate)

    # -- events ---------------------------------------------------------------------------
    def add_listener(self, cb: Listener) -> None:
        self._listeners.append(cb)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        now = time.time_ns()
        if self._held is not None:
            self._held.append((name, data or {}, now))
            return
        self._deliver(name, data or {}, now)

    def _deliver(self, name: str, data: dict[str, Any], now: int) -> None:
        for cb in list(self._listeners):
            try:
                cb(name, data, now)
            except Exception:  # a listener must never break the machine
                pass

    @contextlib.contextmanager
    def held_events(self) -> Iterator[None]:
        """Events raised inside are delivered when it ends, stamped with the time they were
        raised: a downtime wakes no monitor thread (they would compete for the GIL)."""
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            for ev in held:
                self._deliver(*ev)

    # -- life cycle -------------------------------------------------------------------------
    def close(self) -> bool:
        """Quit, let a running snapshot or migration end (a migration is cancelled), flush the
        images, unmap guest RAM.  RAM is unmapped only when no thread can touch it any more:
        if the vCPU or a snapshot operation is still running after the grace time, it is left
        mapped (and reported on stderr) rather than pulled from under them.  Returns whether
        everything stopped (then the caller may close the block graph it gave the machine)."""
        self.quit()  # once only; every caller waits for the vCPU thread's end
        self.migration.cancel()
        idle = self.snapshots.shutdown(timeout=60)
        for node in self.graph.format_nodes():
            img = node.image
            if img is not None and not img.read_only:
                img.flush()
        vcpu_alive = self.runctl.vcpu_alive()
        if idle and not vcpu_alive:
            self.ram.close()
            return True
        print(f"snaplab: guest RAM left mapped at close ({'vCPU' if vcpu_alive else 'a snapshot operation'} "
              "still running)", file=sys.stderr)
        return False

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
