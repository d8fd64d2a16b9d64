"""The fault-injecting file layer itself (BlkdebugFile, QEMU's blkdebug): its rules fire where
they say, as the errors a real file gives, and a full file system still takes rewrites."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from emulator.block import Qcow2Image
from emulator.block.io import BlkdebugFile, MemoryFile, OsFile
from emulator.errors import BlockIOError


def test_the_nth_write_fails_once_or_for_good() -> None:
    f = BlkdebugFile(MemoryFile())
    f.fail_nth(3, errno.EIO)
    f.pwrite(0, b"a")
    f.flush()
    with pytest.raises(BlockIOError) as info:
        f.pwrite(1, b"b")
    assert str(info.value) == "Could not write at offset 1: Input/output error"
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EIO
    f.pwrite(1, b"b")  # once
    f.fail_nth(1, errno.ENOSPC, ("truncate",), times=None)
    for _ in range(2):
        with pytest.raises(BlockIOError, match="No space left on device"):
            f.truncate(100)
    assert f.failures == 3
    f.fail_nth(1, errno.EIO, ("pread",), span=(4096, 8192))
    f.pread(0, 100)  # outside the span: not counted
    with pytest.raises(BlockIOError, match="Could not read at offset 4000"):
        f.pread(4000, 200)


def test_a_full_file_system_takes_rewrites_not_new_blocks(tmp_path: Path) -> None:
    f = BlkdebugFile(OsFile.open(tmp_path / "f", create=True))
    f.pwrite(0, bytes(8192))
    f.truncate(1 << 20)  # a sparse tail takes no room
    f.fill(4096)
    f.pwrite(100, b"x" * 5000)  # inside blocks the file has
    f.pwrite(8192, b"y")  # one new block: the last 4096 bytes of room
    assert f.room == 0
    with pytest.raises(BlockIOError, match="Could not write at offset 65536: No space left on device"):
        f.pwrite(65536, b"z")
    f.fill(None)
    f.pwrite(65536, b"z")
    f.close()


def test_an_image_keeps_working_below_it(tmp_path: Path) -> None:
    img = Qcow2Image.create(tmp_path / "i.qcow2", 4 << 20)
    f = BlkdebugFile(img.file)
    img.replace_file(f)
    img.write(0, b"\x11" * 70000)
    f.fail_nth(2, errno.EIO)
    with pytest.raises(BlockIOError):
        img.write(200000, b"\x22" * 70000)
    assert img.read(0, 70000) == b"\x11" * 70000
    res = img.check()
    assert (res.leaks, res.corruptions) == (0, 0)
    img.close()
