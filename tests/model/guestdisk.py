"""Host-side model of the guest's disk and RAM writes, shared by tests/model and bench/kill9.py.

The ``mixed`` workload (data/guest/workloads.asm) stamps ``batch_pages`` data pages, publishes
its iteration counter ``N`` at the lab page (0x7000), then writes 8 sectors of disk unit 0 at a
sector chosen from ``(seed, N)``, filled with a pattern of ``(seed, sector)`` only.  So a disk
written by one guest run from a known *base* content is a function of the counter: every batch
end ``k * batch_pages <= N`` wrote its block, the one at ``N`` itself maybe not yet (the vCPU
stops between instructions, and a DMA request is one port write: never half done).  RAM is
checked with :func:`emulator.guest.expected_generations`: after ``N`` iterations every page's
stamp is as predicted, except the pages of the batch in flight, stamped past ``N``.
"""

from __future__ import annotations

import numpy as np

from emulator.guest import PAGE, WorkloadSpec, dirty_pages_touched, expected_generations, splitmix64

SECTOR = 512
BLOCK_SECTORS = 8
LAB_COUNTER = 0x7000
_M64 = 0xFFFFFFFFFFFFFFFF


def op_sectors(spec: WorkloadSpec, disk_sectors: int, counter: int) -> np.ndarray:
    """The first sector written by each batch end ``bp, 2*bp, ..., counter`` (in order)."""
    bp = spec.batch_pages
    ks = np.arange(bp, counter + 1, bp, dtype=np.uint64)
    x = np.bitwise_xor(ks + np.uint64(spec.seed), np.uint64(_M64))  # not (seed + r13)
    h = splitmix64(x)
    n = np.uint64(disk_sectors - BLOCK_SECTORS)
    lo, hi = h & np.uint64(0xFFFFFFFF), h >> np.uint64(32)
    with np.errstate(over="ignore"):
        return ((hi * n + ((lo * n) >> np.uint64(32))) >> np.uint64(32)).astype(np.int64)


def expected_disk(spec: WorkloadSpec, base: bytes, counter: int, last_done: bool) -> bytes:
    """Unit 0's content after a run from ``base`` published ``counter`` (its own block done or not)."""
    sectors = len(base) // SECTOR
    starts = op_sectors(spec, sectors, counter)
    if not last_done and len(starts):
        starts = starts[:-1]
    last = np.full(sectors, -1, dtype=np.int64)
    order = np.arange(len(starts), dtype=np.int64)
    for off in range(BLOCK_SECTORS):
        np.maximum.at(last, starts + off, order)
    out = np.frombuffer(base, dtype="<u8").reshape(sectors, SECTOR // 8).copy()
    xs = np.nonzero(last >= 0)[0]
    st = starts[last[xs]]
    idx = ((st << 6) + (xs - st) * 64)[:, None] + np.arange(64, dtype=np.int64)[None, :]
    out[xs] = splitmix64(np.bitwise_xor(idx.astype(np.uint64), np.uint64(spec.seed)))
    return out.tobytes()


def disk_matches(spec: WorkloadSpec, base: bytes, counter: int, actual: bytes) -> bool:
    """The disk is what the run wrote from ``base`` up to ``counter`` (the last block done or not)."""
    return any(actual == expected_disk(spec, base, counter, done) for done in (True, False))


def ram_problems(spec: WorkloadSpec, ram_size: int, data: bytes, counter: int) -> str | None:
    """What is wrong with the data pages ``data`` (from the working set's base) after ``counter`` iterations."""
    n = spec.pages(ram_size)
    stamps = np.frombuffer(data[: n * PAGE], dtype="<u8").reshape(n, PAGE // 8)[:, 0]
    exp = expected_generations(spec, ram_size, counter)
    newer = np.nonzero(stamps > counter)[0]
    older = stamps <= counter
    if not (stamps[older] == exp[older]).all():
        bad = np.nonzero(older & (stamps != exp))[0]
        return f"{len(bad)} pages not as after {counter} iterations, first {bad[0]}: {stamps[bad[0]]} != {exp[bad[0]]}"
    if len(newer) > spec.batch_pages:
        return f"{len(newer)} pages newer than {counter} (a batch is {spec.batch_pages})"
    touched = dirty_pages_touched(spec, ram_size, counter, counter + spec.batch_pages)
    for p in newer:
        v = int(stamps[p])
        if v > counter + spec.batch_pages or touched[v - 1 - counter] != p:
            return f"page {p} stamped {v}, not by the batch after {counter}"
    return None


def data_range(spec: WorkloadSpec, ram_size: int) -> tuple[int, int]:
    """The guest-physical range of the workload's data pages."""
    return spec.base, spec.pages(ram_size) * PAGE
