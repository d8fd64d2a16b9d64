"""The machine: the only module that composes CPU, RAM, devices, block nodes and firmware.

Threading rule (the one place it is written down):

* The vCPU runs ``emu_start`` on its own thread (``vcpu``), with the GIL released by ctypes.
  Device callbacks run on that thread, inside ``emu_start``.
* Every other thread (monitor, snapshot jobs, notebooks) changes the run state only through
  :meth:`Machine.stop`, :meth:`Machine.cont`, :meth:`Machine.system_reset` and
  :meth:`Machine.quit`.  ``stop`` sets a flag and calls ``uc.emu_stop`` until the vCPU thread
  reports itself parked (~0.1 ms), so when it returns no guest instruction and no device
  callback is running: CPU registers, RAM, devices and disks are quiescent and may be read
  or replaced by the caller, who then calls ``cont``.
* ``_cond`` guards the hand-off flags (``_want_run``, ``_stop_req``, ``_parked``, ``_quit``);
  nothing is held across ``emu_start``.
* Events (STOP, RESUME, RESET, SHUTDOWN, GUEST_PANICKED) go to listeners registered with
  :meth:`Machine.add_listener`; they may be called from any thread and must not block.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import struct
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from emulator.block.node import BlockGraph, BlockNode
from emulator.block.qcow2 import Qcow2Image
from emulator.block.raw import RawImage
from emulator.cpu import X86CPU, GuestFault, pack_cpu_state, unpack_cpu_state
from emulator.devices import PortBus
from emulator.devices.disk import DiskController
from emulator.devices.flash import FlashBank, FlashController
from emulator.devices.fwcfg import (
    KEY_BATCH_PAGES,
    KEY_DISK_SECTORS,
    KEY_NS_PER_BATCH,
    KEY_PATTERN,
    KEY_RAM_SIZE,
    KEY_SEED,
    KEY_WORKING_SET,
    KEY_WORKLOAD,
    FwCfg,
)
from emulator.devices.lab import LabPort
from emulator.devices.serial import Serial, Sink
from emulator.devices.timer import Timer
from emulator.errors import SnaplabError
from emulator.gc_control import freeze_long_lived
from emulator.guest import FW_BASE, FW_ENTRY, PATTERNS, WORKLOADS, WorkloadSpec, firmware_image
from emulator.memory import GuestRAM
from emulator.migration.migrate import Migration
from emulator.migration.savevm import SnapshotController
from emulator.migration.vmstate import Handler, SaveHandler
from emulator.qmp.client import QMPClient
from emulator.qmp.commands import Attachment, Monitor
from emulator.qmp.migration import install_migration_commands
from emulator.qmp.snapshot import install_snapshot_commands
from emulator.runstate import RunState

Listener = Callable[[str, dict[str, Any], int], None]  # name, data, time raised (ns since the epoch)


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


@dataclass
class DiskSpec:
    """``-device virtio-blk-pci,drive=NODE,id=ID``."""

    drive: str
    id: str = ""


@dataclass
class MachineConfig:
    ram_size: int = 256 << 20
    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec("idle"))
    pflash0: str | None = None  # node-name; None: the built-in firmware
    pflash1: str | None = None  # node-name of the variable store; None: no store
    disks: list[DiskSpec] = field(default_factory=list)
    loaders: list[tuple[str, int]] = field(default_factory=list)  # (file, guest address)
    hugepages: bool = True


class Machine:
    """A small x86-64 PC: RAM, firmware ROM + varstore flash, disk, serial, timer, lab port."""

    def __init__(self, config: MachineConfig | None = None, graph: BlockGraph | None = None,
                 serial: Sink | None = None) -> None:
        freeze_long_lived()  # before any guest runs: the one full collection stalls nobody (gc_control.py)
        self.config = config = config or MachineConfig()
        self.graph = graph or BlockGraph()
        self.state = RunState.PRELAUNCH
        self.fault: GuestFault | None = None
        self.clock = VirtualClock()
        self._listeners: list[Listener] = []
        self._held: list[tuple[str, dict[str, Any], int]] | None = None
        self._cond = threading.Condition()
        self._want_run = False
        self._stop_req = False
        self._parked = True
        self._quit = False
        self._work: deque[tuple[Callable[[], None], Future[None]]] = deque()  # run_on_cpu() items
        self._handlers: list[SaveHandler] | None = None  # savevm_handlers(), made once
        self._panic_code: int | None = None
        self._host_error: str | None = None  # stop_on_host_error()'s cause, for the vCPU thread
        self._thread: threading.Thread | None = None
        self._monitor: Monitor | None = None

        self.ram = GuestRAM(config.ram_size, hugepages=config.hugepages)
        self.cpu = X86CPU()
        _track(self)  # after the first Unicorn engine exists (see _track)
        self.cpu.map_ram(0, config.ram_size, self.ram.addr)
        fw = self._firmware(config.pflash0)
        self.firmware = fw
        self.cpu.map_rom(FW_BASE, fw)
        vars_node = self.graph.find(config.pflash1) if config.pflash1 else None
        banks = [FlashBank(None, fw, writable=False)]
        if vars_node is not None:
            img = vars_node.format_image
            banks.append(FlashBank(_FlashNode(img), writable=not vars_node.read_only))
        self.disk_nodes: list[BlockNode] = [self.graph.find(d.drive) for d in config.disks]
        if len({d.id for d in config.disks if d.id}) < len([d for d in config.disks if d.id]):
            raise SnaplabError("Duplicate device ID among the virtio-blk-pci devices")

        self.serial = Serial(serial)
        self.timer = Timer(self.clock.now_ns)
        self.lab = LabPort(self.ram.read, self.clock.now_ns, self._guest_panic)
        self.flash = FlashController(banks)
        self.disk = DiskController(self.ram, [n.format_image for n in self.disk_nodes])
        w = config.workload
        self.fwcfg = FwCfg({
            KEY_RAM_SIZE: config.ram_size,
            KEY_WORKLOAD: WORKLOADS.index(w.name),
            KEY_SEED: w.seed,
            KEY_WORKING_SET: w.pages(config.ram_size) * 4096,
            KEY_NS_PER_BATCH: w.ns_per_batch(),
            KEY_PATTERN: PATTERNS.index(w.pattern),
            KEY_DISK_SECTORS: self.disk.sectors(0),
            KEY_BATCH_PAGES: w.batch_pages,
        })
        self.bus = PortBus()
        for dev in (self.serial, self.lab, self.timer, self.disk, self.flash, self.fwcfg):
            self.bus.add(dev)
        self.cpu.hook_ports(self._port_in, self._port_out)
        self.cpu.reset(FW_ENTRY)
        self.snapshots = SnapshotController(self.graph, lambda: [a.node.node_name for a in self.block_attachments()],
                                            self, self.savevm_handlers, self.ram, self.MACHINE_NAME)
        self.migration = Migration(self.snapshots, self.emit)
        try:
            for path, addr in config.loaders:
                self.load_file(path, addr)
        except BaseException:
            self.ram.close()
            raise

    # -- composition helpers ------------------------------------------------------------
    def _firmware(self, node_name: str | None) -> bytes:
        if node_name is None:
            return firmware_image()
        node = self.graph.find(node_name)
        img = node.format_image
        data = img.read(0, img.size)
        if not 0 < len(data) <= 16 << 20:
            raise SnaplabError(f"pflash0 image '{node.filename}' must be between 1 byte and 16 MiB")
        return data

    def load_file(self, path: str, addr: int) -> None:
        """``-device loader,file=F,addr=A,force-raw=on``: copy a file into guest RAM."""
        size = os.path.getsize(path)
        if not self.ram.contains(addr, size):
            raise SnaplabError(f"loader: cannot load '{path}' ({size} bytes) at {addr:#x}: "
                               f"outside guest RAM ({self.ram.size} bytes)")
        chunk = 64 << 20
        with open(path, "rb") as f:
            pos = 0
            while True:
                data = f.read(chunk)
                if not data:
                    break
                self.ram.write(addr + pos, data)
                pos += len(data)

    def _port_in(self, port: int, size: int) -> int:
        try:
            return self.bus.port_in(port, size)
        except Exception as err:  # a device bug must not kill the vCPU thread
            self._device_bug(err)
            return 0

    def _port_out(self, port: int, size: int, value: int) -> None:
        try:
            self.bus.port_out(port, size, value)
        except Exception as err:
            self._device_bug(err)

    def _device_bug(self, err: Exception) -> None:
        self.cpu.pending_fault = GuestFault(self.cpu.pc, f"device error: {type(err).__name__}: {err}", False)
        self.cpu.stop()

    def _guest_panic(self, code: int) -> None:
        self._panic_code = code
        self.cpu.stop()

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

    def block_attachments(self) -> list[Attachment]:
        """The BlockBackends: pflash0, pflash1, then each virtio-blk-pci disk (query-block order)."""
        out = []
        if self.config.pflash0:
            out.append(Attachment("/machine/system.flash0", self.graph.find(self.config.pflash0), False))
        if self.config.pflash1:
            out.append(Attachment("/machine/system.flash1", self.graph.find(self.config.pflash1), False))
        for i, (spec, node) in enumerate(zip(self.config.disks, self.disk_nodes, strict=True)):
            qdev = (f"/machine/peripheral/{spec.id}/virtio-backend" if spec.id
                    else f"/machine/peripheral-anon/device[{i}]/virtio-backend")
            out.append(Attachment(qdev, node, True))
        return out

    # -- events ---------------------------------------------------------------------------
    def add_listener(self, cb: Listener) -> None:
        self._listeners.append(cb)

    def remove_listener(self, cb: Listener) -> None:
        if cb in self._listeners:
            self._listeners.remove(cb)

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
            fault = self.cpu.run() if self._host_error is None else None
            if self._host_error is not None:
                cause, self._host_error = self._host_error, None
                fault = GuestFault(self.cpu.pc, cause, False)
            elif self._panic_code is not None:
                code, self._panic_code = self._panic_code, None
                fault = GuestFault(self.cpu.pc, f"guest reported panic code {code}", True)
            with self._cond:
                stop_req = self._stop_req or bool(self._work)
            if fault is not None:
                self._guest_stopped(fault)
                continue
            if stop_req:
                continue
            if self.cpu.halted():
                self._halt_wait()

    def _halt_wait(self) -> None:
        deadline = self.timer.take_deadline()
        wait = 0.001
        if deadline:
            wait = min(max((deadline - self.clock.now_ns()) / 1e9, 0.0), 1.0)
        if wait > 0:
            with self._cond:
                if not self._stop_req and not self._quit and not self._work:
                    self._cond.wait(wait)

    def _guest_stopped(self, fault: GuestFault) -> None:
        with self._cond:
            self._want_run = False
        self.clock.stop()
        self.fault = fault
        self.state = RunState.GUEST_PANICKED if fault.panicked else RunState.INTERNAL_ERROR
        if fault.panicked:
            self.emit("GUEST_PANICKED", {"action": "pause", "info": {"type": "snaplab", "pc": fault.pc,
                                                                  "cause": fault.cause}})
        self.emit("STOP")

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
        self.cpu.stop()
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
                    self.cpu.stop()

    def stop_on_host_error(self, cause: str) -> None:
        """A host-side failure the guest must not run past (a lazy restore that cannot read the
        snapshot): the vCPU stops at its next instruction boundary, in internal-error with
        ``cause``, as for a guest fault (safe from any thread)."""
        self._host_error = cause
        self.cpu.stop()

    def hold_block_io(self) -> Callable[[], None]:
        """The guest's disk and flash accesses wait until the returned function is called."""
        return self.bus.hold([self.disk, self.flash])

    def _park(self) -> None:
        """Stop the vCPU and wait until it is parked (no guest code, no device callback)."""
        with self._cond:
            self._stop_req = True
            self._want_run = False
            self._cond.notify_all()
        if self._thread is not None:
            while True:
                self.cpu.stop()
                with self._cond:
                    if self._cond.wait_for(lambda: self._parked, timeout=0.002):
                        break
        with self._cond:
            self._stop_req = False

    # -- run control (QMP stop/cont/system_reset/quit) ------------------------------------
    @property
    def running(self) -> bool:
        return self.state == RunState.RUNNING

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
        self.clock.stop()
        self.serial.flush()
        self.state = state
        self.emit("STOP")
        return True

    def vm_resume(self, state: RunState) -> None:
        """vm_resume(): run again if ``state`` was running, else just go back to ``state``."""
        if state == RunState.RUNNING:
            self.state = RunState.PAUSED
            self.cont()
        else:
            self.state = state

    def reset_for_load(self) -> None:
        """qemu_system_reset(SHUTDOWN_CAUSE_SNAPSHOT_LOAD): devices and CPU, no RESET event."""
        self.cpu.reset(FW_ENTRY)
        for dev in self.bus.devices:
            dev.reset()
        self.fault = None

    def vclock_ns(self) -> int:
        return self.clock.now_ns()

    def set_vclock_ns(self, ns: int) -> None:
        self.clock.set(ns)

    def enable_write_tracking(self, perms_for: Callable[[int, bool], int]) -> None:
        """Software write tracking for a snapshot window (vCPU parked: called in a downtime)."""
        self.cpu.enable_tlb_tracking(perms_for)

    def disable_write_tracking(self) -> None:
        """Back to Unicorn's own TLB: needs the vCPU parked for an instant (no events)."""
        if self.state == RunState.RUNNING:
            self._park()
            try:
                self.cpu.disable_tlb_tracking()
            finally:
                with self._cond:
                    self._want_run = True
                    self._cond.notify_all()
        else:
            self.cpu.disable_tlb_tracking()

    # -- VM state handlers (the sections of the vmstate stream) ---------------------------
    MACHINE_NAME = "snaplab-pc-1.0"

    def savevm_handlers(self) -> list[SaveHandler]:
        """One handler per component, in stream order; RAM is streamed separately.  Made
        once: the device set is fixed when the machine is built (a load binds to this list)."""
        if self._handlers is None:
            self._handlers = self._make_savevm_handlers()
        return self._handlers

    def _make_savevm_handlers(self) -> list[SaveHandler]:
        hs: list[SaveHandler] = [
            Handler("machine", 1, self._save_machine, self._load_machine),
            Handler("cpu", 1, lambda: pack_cpu_state(self.cpu.get_state()),
                    lambda d, v: self.cpu.set_state(unpack_cpu_state(d)), capture_fn=self._capture_cpu,
                    prepare_fn=lambda d, v: self.cpu.prepare_state(unpack_cpu_state(d))),
            Handler("clock", 1, lambda: struct.pack(">Q", self.clock.now_ns()),
                    lambda d, v: self.clock.set(struct.unpack(">Q", d)[0])),
        ]
        for dev in self.bus.devices:
            hs.append(Handler(dev.name, dev.version, dev.save_state, dev.load_state))
        return hs

    def _capture_cpu(self) -> Callable[[], bytes]:
        regs = self.cpu.capture_state()
        return lambda: pack_cpu_state(regs())

    def _save_machine(self) -> bytes:
        w = self.config.workload
        return struct.pack(">QQ", self.config.ram_size, len(self.disk_nodes)) + w.name.encode()

    def _load_machine(self, data: bytes, version: int) -> None:
        ram, ndisks = struct.unpack_from(">QQ", data)
        if ram != self.config.ram_size:
            raise ValueError(f"RAM size {ram} in the stream, {self.config.ram_size} here")
        if ndisks != len(self.disk_nodes):
            raise ValueError(f"{ndisks} disks in the stream, {len(self.disk_nodes)} here")

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
        self.clock.start()
        self.emit("RESUME")
        with self._cond:
            self._want_run = True
            self._cond.notify_all()

    def system_reset(self, reason: str = "host-qmp-system-reset") -> None:
        was_running = self.state == RunState.RUNNING
        if was_running:
            self._park()
        self.cpu.reset(FW_ENTRY)
        for dev in self.bus.devices:
            dev.reset()
        self.fault = None
        self.emit("RESET", {"guest": False, "reason": reason})
        if was_running:
            with self._cond:
                self._want_run = True
                self._cond.notify_all()
        else:
            self.state = RunState.PRELAUNCH

    def quit(self, reason: str = "host-qmp-quit") -> None:
        if self.state == RunState.RUNNING:
            self._park()
            self.clock.stop()
        self.state = RunState.SHUTDOWN
        self.serial.flush()
        self.emit("SHUTDOWN", {"guest": False, "reason": reason})
        with self._cond:
            self._quit = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def close(self) -> None:
        """Quit, let a running snapshot or migration end (a migration is cancelled), flush the
        images, unmap guest RAM.  RAM is unmapped only when no thread can touch it any more:
        if the vCPU or a snapshot operation is still running after the grace time, it is left
        mapped (and reported on stderr) rather than pulled from under them."""
        if self.state != RunState.SHUTDOWN:
            self.quit()
        self.migration.cancel()
        idle = self.snapshots.shutdown(timeout=60)
        for node in self.graph.format_nodes():
            img = node.image
            if img is not None and not img.read_only:
                img.flush()
        vcpu_alive = self._thread is not None and self._thread.is_alive()
        if idle and not vcpu_alive:
            self.ram.close()
        else:
            print(f"snaplab: guest RAM left mapped at close ({'vCPU' if vcpu_alive else 'a snapshot operation'} "
                  "still running)", file=sys.stderr)

    def query_status(self) -> dict[str, Any]:
        """query-status in QEMU 7.2's shape."""
        return {"status": self.state.value, "singlestep": False, "running": self.state == RunState.RUNNING}

    def run_instructions(self, count: int) -> GuestFault | None:
        """Execute exactly ``count`` instructions on the caller's thread (machine not running).

        Deterministic stepping for tests and experiments (``emu_start(count=N)``).
        """
        if self.state == RunState.RUNNING:
            raise SnaplabError("run_instructions needs a stopped machine")
        fault = self.cpu.run(count)
        if self._panic_code is not None:
            code, self._panic_code = self._panic_code, None
            fault = GuestFault(self.cpu.pc, f"guest reported panic code {code}", True)
        return fault

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LIVE: weakref.WeakSet[Machine] = weakref.WeakSet()
_exit_hook = False


def _track(m: Machine) -> None:
    """Remember a machine for :func:`_park_all_vcpus`.  The hook is registered after the first
    Unicorn engine exists: atexit runs hooks last-registered first, and unicorn frees its
    engines from a weakref.finalize hook that registers itself with the first engine."""
    global _exit_hook
    _LIVE.add(m)
    if not _exit_hook:
        atexit.register(_park_all_vcpus)
        _exit_hook = True


def _park_all_vcpus() -> None:
    """At interpreter exit, stop every vCPU that is still running (a notebook kernel or a
    script that never closed its machine): a daemon thread left inside emu_start while the
    interpreter frees the Unicorn engine crashes the process on its way out."""
    for m in list(_LIVE):
        try:
            if m.state != RunState.SHUTDOWN:
                m.quit("host-signal")
        except Exception:  # exiting anyway: never let one machine keep the others running
            pass


class _FlashNode:
    """Adapts a format image to what the flash controller writes through to."""

    def __init__(self, img: Qcow2Image | RawImage) -> None:
        self.img = img
        self.size = img.size

    def read(self, offset: int, length: int) -> bytes:
        return self.img.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.img.write(offset, data)
