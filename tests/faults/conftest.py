"""Storage faults: helpers shared by the tests of this directory.

A machine is the one of tests/migration (read-only firmware, a raw varstore, two qcow2 disks);
a fault is put below a node's qcow2 image with :class:`~emulator.block.io.BlkdebugFile`
(QEMU's blkdebug), and everything after it is checked the same way: QEMU's error class and
text, the run state, the snapshots listed before, no leaked clusters, ``qemu-img check``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emulator.block import Qcow2Image
from emulator.block.io import BlkdebugFile
from emulator.errors import SnaplabError
from emulator.machine import Machine
from tests.migration.conftest import make_vm, wait_until

__all__ = ["make_vm", "wait_until"]

RAM = 32 << 20
DISKS = ("disk0", "disk1")


def image(m: Machine, node: str) -> Qcow2Image:
    return m.graph[node].snapshot_image


def blkdebug(m: Machine, node: str) -> BlkdebugFile:
    """A BlkdebugFile below ``node``'s image (inserted once, then reused)."""
    img = image(m, node)
    if isinstance(img.file, BlkdebugFile):
        return img.file
    f = BlkdebugFile(img.file)
    img.replace_file(f)
    return f


def names(m: Machine) -> dict[str, list[str]]:
    """Every disk's snapshot names, in table order."""
    return {d: [s.name for s in image(m, d).snapshot_list()] for d in DISKS}


def disk_hash(img: Qcow2Image) -> str:
    """A disk's content, hashed: which clusters hold data, and that data (the rest reads as
    zeros: these images have no backing file)."""
    amap = img.allocation_map()
    h = hashlib.sha256(amap.tobytes())
    cs = img.cluster_size
    for c in np.flatnonzero(amap).tolist():
        h.update(img.read(c * cs, min(cs, img.size - c * cs)))
    return h.hexdigest()


def fingerprint(m: Machine) -> dict[str, str]:
    """RAM and both disks, hashed (the guest must be stopped)."""
    out = {"ram": hashlib.sha256(m.ram.read(0, m.ram.size)).hexdigest()}
    for d in DISKS:
        out[d] = disk_hash(image(m, d))
    return out


def progress(m: Machine) -> int:
    """The guest's iteration counter (the lab page)."""
    return int(m.ram.read_u64(0x7000))


def assert_runs(m: Machine) -> None:
    """The guest is running and making progress."""
    assert m.state.value == "running", m.state
    start = progress(m)
    wait_until(lambda: progress(m) > start, "the guest to make progress")


def fails(fn: Callable[[], Any], pattern: str) -> SnaplabError:
    """``fn`` fails with QEMU's class (GenericError) and a text matching ``pattern``."""
    with pytest.raises(SnaplabError) as info:
        fn()
    err = info.value
    assert err.qmp_class == "GenericError", (type(err), err)
    assert re.fullmatch(pattern, str(err)), str(err)
    return err


def reported_leaks(img: Qcow2Image) -> int:
    """Clusters the image said it could not free (a write failed while freeing them, as
    QEMU's qcow2_free_clusters() reports and goes on)."""
    return sum(int(msg.split()[1]) for msg in img.messages if msg.endswith("leaked: could not free them"))


def no_leaks(m: Machine, qemu_img: Callable[..., Any], files: dict[str, Path]) -> None:
    """Our check and the real ``qemu-img check`` find no corruption, and no leak but those the
    image reported when a write failed while freeing (guest stopped by the caller, so nothing
    is written meanwhile); those are repaired, as ``qemu-img check -r leaks`` would."""
    for d, path in files.items():
        img = image(m, d)
        res = img.check()
        assert (res.corruptions, res.check_errors) == (0, 0), (d, res.messages[:5])
        assert res.leaks <= reported_leaks(img), (d, res.messages[:5])
        out = qemu_img("check", "-U", str(path))
        assert out.returncode in (0, 3) and "ERROR" not in out.stdout, (d, out.stdout, out.stderr)
        if res.leaks:
            img.check(repair="leaks")
            img.messages.clear()
        else:
            assert "No errors were found" in out.stdout, (d, out.stdout)


def used(m: Machine) -> dict[str, int]:
    """Clusters in use (refcount > 0) per disk: what a failed operation must leave as it was."""
    out = {}
    for d in DISKS:
        rc = image(m, d).refcounts
        blocks = int(np.flatnonzero(rc.table)[-1]) + 1
        out[d] = int((rc.all_refcounts(blocks * rc.entries_per_block) > 0).sum())
    return out


def disk_files(tmp_path: Path, sub: str = "w") -> dict[str, Path]:
    return {d: tmp_path / sub / f"{d}.qcow2" for d in DISKS}


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax, e.g. "64m") mounted at ``where`` (as root), unmounted
    lazily after (a failed test may leave an image open on it); the test is skipped only when
    the kernel refuses the mount, saying why."""
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"mount -t tmpfs was refused: {(res.stderr or res.stdout).strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill_up(path: Path) -> int:
    """Write a file until the file system refuses (ENOSPC); returns the bytes it took."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    total = 0
    try:
        for block in (1 << 20, 4096):
            while True:
                try:
                    total += os.write(fd, b"\xa5" * block)
                except OSError as err:
                    assert err.errno == 28, err
                    break
    finally:
        os.close(fd)
    return total
