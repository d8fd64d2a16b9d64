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

from typing import Protocol


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
        self._map: dict[int, Device] = {}
        self.devices: list[Device] = []

    def add(self, dev: Device) -> None:
        for p in dev.ports:
            if p in self._map:
                raise ValueError(f"port {p:#x} claimed by {self._map[p].name} and {dev.name}")
            self._map[p] = dev
        self.devices.append(dev)

    def port_in(self, port: int, size: int) -> int:
        dev = self._map.get(port)
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.port_in(port, size) & ((1 << (8 * size)) - 1)

    def port_out(self, port: int, size: int, value: int) -> None:
        dev = self._map.get(port)
        if dev is not None:
            dev.port_out(port, size, value)
