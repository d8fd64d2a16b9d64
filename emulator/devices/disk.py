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

A request the disk fails is handled by the unit's error policy, QEMU's ``werror``/``rerror``
(``blk_get_error_action()``; defaults ``werror=enospc``, ``rerror=report``): ``report``
completes it with S_IOERR, ``ignore`` with S_OK, ``stop`` (and ``enospc`` on ENOSPC) keeps it
*pending*: its status stays as the guest set it, IN 0x538 reads S_PENDING, the machine stops
in ``io-error``, and the request is tried again when the guest resumes (:meth:`retry`, QEMU's
``virtio_blk_dma_restart_cb``).  A pending request is part of the device's VM state, as
QEMU's virtio-blk saves its failed requests, so a snapshot taken in ``io-error`` retries it
after a load.  Every failure is told to ``on_error`` (BLOCK_IO_ERROR).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import Protocol

from emulator.errors import BlockIOError, SnaplabError

SECTOR = 512
MAX_SECTORS = 2048
S_OK, S_IOERR, S_UNSUPP, S_BADADDR, S_RANGE, S_READONLY, S_NODEV = 0, 1, 2, 3, 4, 5, 6
S_PENDING = 0xFFFFFFFF  # IN 0x538 while a failed request waits for the guest's resume (werror=stop)
OP_READ, OP_WRITE, OP_FLUSH = 1, 2, 3
ON_ERROR = ("report", "ignore", "enospc", "stop")  # BlockdevOnError, "auto" resolved by the board
# (unit, op, count, sector, buffer, descriptor address) of the request a stop left pending
_PENDING = struct.Struct("<IIIQQQ")

# on_error(unit, operation "read"|"write", action "report"|"ignore"|"stop", nospace, reason)
OnError = Callable[[int, str, str, bool, str], None]


def error_action(policy: str, err: int) -> str:
    """blk_get_error_action(): what a failed request with ``errno`` ``err`` does under ``policy``."""
    if policy == "enospc":
        return "stop" if err == errno.ENOSPC else "report"
    return policy


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
    version = 2  # 2: a request left pending by werror/rerror=stop is part of the state
    ports = range(0x530, 0x540)

    def __init__(self, ram: RamAccess, images: list[DiskImage],
                 on_io: Callable[[str, int, int], None] | None = None,
                 policies: list[tuple[str, str]] | None = None, on_error: OnError | None = None) -> None:
        self.ram = ram
        self.images = images
        self.on_io = on_io
        self.on_error = on_error
        self.policies = policies or [("enospc", "report")] * len(images)  # (werror, rerror) per unit
        self.desc_low = 0
        self.desc_addr = 0
        self.status = S_OK
        self.requests = 0
        self.pending: tuple[int, int, int, int, int, int] | None = None
        self.io_status = ["ok"] * len(images)  # query-block's io-status: ok, failed, nospace

    def sectors(self, unit: int = 0) -> int:
        return self.images[unit].size // SECTOR if unit < len(self.images) else 0

    def port_in(self, port: int, size: int) -> int:
        if port != 0x538:
            return 0
        return S_PENDING if self.pending is not None else self.status

    def port_out(self, port: int, size: int, value: int) -> None:
        if port == 0x530:
            self.desc_low = value & 0xFFFFFFFF
        elif port == 0x534:
            self.desc_addr = ((value & 0xFFFFFFFF) << 32) | self.desc_low
        elif port == 0x538 and self.pending is None:  # one request at a time: a pending one waits for resume
            self._request(self.desc_addr)

    def _request(self, desc: int) -> None:
        if not self.ram.contains(desc, 32):
            self.status = S_BADADDR
            return
        op, count, sector, buf, _, unit = struct.unpack("<IIQQII", self.ram.read(desc, 32))
        self.requests += 1
        self._run(desc, unit, op, count, sector, buf)

    def _run(self, desc: int, unit: int, op: int, count: int, sector: int, buf: int) -> None:
        """One request to its end (a status in the descriptor), or left pending by a stop."""
        status = self._do(unit, op, count, sector, buf)
        if status is None:
            self.pending = (unit, op, count, sector, buf, desc)
            return
        self.status = status
        if self.ram.contains(desc + 24, 4):
            self.ram.write(desc + 24, struct.pack("<I", status))

    def retry(self) -> None:
        """virtio_blk_dma_restart_cb(): the request a stop left pending, tried again (the guest
        is about to run again; on the vCPU thread).  It may stop the machine again."""
        if self.pending is None:
            return
        unit, op, count, sector, buf, desc = self.pending
        self.pending = None
        self._run(desc, unit, op, count, sector, buf)

    def _failed(self, unit: int, op: int, err: SnaplabError) -> int | None:
        """A request the disk failed: its status under the unit's policy (None: pending)."""
        code = err.errno if isinstance(err, BlockIOError) else None
        code = code if code is not None else errno.EIO
        is_read = op == OP_READ
        action = error_action(self.policies[unit][1 if is_read else 0], code)
        reason = err.strerror if isinstance(err, BlockIOError) else str(err)
        if action == "stop" and self.io_status[unit] == "ok":
            self.io_status[unit] = "nospace" if code == errno.ENOSPC else "failed"
        if self.on_error is not None:
            self.on_error(unit, "read" if is_read else "write", action, code == errno.ENOSPC, reason)
        return {"report": S_IOERR, "ignore": S_OK}.get(action)

    def _do(self, unit: int, op: int, count: int, sector: int, buf: int) -> int | None:
        if unit >= len(self.images):
            return S_NODEV
        img = self.images[unit]
        if op == OP_FLUSH:
            try:
                img.flush()
            except SnaplabError as err:
                return self._failed(unit, op, err)
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
        except SnaplabError as err:
            return self._failed(unit, op, err)
        if self.on_io is not None:
            self.on_io("read" if op == OP_READ else "write", sector, count)
        return S_OK

    def reset_io_status(self) -> None:
        """blk_iostatus_reset() on every unit (QMP ``cont`` does it)."""
        self.io_status = ["ok"] * len(self.images)

    def reset(self) -> None:
        """A reset drops a pending request, as a virtio reset drops the queue's requests."""
        self.desc_low = self.desc_addr = 0
        self.status = S_OK
        self.pending = None

    def save_state(self) -> bytes:
        out = struct.pack("<QQIQ", self.desc_low, self.desc_addr, self.status, self.requests)
        if self.pending is None:
            return out + b"\0"
        return out + b"\1" + _PENDING.pack(*self.pending)

    def prepare_state(self, data: bytes, version: int) -> Callable[[], None]:
        """Every field decoded (a pending request's too) before anything changes."""
        head = struct.calcsize("<QQIQ")
        desc_low, desc_addr, status, requests = struct.unpack_from("<QQIQ", data)
        pending = None
        if version >= 2 and data[head:head + 1] == b"\1":
            pending = _PENDING.unpack_from(data, head + 1)

        def apply() -> None:
            self.desc_low, self.desc_addr, self.status, self.requests = desc_low, desc_addr, status, requests
            self.pending = pending
        return apply
