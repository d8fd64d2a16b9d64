"""The VM-state bulk path: O_DIRECT writes, allocation and link split around unlocked data."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from emulator.block import Qcow2Image
from emulator.block.cluster import alloc_for_write
from emulator.block.io import OsFile
from emulator.errors import ImageCorruptError

MiB = 1 << 20


def _aligned(n: int, fill: int) -> memoryview:
    m = mmap.mmap(-1, n)  # page-aligned memory, as O_DIRECT wants
    m.write(bytes([fill]) * n)
    return memoryview(m)


def _fd_flags(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def test_pwrite_direct_goes_around_the_page_cache_and_falls_back_when_unaligned(tmp_path: Path) -> None:
    f = OsFile.open(tmp_path / "f", create=True)
    try:
        f.pwrite_direct(1 * MiB, _aligned(MiB, 0xAB))
        if f._direct is None or f._direct < 0:
            pytest.skip("this file system refuses O_DIRECT")
        assert _fd_flags(f._direct) & os.O_DIRECT
        f.pwrite_direct(4096 + 512, b"\x01" * 1000)  # unaligned offset and length: buffered
        f.pwrite_direct(3 * MiB, bytes([0xCD]) * 8192)  # memory of a bytes object: maybe unaligned
        assert f.pread(1 * MiB, MiB) == b"\xab" * MiB
        assert f.pread(4096 + 512, 1000) == b"\x01" * 1000
        assert f.pread(3 * MiB, 8192) == b"\xcd" * 8192
        assert f.pread(0, 4096) == bytes(4096)
    finally:
        f.close()
    assert f._direct is None


@pytest.mark.parametrize("direct_file", [True, False])
def test_bulk_vmstate_equals_the_locked_path_and_passes_qemu_img_check(tmp_path: Path, qemu_img, direct_file: bool) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(7)
    chunks = [rng.integers(0, 256, 2 * MiB, dtype=np.uint8).tobytes() for _ in range(5)]
    images = {}
    for how in ("locked", "bulk"):
        path = tmp_path / f"{how}.qcow2"
        img = Qcow2Image.create(path, 256 * MiB)
        if not direct_file:
            img.file.pwrite_direct = img.file.pwrite  # type: ignore[method-assign]
        p = img.snapshot_prepare()
        for i, c in enumerate(chunks):
            pos = 65536 + 2 * i * (2 * MiB)  # every other chunk: holes between
            if how == "locked":
                img.pending_save_vmstate(p, pos, c)
            else:
                mv = _aligned(2 * MiB, 0)
                mv[:] = c
                img.pending_save_vmstate_bulk(p, pos, mv)
        img.pending_save_vmstate(p, 0, b"head" * 100)
        img.snapshot_finish(p, "s", vm_state_size=65536 + 10 * 2 * MiB, date_sec=1, date_nsec=0, vm_clock_nsec=0)
        img.close()
        assert qemu_img("check", str(path)).returncode == 0
        images[how] = Qcow2Image.open(path)
    for how, img in images.items():
        got = bytearray(65536 + 10 * 2 * MiB)
        img.load_vmstate(0, got, snapshot_id=img.find_snapshot("s").id_str)
        assert got[:400] == b"head" * 100
        for i, c in enumerate(chunks):
            at = 65536 + 2 * i * (2 * MiB)
            assert got[at:at + 2 * MiB] == c, (how, i)
            assert got[at + 2 * MiB:at + 4 * MiB] == bytes(2 * MiB), (how, i)
        img.close()


def test_alloc_for_write_takes_whole_clusters_only() -> None:
    img = Qcow2Image.in_memory(64 * MiB)
    with pytest.raises(ValueError, match="whole clusters"):
        alloc_for_write(img, 512, 65536)


def test_refcount_range_update_refuses_to_go_below_zero() -> None:
    img = Qcow2Image.in_memory(64 * MiB)
    before = img.refcounts.get_refcount(0)
    with pytest.raises(ImageCorruptError, match=r"Refcount of cluster 5 would become -1"):
        img.refcounts.update_range(5, 3, -1)
    assert img.refcounts.get_refcount(0) == before and img.check().clean


def _resident_pages(path: Path, offset: int, length: int) -> int:
    """How many pages of [offset, offset+length) of ``path`` are in the page cache (mincore)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), offset + length)
        try:
            buf = (ctypes.c_char * (offset + length)).from_buffer(m)
            vec = (ctypes.c_ubyte * ((offset + length + 4095) // 4096))()
            if libc.mincore(ctypes.addressof(buf), offset + length, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            del buf
            return sum(v & 1 for v in vec[offset // 4096:])
        finally:
            m.close()


def test_preadinto_direct_reads_around_the_page_cache_and_falls_back(tmp_path: Path) -> None:
    path = tmp_path / "f"
    f = OsFile.open(path, create=True)
    try:
        f.pwrite_direct(1 * MiB, _aligned(MiB, 0xAB))
        f.pwrite(2 * MiB, b"\x07" * 5000)  # the file ends inside a page
        if f._direct is None or f._direct < 0:
            pytest.skip("this file system refuses O_DIRECT")
        os.posix_fadvise(f.fd, 0, MiB * 2, os.POSIX_FADV_DONTNEED)
        assert _resident_pages(path, MiB, MiB) == 0
        got = _aligned(MiB, 0)
        f.preadinto_direct(1 * MiB, got)
        assert bytes(got) == b"\xab" * MiB
        assert _resident_pages(path, MiB, MiB) == 0  # read from the disk, nothing cached
        tail = _aligned(3 * 4096, 0xFF)  # across the end of the file: the rest is zeros
        f.preadinto_direct(2 * MiB, tail)
        assert bytes(tail) == b"\x07" * 5000 + bytes(3 * 4096 - 5000)
        odd = bytearray(5000)  # unaligned length (and maybe memory): the ordinary read
        f.preadinto_direct(1 * MiB + 4096, memoryview(odd))
        assert odd == b"\xab" * 5000
        f.preadinto(1 * MiB, _aligned(MiB, 0))
        assert _resident_pages(path, MiB, MiB) == MiB // 4096  # the buffered read cached them
    finally:
        f.close()
