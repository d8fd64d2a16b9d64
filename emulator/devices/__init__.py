"""Devices: each owns its port window and saves/loads its own state.

A device gets only what it needs (a RAM accessor, a block image, a clock, a callback), never
the machine.  The port map (QEMU's ioport list for this machine):

=========  =====================================================
0x3F8-3FF  serial (16550-like transmitter)            serial.py
0x505      panic (pvpanic-like)                         lab.py
0x510      lab doorbell: publish the lab page           lab.py
0x520-52F  virtual clock and one-shot wake-up timer     timer.py
0x530-53F  DMA disk controller                          disk.py
0x540-55F  flash controller for pflash0/pflash1         flash.py
0x560-56F  fw_cfg: workload parameters for the firmware fwcfg.py
=========  =====================================================
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol


class PortHandler(Protocol):
    def port_in(self, port: int, size: int) -> int: ...

    def port_out(self, port: int, size: int, value: int) -> None: ...


class Device(Protocol):
    """What the machine's port bus and the vmstate stream need from a device."""

    name: str
    version: int
    ports: range

    def port_in(self, port: int, size: int) -> int: ...

    def port_out(self, port: int, size: int, value: int) -> None: ...

    def reset(self) -> None: ...

    def save_state(self) -> bytes: ...

    def load_state(self, data: bytes, version: int) -> None: ...


class PortBus:
    """Dispatches IN/OUT to the device owning the port; unclaimed ports read all-ones."""

    def __init__(self) -> None:
        self._map: dict[int, PortHandler] = {}
        self.devices: list[Device] = []

    def add(self, dev: Device) -> None:
        for p in dev.ports:
            other = next((d for d in self.devices if p in d.ports), None)
            if other is not None:
                raise ValueError(f"port {p:#x} claimed by {other.name} and {dev.name}")
            self._map[p] = dev
        self.devices.append(dev)

    def hold(self, devices: list[Device]) -> Callable[[], None]:
        """Guest accesses to these devices wait until the returned function is called: QEMU's
        bdrv_drained_begin()/end() seen from the guest, begun on one thread (the vCPU's, which
        issues every device access) and ended on another.  Costs nothing until then: the
        ports are routed through a waiting stand-in while held."""
        gate = threading.Event()
        held = {p: d for d in devices for p in d.ports}
        for p, d in held.items():
            self._map[p] = _Held(d, gate)

        def release() -> None:
            for p, d in held.items():
                self._map[p] = d
            gate.set()

        return release

    def port_in(self, port: int, size: int) -> int:
        dev = self._map.get(port)
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.port_in(port, size) & ((1 << (8 * size)) - 1)

    def port_out(self, port: int, size: int, value: int) -> None:
        dev = self._map.get(port)
        if dev is not None:
            dev.port_out(port, size, value)


class _Held:
    """A device whose accesses wait for a gate (:meth:`PortBus.hold`)."""

    def __init__(self, dev: Device, gate: threading.Event) -> None:
        self.dev = dev
        self.gate = gate

    def port_in(self, port: int, size: int) -> int:
        self.gate.wait()
        return self.dev.port_in(port, size)

    def port_out(self, port: int, size: int, value: int) -> None:
        self.gate.wait()
        self.dev.port_out(port, size, value)
