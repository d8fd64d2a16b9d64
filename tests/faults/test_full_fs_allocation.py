"""Allocation on a full file system, at the image level, on a real tmpfs.

A save after deletes on a full file system: the deletes leave holes in the file, none of them
as large as the next VM state.  QEMU's VM-state writes arrive in small pieces and fill whatever
free clusters there are; snaplab writes large pieces, so it fills the holes first fit too
instead of asking for one run (which would grow the file and fail; ``docs/deviations.md`` 54).

Skipped only when the kernel refuses the mount.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from emulator.block import Qcow2Image
from emulator.block.io import data_extents
from emulator.errors import BlockIOError
from tests.faults.conftest import fill_up, mounted_tmpfs

MiB = 1 << 20


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "fs", "24m") as mnt:
        yield mnt


def _state(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, size, dtype=np.uint8).tobytes()


def _save(img: Qcow2Image, name: str, state: bytes) -> None:
    p = img.snapshot_prepare()
    try:
        img.pending_save_vmstate(p, 0, state)
    except BaseException:
        img.snapshot_abort(p)
        raise
    img.snapshot_finish(p, name, vm_state_size=len(state), date_sec=1, date_nsec=0, vm_clock_nsec=0)


def _loads(img: Qcow2Image, name: str, state: bytes) -> bool:
    buf = bytearray(len(state))
    img.load_vmstate(0, buf, snapshot_id=img.find_snapshot(name).id_str)
    return bytes(buf) == state


def test_a_save_fills_the_holes_deletes_left_on_a_full_file_system(small_tmpfs: Path, qemu_img) -> None:  # type: ignore[no-untyped-def]
    path = small_tmpfs / "d.qcow2"
    img = Qcow2Image.create(path, 64 * MiB)
    states = {f"s{i}": _state(i, 3 * MiB) for i in range(4)}
    for name, st in states.items():
        _save(img, name, st)
    fill_up(small_tmpfs / "filler")
    with pytest.raises(BlockIOError):  # the file system is full: the next save fails ...
        _save(img, "too-many", _state(9, 3 * MiB))
    assert [s.name for s in img.snapshots] == list(states)  # ... and changes nothing
    # Deleting s0 and s2 leaves two holes of about 3 MiB each, with s1 and s3 between and after.
    for name in ("s0", "s2"):
        img.snapshot_delete(name=name)
        del states[name]
    # 4.5 MiB: more than either hole, less than both (the metadata commits keep a few clusters).
    big = _state(7, 4 * MiB + 512 * 1024)
    _save(img, "big", big)
    states["big"] = big
    assert [s.name for s in img.snapshots] == list(states)
    for name, st in states.items():
        assert _loads(img, name, st), name
    img.close()
    res = qemu_img("check", str(path))
    assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr


def test_a_reopened_image_keeps_room_for_a_delete_on_a_full_file_system(small_tmpfs: Path, qemu_img) -> None:  # type: ignore[no-untyped-def]
    """The spare clusters a metadata commit keeps are known in memory only; a reopened image
    finds them again (free clusters inside the file), so guest writes that fill a full file
    system cannot take them, and a delete and a snapshot goto still find room for their new
    metadata, as QEMU's in-place ones do (the old code: the delete failed with ENOSPC)."""
    path = small_tmpfs / "d.qcow2"
    img = Qcow2Image.create(path, 64 * MiB)
    states = {f"s{i}": _state(i, 3 * MiB) for i in range(3)}
    for name, st in states.items():
        _save(img, name, st)
    img.snapshot_delete(name="s0")  # room inside the file for the guest's writes after the reopen
    del states["s0"]
    img.close()
    fill_up(small_tmpfs / "filler")
    img = Qcow2Image.open(path)
    # The guest writes new clusters until the file system refuses one.
    rng = np.random.default_rng(5)
    written = 0
    with pytest.raises(BlockIOError):
        for off in range(0, 64 * MiB, img.cluster_size):
            img.write(off, rng.integers(1, 256, img.cluster_size, dtype=np.uint8).tobytes())
            written += 1
    assert written  # the file had free room inside it, and the guest took it
    img.snapshot_delete(name="s1")  # new metadata on a file system with no byte left
    del states["s1"]
    img.snapshot_goto("s2")  # and a load's disk revert (on the spare the delete kept)
    assert img.read(0, img.cluster_size) == bytes(img.cluster_size)  # s2 was taken before the writes
    assert [s.name for s in img.snapshots] == list(states)
    for name, st in states.items():
        assert _loads(img, name, st), name
    img.close()
    res = qemu_img("check", str(path))
    assert res.returncode in (0, 3) and "ERROR" not in res.stdout, res.stdout + res.stderr


def test_the_spare_found_at_open_is_free_clusters_that_hold_blocks_and_nothing_is_written(tmp_path: Path) -> None:
    """What a writable open takes as spare: clusters with refcount 0, inside the file, not
    holes (a write there needs no new block); the open writes nothing; the spare a commit
    kept at the end of the file survives the close."""
    path = tmp_path / "d.qcow2"
    img = Qcow2Image.create(path, 64 * MiB)
    for i in range(3):
        _save(img, f"s{i}", _state(i, 2 * MiB))
    img.snapshot_delete(name="s0")  # frees s0's VM state: clusters that hold blocks
    kept = list(img.refcounts.spare)
    img.close()
    size = path.stat().st_size
    assert kept and max(kept) * img.cluster_size < size, (kept, size)  # not trimmed off
    cs = img.cluster_size
    with Qcow2Image.open(path, read_only=True) as ro:
        free = [c for c in range(1, size // cs) if ro.refcounts.get_refcount(c) == 0]
    hole = free[len(free) // 2]  # make one free cluster a hole: it must not be taken
    subprocess.run(["fallocate", "--punch-hole", "--keep-size", "-o", str(hole * cs), "-l", str(cs), str(path)],
                   check=True)
    before = path.read_bytes()
    img = Qcow2Image.open(path)
    spare = list(img.refcounts.spare)
    assert path.read_bytes() == before  # the open wrote nothing
    assert spare and hole not in spare, (spare, hole)
    assert all(img.refcounts.get_refcount(c) == 0 for c in spare)
    assert all(any(s <= c * cs and (c + 1) * cs <= e for s, e in data_extents(img.file)) for c in spare)
    # A spare cluster that a repair found in use is not handed to a commit.
    img.refcounts.update_range(spare[0], 1, +1)
    taken = img.refcounts.take_spare(1)
    assert taken != spare[0] and spare[0] not in img.refcounts.spare
    img.refcounts.update_range(spare[0], 1, -1)
    img.close()
