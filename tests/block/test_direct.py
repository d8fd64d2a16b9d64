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
