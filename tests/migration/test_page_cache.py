"""The blocking save and load move RAM around the page cache (docs/deviations.md 52): on a host
where every new page-cache page is expensive, this is what keeps their stop short and steady."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from emulator.block import Qcow2Image
from emulator.guest import WorkloadSpec
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
    # An idle guest: with the default mixed workload, whose disk writes go to the same image file,
    # up to 39% of the VM state's pages were seen cached after a save (not explained yet).
    m = make_vm(ram=64 * MiB, start=False, workload=WorkloadSpec("idle", seed=1))
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
    # writes, written buffered, more of them the more scattered the guest's pages) may be cached:
    # a part, not the VM state (the page-cache path caches all of it: 4144 of 4144 pages).
    pages = sum(n for _, n in ext) // 4096
    assert cached() <= pages // 4, f"{cached()} of {pages} pages of the VM state in the page cache after the save"
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
    assert cached() <= pages // 4, f"{cached()} of {pages} pages of the VM state in the page cache after the load"


def test_scattered_pages_come_in_with_few_large_reads(make_vm: Factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every other page of 8 MiB non-zero: 1024 runs in RAM, side by side in the stream.  Around
    the page cache each read is a request to the disk, so the loads group them (load_blocking
    BOUNCE, postcopy READ_GAP) and the RAM still comes back bit for bit."""
    from emulator.block.io import OsFile

    m = make_vm(ram=64 * MiB, start=False)
    pattern = bytearray(8 * MiB)
    rng = np.random.default_rng(9)
    for p in range(0, 8 * MiB // 4096, 2):
        pattern[p * 4096:(p + 1) * 4096] = rng.integers(1, 256, 4096, dtype=np.uint8).tobytes()
    m.ram.write(40 * MiB, bytes(pattern))
    m.start()
    q = m.qmp()
    q.execute("stop")  # the workload does not touch the pattern; stopped, nothing moves at all
    q.execute("snapshot-save", {"job-id": "s", "tag": "a", "vmstate": "disk0", "devices": ["disk0", "disk1"]})
    assert "error" not in q.wait_job("s")
    calls: list[int] = []
    real = OsFile.preadinto_direct

    def counted(self, offset, buf):  # type: ignore[no-untyped-def]
        calls.append(memoryview(buf).nbytes)
        return real(self, offset, buf)

    monkeypatch.setattr(OsFile, "preadinto_direct", counted)
    for engine in ("blocking", "background"):
        m.ram.write(40 * MiB, bytes(8 * MiB))
        calls.clear()
        q.execute("snapshot-load", {"job-id": f"l-{engine}", "tag": "a", "vmstate": "disk0",
                                    "devices": ["disk0", "disk1"], "__org.snaplab_engine": engine})
        assert "error" not in q.wait_job(f"l-{engine}")
        q.execute("stop")
        assert bytes(m.ram.read(40 * MiB, 8 * MiB)) == bytes(pattern), engine
        big = [n for n in calls if n >= 64 * 4096]
        assert len(calls) < 200 and big, (engine, len(calls))  # not one read per run (1024 and more)
