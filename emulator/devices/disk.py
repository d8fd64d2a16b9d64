"""DMA disk controller over a block node (a reduced virtio-blk: one descriptor, synchronous).

The guest writes the guest-physical address of a 32-byte descriptor to 0x530 (low) and 0x534
(high) and rings 0x538::

    +0  u32 op      1 read, 2 write, 3 flush
    +4  u32 count   sectors of 512 bytes, 1..2048
    +8  u64 sector
    +16 u64 buffer  guest-physical address
    +24 u32 status  written by the device (also readable at IN 0x538)
    +28 u32 unit    which disk (one per ``-device virtio-blk-pci``), 0 first

Every guest-supplied field is validated: a bad request completes with an error status and
never raises on the host nor touches anything outside guest RAM or the disk.  Requests
complete before the OUT returns, so there is never a request in flight when the vCPU is
stopped: draining is free.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

from emulator.errors import SnaplabError

SECTOR = 512
MAX_SECTORS = 2048
S_OK, S_IOERR, S_UNSUPP, S_BADADDR, S_RANGE, S_READONLY, S_NODEV = 0, 1, 2, 3, 4, 5, 6
OP_READ, OP_WRITE, OP_FLUSH = 1, 2, 3


class DiskImage(Protocol):
    size: int
    read_only: bool

    def readinto(self, offset: int, buf: bytearray) -> None: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...


class RamAccess(Protocol):
    def contains(self, addr: int, n: int) -> bool: ...

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None: ...


class DiskController:
    name = "disk"
    version = 1
    ports = range(0x530, 0x540)

    def __init__(self, ram: RamAccess, images: list[DiskImage],
                 on_io: Callable[[str, int, int], None] | None = None) -> None:
        self.ram = ram
        self.images = images
        self.on_io = on_io
        self.desc_low = 0
        self.desc_addr = 0
        self.status = S_OK
        self.requests = 0

    def sectors(self, unit: int = 0) -> int:
        return self.images[unit].size // SECTOR if unit < len(self.images) else 0

    def port_in(self, port: int, size: int) -> int:
        return self.status if port == 0x538 else 0

    def port_out(self, port: int, size: int, value: int) -> None:
        if port == 0x530:
            self.desc_low = value & 0xFFFFFFFF
        elif port == 0x534:
            self.desc_addr = ((value & 0xFFFFFFFF) << 32) | self.desc_low
        elif port == 0x538:
            self.status = self._request(self.desc_addr)

    def _request(self, desc: int) -> int:
        if not self.ram.contains(desc, 32):
            return S_BADADDR
        op, count, sector, buf, _, unit = struct.unpack("<IIQQII", self.ram.read(desc, 32))
        status = self._do(unit, op, count, sector, buf)
        self.ram.write(desc + 24, struct.pack("<I", status))
        self.requests += 1
        return status

    def _do(self, unit: int, op: int, count: int, sector: int, buf: int) -> int:
        if unit >= len(self.images):
            return S_NODEV
        img = self.images[unit]
        if op == OP_FLUSH:
            try:
                img.flush()
            except SnaplabError:
                return S_IOERR
            return S_OK
        if op not in (OP_READ, OP_WRITE):
            return S_UNSUPP
        if not 1 <= count <= MAX_SECTORS:
            return S_RANGE
        if sector >= self.sectors(unit) or sector + count > self.sectors(unit):
            return S_RANGE
        n = count * SECTOR
        if not self.ram.contains(buf, n):
            return S_BADADDR
        try:
            if op == OP_READ:
                data = bytearray(n)
                img.readinto(sector * SECTOR, data)
                self.ram.write(buf, data)
            else:
                if img.read_only:
                    return S_READONLY
                img.write(sector * SECTOR, self.ram.read(buf, n))
        except SnaplabError:
            return S_IOERR
        if self.on_io is not None:
            self.on_io("read" if op == OP_READ else "write", sector, count)
        return S_OK

    def reset(self) -> None:
        self.desc_low = self.desc_addr = 0
        self.status = S_OK

    def save_state(self) -> bytes:
        return struct.pack("<QQIQ", self.desc_low, self.desc_addr, self.status, self.requests)

    def load_state(self, data: bytes, version: int) -> None:
        self.desc_low, self.desc_addr, self.status, self.requests = struct.unpack("<QQIQ", data)
