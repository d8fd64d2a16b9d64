"""The board: snaplab's PC wired together (guest RAM, firmware, flash, devices, disks).

Owns what the machine is made of and how its parts are connected: guest RAM and the vCPU's
memory map (RAM, firmware ROM), the flash banks (firmware and variable store), the devices on
the port bus and the port dispatch to them, the disks' block backends (query-block's
attachments), ``-device loader`` files, the power-on reset of CPU and devices, and the list of
savevm handlers (one per component, in stream order).  It has no thread and no run state: when
the guest may run is the run control's business (runctl.py), and the board is told only
through the callables it is built with (the virtual clock, the guest-panic latch).

Must not import emulator.machine, emulator.runctl or the QMP monitor (which reads the
attachments through its own protocol); machine.py composes them.

Mirrors QEMU's hw/i386/pc.c and pc_piix.c (the PC machine's RAM, devices and
``MachineClass`` name), hw/i386/pc_sysfw.c (pflash0/pflash1 as the firmware and its variable
store) and hw/core/generic-loader.c (``-device loader``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from emulator.block.copy_on_read import CopyOnRead
from emulator.block.node import BlockGraph, BlockNode
from emulator.block.qcow2 import Qcow2Image
from emulator.block.raw import RawImage
from emulator.cpu import X86CPU, GuestFault, pack_cpu_state, unpack_cpu_state
from emulator.devices import PortBus
from emulator.devices.disk import DiskController, OnError
from emulator.devices.doorbell import native_wanted
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
    KEY_WS_OFFSET,
    FwCfg,
)
from emulator.devices.lab import LabPort
from emulator.devices.serial import Serial, Sink
from emulator.devices.timer import Timer
from emulator.errors import SnaplabError
from emulator.guest import (
    FW_BASE,
    FW_ENTRY,
    LAB_PAGE,
    PATTERNS,
    WORKLOADS,
    WorkloadSpec,
    firmware_image,
)
from emulator.memory import GuestRAM
from emulator.migration.vmstate import Handler, SaveHandler

MACHINE_NAME = "snaplab-pc-1.0"  # the machine type a vmstate stream names


@dataclass
class DiskSpec:
    """``-device virtio-blk-pci,drive=NODE,id=ID,werror=...,rerror=...`` (``auto``: the
    BlockBackend's, by default ``enospc`` for writes and ``report`` for reads)."""

    drive: str
    id: str = ""
    werror: str = "auto"
    rerror: str = "auto"

    def policies(self) -> tuple[str, str]:
        """(werror, rerror) with ``auto`` resolved (blkconf_apply_backend_options)."""
        return (self.werror if self.werror != "auto" else "enospc",
                self.rerror if self.rerror != "auto" else "report")


@dataclass
class MachineConfig:
    ram_size: int = 256 << 20
    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec("idle"))
    pflash0: str | None = None  # node-name; None: the built-in firmware
    pflash1: str | None = None  # node-name of the variable store; None: no store
    disks: list[DiskSpec] = field(default_factory=list)
    loaders: list[tuple[str, int]] = field(default_factory=list)  # (file, guest address)
    hugepages: bool = True
    accel: str = "tcg"  # "qtest": no guest code runs, the virtual clock stays at 0 (emulator/qtest.py)


@dataclass(frozen=True)
class Attachment:
    """A BlockBackend: a device's view of a node (query-block)."""

    qdev: str
    node: BlockNode
    virtio: bool
    io_status: str = "ok"  # virtio-blk's (blk_iostatus): ok, failed, nospace


class GuestClock(Protocol):
    """The virtual clock, as the devices and the savevm handlers see it."""

    def now_ns(self) -> int: ...

    def set(self, ns: int) -> None: ...

    def watch(self, cb: Callable[[int | None], None]) -> None: ...


