"""Flash controller for pflash0 (firmware, read-only) and pflash1 (the variable store).

Like QEMU's hw/block/pflash_cfi01.c in spirit, through a small port interface instead of
CFI commands: OUT 0x540 selects the bank (0 or 1), OUT 0x544 sets the byte offset, IN 0x548
reads a dword and advances, OUT 0x548 programs a dword and advances (NOR semantics: bits can
only be cleared, ``new = old & value``), OUT 0x54C with 1 erases the 4 KiB sector at the
offset to 0xFF, IN 0x54C returns the status of the last operation, IN 0x550 the bank size.
Programs and erases are written through to the bank's block node at once, as QEMU's pflash
writes its backing drive.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Protocol

import numpy as np

from emulator.errors import BlockError

log = logging.getLogger(__name__)

SECTOR = 4096
OK, E_RANGE, E_READ_ONLY, E_ALIGN, E_IO, E_NODEV = 0, 1, 2, 3, 4, 5


class FlashBacking(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class FlashBank:
    """One flash chip: its bytes cached in memory, written through to the backing node."""

    def __init__(self, backing: FlashBacking | None, data: bytes | None = None, *, writable: bool) -> None:
        self.backing = backing
        self.writable = writable and backing is not None
        if data is None:
            data = backing.read(0, backing.size) if backing is not None else b""
        self.data = bytearray(data)


class FlashController:
    name = "flash"
    version = 1
    ports = range(0x540, 0x560)

    def __init__(self, banks: list[FlashBank]) -> None:
        self.banks = banks
        self.selected = 0
        self.offset = 0
        self.status = OK

    def _bank(self) -> FlashBank | None:
        return self.banks[self.selected] if self.selected < len(self.banks) else None

    def port_in(self, port: int, size: int) -> int:
        bank = self._bank()
        if port == 0x548:
            if bank is None:
                self.status = E_NODEV
                return 0xFFFFFFFF
            if self.offset % 4 or self.offset + 4 > len(bank.data):
                self.status = E_RANGE if self.offset % 4 == 0 else E_ALIGN
                return 0xFFFFFFFF
            (val,) = struct.unpack_from("<I", bank.data, self.offset)
            self.offset += 4
            self.status = OK
            return int(val)
        if port == 0x54C:
            return self.status
        if port == 0x550:
            return len(bank.data) if bank is not None else 0
        return 0

    def port_out(self, port: int, size: int, value: int) -> None:
        if port == 0x540:
            self.selected = value & 0xFF
        elif port == 0x544:
            self.offset = value & 0xFFFFFFFF
        elif port == 0x548:
            self.status = self._program(value & 0xFFFFFFFF)
        elif port == 0x54C and value == 1:
            self.status = self._erase()

    def _check_write(self, bank: FlashBank | None, length: int, align: int) -> int:
        if bank is None:
            return E_NODEV
        if not bank.writable:
            return E_READ_ONLY
        if self.offset % align:
            return E_ALIGN
        if self.offset + length > len(bank.data):
            return E_RANGE
        return OK

    def _persist(self, bank: FlashBank, off: int, length: int) -> int:
        assert bank.backing is not None
        try:
            bank.backing.write(off, bytes(bank.data[off:off + length]))
        except BlockError:
            return E_IO
        return OK

    def _program(self, value: int) -> int:
        bank = self._bank()
        err = self._check_write(bank, 4, 4)
        if err:
            return err
        assert bank is not None
        off = self.offset
        (old,) = struct.unpack_from("<I", bank.data, off)
        struct.pack_into("<I", bank.data, off, old & value)
        self.offset += 4
        return self._persist(bank, off, 4)

    def _erase(self) -> int:
        bank = self._bank()
        err = self._check_write(bank, SECTOR, SECTOR)
        if err:
            return err
        assert bank is not None
        bank.data[self.offset:self.offset + SECTOR] = b"\xff" * SECTOR
        return self._persist(bank, self.offset, SECTOR)

    def reset(self) -> None:
        self.selected = self.offset = 0
        self.status = OK

    def save_state(self) -> bytes:
        """Registers, then the writable banks' contents (QEMU migrates pflash as RAM)."""
        out = bytearray(struct.pack("<3I", self.selected, self.offset, self.status))
        for bank in self.banks:
            payload = bytes(bank.data) if bank.writable else b""
            out += struct.pack("<I", len(payload)) + payload
        return bytes(out)

    def prepare_state(self, data: bytes, version: int) -> Callable[[], None]:
        """Every field decoded and checked (a bank's bytes all there) before anything changes."""
        selected, offset, status = struct.unpack_from("<3I", data, 0)
        off = 12
        contents: list[tuple[FlashBank, int]] = []  # (bank, where its bytes start in ``data``)
        for bank in self.banks:
            (n,) = struct.unpack_from("<I", data, off)
            off += 4
            if n:
                if n != len(bank.data):
                    raise ValueError(f"flash bank size {n} in the stream, {len(bank.data)} here")
                if off + n > len(data):
                    raise ValueError(f"flash bank of {n} bytes cut short in the stream")
                contents.append((bank, off))
            off += n

        def apply() -> None:
            self.selected, self.offset, self.status = selected, offset, status
            for bank, at in contents:
                self._restore_bank(bank, data[at:at + len(bank.data)])
        return apply

    def _restore_bank(self, bank: FlashBank, new: bytes) -> None:
        """A bank's contents from a VM state, written back to its file too, as QEMU's
        pflash_post_load() has the whole flash written (pflash_update) when the VM runs again:
        here only the 4 KiB sectors that differ, inside the load's stop (docs/deviations.md 60).
        A write that fails is reported, as QEMU's "Could not update PFLASH", and the load goes on."""
        old = np.frombuffer(bytes(bank.data), dtype=np.uint8)
        fresh = np.frombuffer(new, dtype=np.uint8)
        bank.data[:] = new
        if not bank.writable or len(old) != len(fresh):
            return
        whole = len(old) // SECTOR * SECTOR
        differ = (old[:whole].reshape(-1, SECTOR) != fresh[:whole].reshape(-1, SECTOR)).any(axis=1)
        runs = [(int(i) * SECTOR, SECTOR) for i in np.flatnonzero(differ)]
        if whole < len(old) and not np.array_equal(old[whole:], fresh[whole:]):
            runs.append((whole, len(old) - whole))
        for off, n in runs:
            if self._persist(bank, off, n) != OK:
                log.error("Could not update PFLASH: I/O error")
                return
