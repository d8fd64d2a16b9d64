"""qcow2 consistency check and leak repair, counted the way ``qemu-img check`` counts.

Mirrors QEMU's qcow2_check_refcounts() (block/qcow2-refcount.c): every
reference from the header, refcount structures, snapshot table, active and
snapshot L1/L2 tables is counted into an in-memory array, compared with the
stored refcounts (leaks: stored > counted; errors: stored < counted), and
``QCOW_OFLAG_COPIED`` is checked against the stored refcounts
(check_oflag_copied).  Counting is vectorised with numpy.

Repair ("leaks" or "all") rewrites refcounts with one shadow commit, so a repair
interrupted at any point leaves the image as it was.

Also here, from the same file of QEMU: the set of metadata clusters that the
overlap check (qcow2_check_metadata_overlap) keeps guest data away from.
Works on the image through :class:`~emulator.block.state.Qcow2State`; imports
cluster.py and snapshot.py but not qcow2.py, and neither unicorn nor asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import emulator.block.cluster as cluster
from emulator.block.format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_MAX_L1_SIZE,
    QCOW_OFLAG_COPIED,
    REFT_OFFSET_MASK,
)
from emulator.block.refcount import rebuild_refcount_structure, size_to_clusters
from emulator.block.snapshot import (
    fix_snapshot_table,
    read_snapshot_l1,
    read_snapshots_for_check,
    table_bytes,
)
from emulator.block.state import Qcow2State
from emulator.errors import CheckFailedError


@dataclass
class CheckResult:
    """BdrvCheckResult + BlockFragInfo."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    repaired: CheckResult | None = None
    incomplete_snapshots: int = 0  # version 3 entries with too little extra data (corruptions)

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors)


class _Counter:
    """The in-memory refcount array being built (qcow2_inc_refcounts_imrt)."""

    def __init__(self, s: Qcow2State, res: CheckResult, file_clusters: int) -> None:
        self.s = s
        self.res = res
        self.file_clusters = file_clusters
        self.file_len = s.file.size()
        self.parts: list[np.ndarray] = []  # references added since the last counted()
        self._sum = np.zeros(file_clusters, dtype=np.int64)

    def add(self, clusters: np.ndarray) -> None:
        """One reference to each cluster (each a region of one cluster at its start)."""
        clusters = np.asarray(clusters, dtype=np.int64)
        beyond = clusters >= self.file_clusters
        if beyond.any():
            for c in clusters[beyond][:16].tolist():
                self._exceeding(c << self.s.cluster_bits, self.s.cluster_size)
            self.res.corruptions += int(beyond.sum())
            clusters = clusters[~beyond]
        self.parts.append(clusters)

    def add_range(self, offset: int, nbytes: int) -> None:
        """One reference to each cluster of a region; a region that ends a cluster or more past
        the end of the file is one corruption and counts nothing."""
        if nbytes <= 0:
            return
        if offset + nbytes - self.file_len >= self.s.cluster_size:
            self._exceeding(offset, nbytes)
            self.res.corruptions += 1
            return
        cb = self.s.cluster_bits
        self.parts.append(np.arange(offset >> cb, ((offset + nbytes - 1) >> cb) + 1, dtype=np.int64))

    def _exceeding(self, offset: int, nbytes: int) -> None:
        self.res.messages.append("ERROR: counting reference for region exceeding the end of the file by one "
                                 f"cluster or more: offset {offset:#x} size {nbytes:#x}")

    def counted(self) -> np.ndarray:
        """The references counted so far, one count per cluster of the file (a new array;
        only the references added since the last call are counted again)."""
        new, self.parts = self.parts, []
        if new:
            refs = np.concatenate(new)
            self._sum = self._sum + np.bincount(refs, minlength=self.file_clusters)[:self.file_clusters]
        return self._sum.copy()