class Board:
    """A small x86-64 PC: RAM, firmware ROM + varstore flash, disk, serial, timer, lab port.

    ``on_panic`` is called (on the vCPU thread, from the lab port) when the guest reports a
    panic code.
    """

    def __init__(self, config: MachineConfig, graph: BlockGraph, serial: Sink | None, clock: GuestClock,
                 on_panic: Callable[[int], None], on_disk_error: OnError | None = None) -> None:
        self.config = config
        self.graph = graph
        self.clock = clock
        self._handlers: list[SaveHandler] | None = None  # savevm_handlers(), made once
        self.ram = GuestRAM(config.ram_size, hugepages=config.hugepages)
        self.cpu = X86CPU()
        self.cpu.map_ram(0, config.ram_size, self.ram.addr)
        fw = self._firmware(config.pflash0)
        self.cpu.map_rom(FW_BASE, fw)
        vars_node = graph.find(config.pflash1) if config.pflash1 else None
        banks = [FlashBank(None, fw, writable=False)]
        if vars_node is not None:
            img = vars_node.format_image
            banks.append(FlashBank(_FlashNode(img), writable=not vars_node.read_only))
        self.disk_nodes: list[BlockNode] = [graph.find(d.drive) for d in config.disks]
        if len({d.id for d in config.disks if d.id}) < len([d for d in config.disks if d.id]):
            raise SnaplabError("Duplicate device ID among the virtio-blk-pci devices")

        self.serial = Serial(serial)
        self.timer = Timer(clock.now_ns)
        self.lab = LabPort(self.ram.read, clock.now_ns, on_panic)
        self.flash = FlashController(banks)
        self.disk = DiskController(self.ram, [n.format_image for n in self.disk_nodes],
                                   policies=[d.policies() for d in config.disks], on_error=on_disk_error)
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
            KEY_WS_OFFSET: w.ws_offset,
        })
        self.bus = PortBus()
        for dev in (self.serial, self.lab, self.timer, self.disk, self.flash, self.fwcfg):
            self.bus.add(dev)
        self.lab.doorbell.set_counters(self.ram.addr + LAB_PAGE)
        self.cpu.hook_ports(self._port_in, self._port_out, self.lab.doorbell if native_wanted() else None)
        clock.watch(self.lab.doorbell.set_clock_offset)
        self.cpu.reset(FW_ENTRY)

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
        try:
            size = os.path.getsize(path)
        except OSError:
            raise SnaplabError(f"Cannot load specified image {path}") from None  # (QEMU's loader)
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

    # -- ports (on the vCPU thread, inside emu_start) ---------------------------------------
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

    def reset(self) -> None:
        """The CPU and every device back to power-on."""
        self.cpu.reset(FW_ENTRY)
        for dev in self.bus.devices:
            dev.reset()

    def retry_disk(self) -> None:
        """The disk's request left in flight by a stop policy, done again as the guest
        resumes (on the vCPU thread), after any drain a snapshot holds on the disk."""
        if self.disk.pending is not None:
            self.bus.wait_released(self.disk)
            self.disk.retry()

    def hold_block_io(self) -> Callable[[], None]:
        """The guest's disk and flash accesses wait until the returned function is called."""
        return self.bus.hold([self.disk, self.flash])

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
            out.append(Attachment(qdev, node, True, self.disk.io_status[i]))
        return out

    # -- VM state handlers (the sections of the vmstate stream) ---------------------------
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
            Handler("clock", 1, lambda: struct.pack(">Q", self.clock.now_ns()), None, prepare_fn=self._prepare_clock),
        ]
        for dev in self.bus.devices:
            hs.append(Handler(dev.name, dev.version, dev.save_state, None, prepare_fn=dev.prepare_state))
        return hs

    def _prepare_clock(self, data: bytes, version: int) -> Callable[[], None]:
        (ns,) = struct.unpack(">Q", data)
        return lambda: self.clock.set(ns)

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


class _FlashNode:
    """Adapts a format image to what the flash controller writes through to."""

    def __init__(self, img: Qcow2Image | RawImage | CopyOnRead) -> None:
        self.img = img
        self.size = img.size

    def read(self, offset: int, length: int) -> bytes:
        return self.img.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.img.write(offset, data)
