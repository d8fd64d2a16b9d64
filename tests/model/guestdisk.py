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

from collections.abc import Callable

import numpy as np

from emulator.guest import PAGE, WorkloadSpec, dirty_pages_touched, expected_generations, splitmix64

SECTOR = 512
BLOCK_SECTORS = 8
LAB_COUNTER = 0x7000
LAB_DISK_OPS = 0x7010  # disk writes the guest read back intact (data/guest/workloads.asm, disk_op)
LAB_ERRORS = 0x7018  # requests that failed, and read-backs that did not match
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


def disk_difference(spec: WorkloadSpec, base: bytes, counter: int, actual: bytes, search: int = 1024) -> str:
    """For a disk :func:`disk_matches` refused: which 4 KiB blocks differ from the model, what
    they hold instead (the base's bytes, zeros, another block's pattern, something else), and
    the nearest counter whose model the disk does match (lost or extra guest writes), if any
    within ``search`` iterations.  A failure report, so the next one names its mechanism."""
    exp = expected_disk(spec, base, counter, True)
    blk = 4096
    n = len(exp) // blk
    a = np.frombuffer(actual[: n * blk], dtype=np.uint8).reshape(n, blk)
    e = np.frombuffer(exp[: n * blk], dtype=np.uint8).reshape(n, blk)
    b = np.frombuffer(base[: n * blk], dtype=np.uint8).reshape(n, blk)
    bad = np.flatnonzero((a != e).any(axis=1))
    kinds = []
    for i in bad[:6].tolist():
        if (a[i] == b[i]).all():
            kinds.append(f"{i}:base")
        elif not a[i].any():
            kinds.append(f"{i}:zeros")
        elif (a[i] != e[i]).sum() < blk:
            kinds.append(f"{i}:{int((a[i] != e[i]).sum())}B-differ")
        else:
            kinds.append(f"{i}:other")
    bp = spec.batch_pages
    near = next((c for d in range(bp, search + 1, bp) for c in (counter - d, counter + d)
                 if c >= 0 and disk_matches(spec, base, c, actual)), None)
    where = f"; matches the model at counter {near}" if near is not None else "; matches no model within " \
        f"{search} iterations"
    return f"{len(bad)} of {n} 4 KiB blocks differ (block:holds {' '.join(kinds)}){where}"


def lab_problems(spec: WorkloadSpec, counter: int, disk_ops: int, errors: int) -> str | None:
    """What the guest's own lab page says went wrong: after ``counter`` iterations of the
    mixed workload every batch end wrote its block and read it back intact, so the disk-op
    count is the number of batch ends (the last one maybe not done yet) and no error was seen."""
    ends = counter // spec.batch_pages
    if errors:
        return f"the guest counted {errors} disk errors (a failed request or a read-back that did not match)"
    if disk_ops not in (ends, ends - 1):
        return f"the guest counted {disk_ops} disk ops after {counter} iterations ({ends} batch ends)"
    return None


def first_bad_sample(spec: WorkloadSpec, rows: np.ndarray) -> str | None:
    """The lab port's samples (rows of the six fields of ``ProgressSample``) against the mixed
    workload's order: each is rung right after the counter is published and before that
    batch's disk operation, so its disk-op count is exactly ``iterations // batch_pages - 1``.
    The first sample that breaks this, with its host time (``time.monotonic_ns()``) and its
    neighbours: when a lab-page finding happened, to set beside the jobs' times."""
    if not len(rows):
        return None
    it, ops = rows[:, 2].astype(np.int64), rows[:, 4].astype(np.int64)
    bad = np.nonzero(ops != it // spec.batch_pages - 1)[0]
    if not len(bad):
        return None
    i = int(bad[0])
    around = "; ".join(f"#{j}: host {int(rows[j, 1])} ns, {int(it[j])} it, {int(ops[j])} ops"
                       for j in range(max(0, i - 2), min(len(rows), i + 2)))
    return f"sample {i} of {len(rows)} breaks the rule first ({len(bad)} do): {around}"


def disk0_problem(spec: WorkloadSpec, base: bytes, counter: int, read_u64: Callable[[int], int],
                  disk0: bytes) -> str | None:
    """What is wrong with disk0 after ``counter`` iterations from ``base``: first what the
    guest's lab page says (:func:`lab_problems`, read with ``read_u64``), then the disk against
    the model, told with :func:`disk_difference`; None when both agree."""
    problem = lab_problems(spec, counter, read_u64(LAB_DISK_OPS), read_u64(LAB_ERRORS))
    if problem is not None:
        return f"lab page: {problem}"
    if not disk_matches(spec, base, counter, disk0):
        return f"disk0 is not what the guest wrote up to {counter}: {disk_difference(spec, base, counter, disk0)}"
    return None


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