def metadata_clusters(s: Qcow2State) -> np.ndarray:
    """Sorted host cluster indices holding metadata: the header, the refcount table and
    blocks, the active L1 and L2 tables, the snapshot table and the snapshots' L1 tables
    (the set qcow2_check_metadata_overlap() checks a write against)."""
    cb = s.cluster_bits
    parts = [np.array([0], dtype=np.int64)]

    def rng(off: int, nbytes: int) -> None:
        if off and nbytes:
            parts.append(np.arange(off >> cb, (off + nbytes - 1 >> cb) + 1, dtype=np.int64))

    rc = s.refcounts
    rng(rc.table_offset, rc.table_clusters * s.cluster_size)
    t = rc.table[rc.table != 0].astype(np.int64)
    parts.append(t >> cb)
    rng(s.l1_table_offset, s.l1_size * 8)
    l2 = (s.l1_table & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
    parts.append(l2[l2 != 0] >> cb)
    rng(s.header.snapshots_offset, table_bytes(s.snapshots))
    for sn in s.snapshots:
        rng(sn.l1_table_offset, sn.l1_size * 8)
    return np.unique(np.concatenate(parts))


def _walk_l1(s: Qcow2State, cnt: _Counter, res: CheckResult, l1: np.ndarray, l1_offset: int,
             active: bool) -> None:
    cs = s.cluster_size
    cnt.add_range(l1_offset, len(l1) * 8)
    for ent in l1.tolist():
        off = ent & L1E_OFFSET_MASK
        if not off:
            continue
        if off & (cs - 1):
            res.messages.append(f"ERROR l2_offset={off:x}: Table is not cluster aligned; L1 entry corrupted")
            res.corruptions += 1
            continue
        cnt.add(np.array([off >> s.cluster_bits]))  # past the end of the file: reported, reads zeros
        l2 = np.frombuffer(s.file.pread(off, cs), ">u8").astype(np.uint64)
        kinds = cluster.cluster_kinds(s, l2)
        plain = (kinds == cluster.NORMAL) | (kinds == cluster.ZERO_ALLOC)
        hosts = (l2 & np.uint64(L2E_OFFSET_MASK)).astype(np.int64)
        bad = plain & ((hosts & (cs - 1)) != 0)
        for e in l2[bad][:16].tolist():
            res.messages.append(f"ERROR offset={e & L2E_OFFSET_MASK:x}: Cluster is not properly aligned; L2 entry corrupted")
        res.corruptions += int(bad.sum())
        plain &= ~bad
        cnt.add(hosts[plain] >> s.cluster_bits)
        comp = np.flatnonzero(kinds == cluster.COMPRESSED)
        for j in comp.tolist():
            cnt.add(cluster.compressed_clusters(s, int(l2[j]))[2])
        if active:
            res.allocated_clusters += int(plain.sum()) + len(comp)
            res.compressed_clusters += len(comp)
            h = hosts[plain]
            if len(h):
                # next_contiguous_offset is per L2 table in QEMU's check_refcounts_l2
                res.fragmented_clusters += int((h[1:] != h[:-1] + cs).sum())


def _oflag_copied(s: Qcow2State, res: CheckResult, repair: bool) -> None:
    """check_oflag_copied(): QCOW_OFLAG_COPIED set exactly where the refcount is 1, in the
    active L1 table and its L2 tables; ``repair`` sets or clears the flag where it is wrong."""
    rc = s.refcounts
    word = "Repairing" if repair else "ERROR"
    copied = np.uint64(QCOW_OFLAG_COPIED)
    for i, ent in enumerate(s.l1_table.tolist()):
        off = ent & L1E_OFFSET_MASK
        if not off or off & (s.cluster_size - 1):
            continue
        l2_rc = rc.get_refcount(off >> s.cluster_bits)
        if (l2_rc == 1) != bool(ent & QCOW_OFLAG_COPIED):
            res.messages.append(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={ent:x} refcount={l2_rc}")
            if repair:
                cluster.set_l1_entry(s, i, ent | QCOW_OFLAG_COPIED if l2_rc == 1 else ent & ~QCOW_OFLAG_COPIED)
                res.corruptions_fixed += 1
            else:
                res.corruptions += 1
        l2 = np.frombuffer(s.file.pread(off, s.cluster_size), ">u8").astype(np.uint64)
        kinds = cluster.cluster_kinds(s, l2)
        plain = np.flatnonzero((kinds == cluster.NORMAL) | (kinds == cluster.ZERO_ALLOC))
        if not len(plain):
            continue
        ents = l2[plain]
        r = rc.get_refcounts((ents & np.uint64(L2E_OFFSET_MASK)).astype(np.int64) >> s.cluster_bits)
        bad = np.flatnonzero((r == 1) != ((ents & copied) != 0))
        for k in bad[:16].tolist():
            res.messages.append(f"{word} OFLAG_COPIED data cluster: l2_entry={int(ents[k]):x} refcount={int(r[k])}")
        if repair and len(bad):
            fixed = l2.copy()
            idx = plain[bad]
            fixed[idx] = np.where(r[bad] == 1, l2[idx] | copied, l2[idx] & ~copied)
            s.file.pwrite(off, fixed.astype(">u8").tobytes())
            s.l2_cache.pop(off, None)
            res.corruptions_fixed += len(bad)
        else:
            res.corruptions += len(bad)


def _snapshot_table(s: Qcow2State, res: CheckResult, repair: str | None) -> int:
    """The snapshot table's bytes; for an image opened for a check, first read the table
    (qcow2_check_read_snapshot_table) and count its incomplete entries ('all' repairs them
    after the refcounts: :func:`_fix_snapshots`)."""
    if not s.opened_for_check:
        return table_bytes(s.snapshots)
    s.snapshots, used, incomplete = read_snapshots_for_check(s)
    for i in incomplete:
        res.messages.append(f"{'Repairing' if repair == 'all' else 'ERROR'} snapshot table entry {i} is incomplete")
    res.corruptions += len(incomplete)
    res.incomplete_snapshots = len(incomplete)
    return used


def _fix_snapshots(s: Qcow2State, res: CheckResult, repair: str | None) -> None:
    """qcow2_check_fix_snapshot_table(): with 'all', incomplete entries written out whole."""
    if repair == "all" and res.incomplete_snapshots:
        fix_snapshot_table(s)  # (a metadata commit: flushed, the overlap set renewed)
        res.corruptions_fixed += res.incomplete_snapshots


def _walk_snapshots(s: Qcow2State, cnt: _Counter, res: CheckResult) -> None:
    """Each snapshot's L1 and L2 tables, unless its entry is corrupt (qcow2_check_refcounts)."""
    for sn in s.snapshots:
        what = f"ERROR snapshot {sn.id_str} ({sn.name})"
        if sn.l1_table_offset % s.cluster_size:
            res.messages.append(f"{what} l1_offset={sn.l1_table_offset:#x}: L1 table is not cluster aligned; "
                                "snapshot table entry corrupted")
            res.corruptions += 1
        elif sn.l1_size * 8 > QCOW_MAX_L1_SIZE:
            res.messages.append(f"{what} l1_size={sn.l1_size:#x}: L1 table is too large; "
                                "snapshot table entry corrupted")
            res.corruptions += 1
        else:
            _walk_l1(s, cnt, res, read_snapshot_l1(s, sn), sn.l1_table_offset, False)


def _refblocks(s: Qcow2State, cnt: _Counter, res: CheckResult, word: str) -> bool:
    """check_refblocks(): each refcount table entry's block, counted last and referenced once;
    True if an entry is broken (the structure needs a rebuild)."""
    cb = s.cluster_bits
    seen = cnt.counted()
    extra: dict[int, int] = {}
    broken = False
    for b, ent in enumerate(s.refcounts.table.tolist()):
        off = ent & REFT_OFFSET_MASK
        c = off >> cb
        if ent & ~REFT_OFFSET_MASK:
            res.messages.append(f"ERROR refcount table entry {b} has reserved bits set")
        elif off & (s.cluster_size - 1):
            res.messages.append(f"ERROR refcount block {b} is not cluster aligned; refcount table entry corrupted")
        elif c >= cnt.file_clusters:
            res.messages.append(f"{word} refcount block {b} is outside image")
        elif off:
            cnt.add(np.array([c]))
            extra[c] = extra.get(c, 0) + 1
            if (n := int(seen[c]) + extra[c]) != 1:
                res.messages.append(f"{word} refcount block {b} refcount={n}")
            else:
                continue
        else:
            continue
        res.corruptions += 1
        broken = True
    return broken


@dataclass
class _Counts:
    res: CheckResult
    counted: np.ndarray  # references per cluster of the file
    without_refcounts: np.ndarray  # the same, leaving out the refcount table and blocks
    stored: np.ndarray  # the refcounts the image holds
    refblocks_broken: bool


def _count(s: Qcow2State, repair: str | None) -> _Counts:
    """calculate_refcounts(), in its order: the header, the active L1 and L2 tables, the
    snapshots' tables, the snapshot table, the refcount table, then the refcount blocks."""
    res = CheckResult()
    snapshots_size = _snapshot_table(s, res, repair)
    cs: int = s.cluster_size
    file_clusters = size_to_clusters(cs, s.file.size())
    res.total_clusters = size_to_clusters(cs, s.size)
    cnt = _Counter(s, res, file_clusters)
    cnt.add_range(0, cs)
    _walk_l1(s, cnt, res, s.l1_table, s.l1_table_offset, True)
    _walk_snapshots(s, cnt, res)
    cnt.add_range(s.header.snapshots_offset, snapshots_size)
    without = cnt.counted()
    rc = s.refcounts
    cnt.add_range(rc.table_offset, rc.table_clusters * cs)
    broken = _refblocks(s, cnt, res, "Repairing" if repair == "all" else "ERROR")
    return _Counts(res, cnt.counted(), without, rc.all_refcounts(file_clusters), broken)


def check_image(s: Qcow2State, repair: str | None) -> CheckResult:
    """qcow2_check_refcounts(): compare, report, and with ``repair`` fix leaks ('leaks') or
    everything ('all'); a refcount structure that cannot be trusted (a broken table entry, or
    a referenced cluster with refcount 0) is rebuilt from scratch (only with 'all')."""
    c = _count(s, repair)
    res, counted, stored = c.res, c.counted, c.stored
    leaks = np.flatnonzero(stored > counted)
    errors = np.flatnonzero(stored < counted)
    shown = np.union1d(leaks[:1000], errors[:1000]).tolist()  # in cluster order, as compare_refcounts()
    for k in shown:
        word = "Leaked" if stored[k] > counted[k] else "ERROR"
        res.messages.append(f"{word} cluster {k} refcount={stored[k]} reference={counted[k]}")
    res.leaks = len(leaks)
    res.corruptions += len(errors)
    rebuild = c.refblocks_broken or bool((stored[errors] == 0).any())
    if rebuild and repair == "all":
        return _rebuild(s, c)
    if rebuild and repair == "leaks":
        res.check_errors += 1
        raise CheckFailedError("ERROR need to rebuild refcount structures", "Input/output error",
                               prefixed=False, messages=res.messages)
    if repair in ("leaks", "all"):
        for k in shown:
            if repair == "all" or stored[k] > counted[k]:
                res.messages.append(f"Repairing cluster {k} refcount={stored[k]} reference={counted[k]}")
    if repair in ("leaks", "all") and (len(leaks) or (repair == "all" and len(errors))):
        # In place is crash-safe here: lowering a leak or raising a too-low
        # refcount never makes a live cluster look free.
        if repair == "all" and len(errors):
            s.refcounts.update_clusters(np.repeat(errors, (counted[errors] - stored[errors])), +1)
        if len(leaks):
            s.refcounts.update_clusters(np.repeat(leaks, (stored[leaks] - counted[leaks])), -1)
        s.file.flush()
        res.leaks_fixed = len(leaks)
        if repair == "all":
            res.corruptions_fixed = len(errors)
    _fix_snapshots(s, res, repair)
    # QEMU repairs the flags with -r leaks too when nothing else is wrong
    unfixed = res.check_errors or res.corruptions > res.corruptions_fixed or res.leaks > res.leaks_fixed
    _oflag_copied(s, res, repair == "all" or (repair == "leaks" and not unfixed))
    used = np.flatnonzero((stored > 0) | (counted > 0))
    res.image_end_offset = (int(used[-1]) + 1) * s.cluster_size if len(used) else 0
    if res.leaks_fixed or res.corruptions_fixed:
        s.file.flush()
        res.repaired = check_image(s, None)
    return res


def _rebuild(s: Qcow2State, c: _Counts) -> CheckResult:
    """The refcount structure rebuilt from the references counted, past the end of the file
    (nothing in use is written over; one header write switches to it), then checked again."""
    res = c.res
    res.messages.append("Rebuilding refcount structure")
    rebuild_refcount_structure(s.refcounts, c.without_refcounts, size_to_clusters(s.cluster_size, s.file.size()))
    s.metadata_changed()
    s.file.flush()
    _fix_snapshots(s, res, "all")
    _oflag_copied(s, res, True)  # against the refcounts now right
    s.file.flush()
    after = check_image(s, None)
    res.corruptions_fixed = max(0, res.corruptions - after.corruptions)
    res.leaks_fixed = max(0, res.leaks - after.leaks)
    res.image_end_offset = after.image_end_offset
    res.repaired = after
    return res
