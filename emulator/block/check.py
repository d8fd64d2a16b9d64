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
from emulator.block.format import L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COPIED
from emulator.block.refcount import RefcountTxn, size_to_clusters
from emulator.block.snapshot import read_snapshot_l1, table_bytes
from emulator.block.state import Qcow2State


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

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors)


class _Counter:
    def __init__(self, s: Qcow2State, res: CheckResult, file_clusters: int) -> None:
        self.s = s
        self.res = res
        self.file_clusters = file_clusters
        self.parts: list[np.ndarray] = []

    def add(self, clusters: np.ndarray) -> None:
        clusters = np.asarray(clusters, dtype=np.int64)
        beyond = clusters >= self.file_clusters
        if beyond.any():
            for c in clusters[beyond][:16].tolist():
                self.res.messages.append(
                    "ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                    f"offset {c << self.s.cluster_bits:#x} size {self.s.cluster_size:#x}")
            self.res.corruptions += int(beyond.sum())
            clusters = clusters[~beyond]
        self.parts.append(clusters)

    def add_range(self, offset: int, nbytes: int) -> None:
        if nbytes <= 0:
            return
        cb = self.s.cluster_bits
        self.add(np.arange(offset >> cb, ((offset + nbytes - 1) >> cb) + 1, dtype=np.int64))


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
        if (off >> s.cluster_bits) >= cnt.file_clusters:
            res.messages.append(f"ERROR l2_offset={off:x}: L2 table lies past the end of the image; L1 entry corrupted")
            res.corruptions += 1
            continue
        cnt.add(np.array([off >> s.cluster_bits]))
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


def _oflag_copied(s: Qcow2State, res: CheckResult) -> None:
    rc = s.refcounts
    for i, ent in enumerate(s.l1_table.tolist()):
        off = ent & L1E_OFFSET_MASK
        if not off or off & (s.cluster_size - 1):
            continue
        l2_rc = rc.get_refcount(off >> s.cluster_bits)
        if (l2_rc == 1) != bool(ent & QCOW_OFLAG_COPIED):
            res.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={ent:x} refcount={l2_rc}")
            res.corruptions += 1
        l2 = np.frombuffer(s.file.pread(off, s.cluster_size), ">u8").astype(np.uint64)
        kinds = cluster.cluster_kinds(s, l2)
        plain = np.flatnonzero((kinds == cluster.NORMAL) | (kinds == cluster.ZERO_ALLOC))
        if not len(plain):
            continue
        ents = l2[plain]
        r = rc.get_refcounts((ents & np.uint64(L2E_OFFSET_MASK)).astype(np.int64) >> s.cluster_bits)
        flag = (ents & np.uint64(QCOW_OFLAG_COPIED)) != 0
        bad = np.flatnonzero((r == 1) != flag)
        for k in bad[:16].tolist():
            res.messages.append(f"ERROR OFLAG_COPIED data cluster: l2_entry={int(ents[k]):x} refcount={int(r[k])}")
        res.corruptions += len(bad)


def _count(s: Qcow2State) -> tuple[CheckResult, np.ndarray, np.ndarray, int]:
    res = CheckResult()
    cs: int = s.cluster_size
    file_clusters = size_to_clusters(cs, s.file.size())
    res.total_clusters = size_to_clusters(cs, s.size)
    cnt = _Counter(s, res, file_clusters)
    cnt.add(np.array([0]))
    rc = s.refcounts
    cnt.add_range(rc.table_offset, rc.table_clusters * cs)
    for b, ent in enumerate(rc.table.tolist()):
        off = ent & ~0x1FF
        if not off:
            continue
        if off & (cs - 1):
            res.messages.append(f"ERROR refcount block {b} is not cluster aligned; refcount table entry corrupted")
            res.corruptions += 1
            continue
        cnt.add(np.array([off >> s.cluster_bits]))
    if s.snapshots:
        cnt.add_range(s.header.snapshots_offset, table_bytes(s.snapshots))
    _walk_l1(s, cnt, res, s.l1_table, s.l1_table_offset, True)
    for sn in s.snapshots:
        _walk_l1(s, cnt, res, read_snapshot_l1(s, sn), sn.l1_table_offset, False)
    refs = np.concatenate(cnt.parts) if cnt.parts else np.zeros(0, dtype=np.int64)
    counted = np.bincount(refs, minlength=file_clusters)[:file_clusters].astype(np.int64)
    stored = rc.all_refcounts(file_clusters)
    return res, counted, stored, file_clusters


def check_image(s: Qcow2State, repair: str | None) -> CheckResult:
    res, counted, stored, file_clusters = _count(s)
    leaks = np.flatnonzero(stored > counted)
    errors = np.flatnonzero(stored < counted)
    for c in leaks[:1000].tolist():
        res.messages.append(f"Leaked cluster {c} refcount={stored[c]} reference={counted[c]}")
    for c in errors[:1000].tolist():
        res.messages.append(f"ERROR cluster {c} refcount={stored[c]} reference={counted[c]}")
    if repair in ("leaks", "all"):
        for c in leaks[:1000].tolist():
            res.messages.append(f"Repairing cluster {c} refcount={stored[c]} reference={counted[c]}")
    if repair == "all":
        for c in errors[:1000].tolist():
            res.messages.append(f"Repairing cluster {c} refcount={stored[c]} reference={counted[c]}")
    res.leaks = len(leaks)
    res.corruptions += len(errors)
    _oflag_copied(s, res)
    used = np.flatnonzero((stored > 0) | (counted > 0))
    res.image_end_offset = (int(used[-1]) + 1) * s.cluster_size if len(used) else 0
    if repair in ("leaks", "all") and (len(leaks) or (repair == "all" and len(errors))):
        # In place is crash-safe here: lowering a leak or raising a too-low
        # refcount never makes a live cluster look free.
        if repair == "all" and len(errors):
            raise_idx = np.repeat(errors, (counted[errors] - stored[errors]))
            missing = [b for b in np.unique(raise_idx >> s.refcounts.block_bits).tolist()
                       if s.refcounts.block_offset(b) == 0]
            if missing:
                txn = RefcountTxn(s.refcounts)
                for b in missing:
                    txn.touch(b)
                s.commit(txn)
            s.refcounts.update_clusters(raise_idx, +1)
        if len(leaks):
            s.refcounts.update_clusters(np.repeat(leaks, (stored[leaks] - counted[leaks])), -1)
        s.file.flush()
        res.leaks_fixed = len(leaks)
        if repair == "all":
            res.corruptions_fixed = len(errors)
        res.repaired = check_image(s, None)
    return res
