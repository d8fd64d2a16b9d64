"""lab.qcow2_view, the notebooks' independent qcow2 reader, against what the real qemu-img wrote."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from lab.qcow2_view import OFFSET_MASK, Qcow2View

Run = Callable[..., subprocess.CompletedProcess[str]]


def test_free_clusters_are_those_qemu_freed_and_none_in_use(tmp_path: Path, qemu_img: Run, qemu_io: Run) -> None:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "64M", check=True)
    qemu_io(p, "write -P 0x5a 0 1M")
    qemu_img("snapshot", "-c", "s1", str(p), check=True)
    v = Qcow2View.open(p)
    try:
        snap_l1 = v.snapshots()[0].l1_table_offset
        assert v.free_clusters() == []  # a fresh image: every cluster below the end is in use
    finally:
        v.close()
    qemu_img("snapshot", "-d", "s1", str(p), check=True)
    v = Qcow2View.open(p)
    try:
        free = v.free_clusters()
        assert snap_l1 in free  # the deleted snapshot's L1 table, freed by QEMU
        in_use = {0, v.header["l1_table_offset"], v.header["refcount_table_offset"]}
        in_use |= {e & OFFSET_MASK for e in v.l1() if e & OFFSET_MASK}
        in_use |= {c["host_offset"] for c in v.mapped(v.l1())}
        assert not in_use & set(free)
        assert all(v.refcount(off) == 0 for off in free)
    finally:
        v.close()
