"""The blocking save and load move RAM around the page cache (docs/deviations.md 52): on a host
where every new page-cache page is expensive, this is what keeps their stop short and steady."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from emulator.block import Qcow2Image
from tests.block.test_direct import _resident_pages
from tests.migration.conftest import Factory

MiB = 1 << 20


def _vmstate_extents(path: Path, tag: str) -> list[tuple[int, int]]:
    """(file offset, length) of every allocated cluster of the snapshot's VM state."""
    img = Qcow2Image.open(path, read_only=True)
    try:
        cmap, _base = img.snapshot_vmstate_map(next(s for s in img.snapshot_list() if s.name == tag).id_str)
        return [(int(h), img.cluster_size) for h in cmap if h > 0]
    finally:
        img.close()


def test_blocking_save_and_load_leave_the_vm_state_out_of_the_page_cache(make_vm: Factory) -> None:
    m = make_vm(ram=64 * MiB, start=False)
    rng = np.random.default_rng(5)
    m.ram.write(16 * MiB, rng.integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes())
    m.start()
    q = m.qmp()
    q.execute("snapshot-save", {"job-id": "s", "tag": "a", "vmstate": "disk0", "devices": ["disk0", "disk1"]})
    assert "error" not in q.wait_job("s")
    path = Path(m.graph.nodes["disk0-file"].filename)
    ext = _vmstate_extents(path, "a")
    assert sum(n for _, n in ext) >= 16 * MiB  # the random pages are in it
    end = max(o + n for o, n in ext)

    def cached() -> int:
        return sum(_resident_pages(path, o, n) for o, n in ext if n)

    # Only clusters a write covers in part (the stream's head, tail and the edges of its large
    # writes, written buffered) may be cached: a few percent, not the VM state.
    pages = sum(n for _, n in ext) // 4096
    assert cached() <= pages // 20, f"{cached()} of {pages} pages of the VM state in the page cache after the save"
    before = bytes(m.ram.read(16 * MiB, 16 * MiB))
    q.execute("stop")
    m.ram.write(16 * MiB, bytes(16 * MiB))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, end, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    q.execute("snapshot-load", {"job-id": "l", "tag": "a", "vmstate": "disk0", "devices": ["disk0", "disk1"]})
    assert "error" not in q.wait_job("l")
    q.execute("stop")
    assert bytes(m.ram.read(16 * MiB, 16 * MiB)) == before
    assert cached() <= pages // 20, f"{cached()} of {pages} pages of the VM state in the page cache after the load"
