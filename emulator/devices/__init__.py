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


class Device(Protocol):
    """What the machine's port bus and the vmstate stream need from a device."""

    name: str
    version: int
    ports: range

    def port_in(self, port: int, size: int) -> int: ...

    def port_out(self, port: int, size: int, value: int) -> None: ...

    def reset(self) -> None: ...

    def save_state(self) -> bytes: ...

    def prepare_state(self, data: bytes, version: int) -> Callable[[], None]:
        """The device's load: decode and check now, change the device when the returned
        function is called (a load decodes every section before it applies any)."""
        ...


class PortBus:
    """Dispatches IN/OUT to the device owning the port; unclaimed ports read all-ones."""

    def __init__(self) -> None:
        self._map: dict[int, Device] = {}
        self.devices: list[Device] = []
        self._gate: threading.Event | None = None  # set while some devices are held (hold())
        self._held_ports: frozenset[int] = frozenset()
        self._ports_of: dict[tuple[int, ...], frozenset[int]] = {}  # hold()'s port sets, made once

    def add(self, dev: Device) -> None:
        for p in dev.ports:
            if p in self._map:
                raise ValueError(f"port {p:#x} claimed by {self._map[p].name} and {dev.name}")
            self._map[p] = dev
        self.devices.append(dev)

    def hold(self, devices: list[Device]) -> Callable[[], None]:
        """Guest accesses to these devices wait until the returned function is called: QEMU's
        bdrv_drained_begin()/end() seen from the guest, begun on one thread (the vCPU's, which
        issues every device access) and ended on another.  One attribute to set (an access
        checks it), so it costs a downtime next to nothing."""
        gate = threading.Event()
        key = tuple(id(d) for d in devices)
        ports = self._ports_of.get(key)
        if ports is None:
            ports = self._ports_of[key] = frozenset(p for d in devices for p in d.ports)
        self._held_ports = ports
        self._gate = gate

        def release() -> None:
            self._gate = None
            gate.set()

        return release

    def wait_released(self, dev: Device) -> None:
        """Return once ``dev`` is not held (:meth:`hold`): for device work that does not come
        through a port access, such as a request retried when the guest resumes."""
        gate = self._gate
        if gate is not None and dev.ports[0] in self._held_ports:
            gate.wait()

    def port_in(self, port: int, size: int) -> int:
        gate = self._gate
        if gate is not None and port in self._held_ports:
            gate.wait()
        dev = self._map.get(port)
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.port_in(port, size) & ((1 << (8 * size)) - 1)

    def port_out(self, port: int, size: int, value: int) -> None:
        gate = self._gate
        if gate is not None and port in self._held_ports:
            gate.wait()
        dev = self._map.get(port)
        if dev is not None:
            dev.port_out(port, size, value)
