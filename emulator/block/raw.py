"""The raw format driver: guest bytes are file bytes (QEMU's block/raw-format.c).

A raw node cannot hold internal snapshots; that is why a writable raw firmware
varstore blocks HMP ``savevm``.  Imports neither unicorn nor asyncio.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from emulator.block.io import BlockFile, OsFile, as_block_file
from emulator.errors import OutOfRangeError, ReadOnlyError


class RawImage:
    """An open raw image."""

    driver = "raw"

    def __init__(self, file: BlockFile | Any, *, read_only: bool = False, filename: str = "") -> None:
        self.file: BlockFile = as_block_file(file)
        self.read_only = read_only
        self.filename = filename
        self.size = self.file.size()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False) -> RawImage:
        return cls(OsFile.open(path, read_only=read_only), read_only=read_only, filename=os.fspath(path))

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int) -> RawImage:
        f = OsFile.open(path, create=True)
        f.truncate(size)
        return cls(f, filename=os.fspath(path))

    def _range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(f"Request at offset {offset} of {length} bytes is outside the disk ({self.size} bytes)")

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        mv = memoryview(buf).cast("B")
        self._range(offset, mv.nbytes)
        with self._lock:
            self.file.preadinto(offset, mv)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.read_only:
            raise ReadOnlyError(f"Block node is read-only{': ' + self.filename if self.filename else ''}")
        mv = memoryview(data).cast("B")
        self._range(offset, mv.nbytes)
        with self._lock:
            self.file.pwrite(offset, mv)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
