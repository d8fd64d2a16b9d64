"""qcow2 internal snapshots: the snapshot table, create, goto, delete, list.

Mirrors QEMU's block/qcow2-snapshot.c (``qcow2_read_snapshots``,
``qcow2_write_snapshots``, ``qcow2_snapshot_create``, ``qcow2_snapshot_goto``,
``qcow2_snapshot_delete``, ``qcow2_snapshot_list``) and follows the qcow2 spec's
"Snapshots" section.  Each operation is one shadow commit (refcount.py): new
L2 copies, a new L1, a new snapshot table and new refcount blocks are written
to free clusters and switched in with one header write, so a process killed
at any instant leaves either the old image or the new one, plus leaks at most.

Unlike QEMU, snapshot_create gives the new active L1 its own copies of the
(disk) L2 tables instead of sharing them; the snapshot keeps the old active
L1 in place.  The format is the same; only which clusters are shared differs.
Works on the image through :class:`~emulator.block.state.Qcow2State`; imports
cluster.py but neither qcow2.py nor check.py, and neither unicorn nor asyncio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

import emulator.block.cluster as cluster
from emulator.block.format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_SNAPSHOTS,
    QCOW_MAX_SNAPSHOTS_SIZE,
    QCOW_OFLAG_COPIED,
    QCowSnapshotHeader,
    check_snapshot_table_pointer,
    parse_snapshot_table,
)
from emulator.block.refcount import RefcountTxn, size_to_clusters
from emulator.block.state import Qcow2State
from emulator.block.state import QCowSnapshot as QCowSnapshot  # re-exported for callers
from emulator.errors import (
    BlockIOError,
    CheckFailedError,
    ImageFormatError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotNotFoundError,
)

_U64 = np.uint64
_COPIED = _U64(QCOW_OFLAG_COPIED)
_L2_MASK = _U64(L2E_OFFSET_MASK)


def table_bytes(snaps: list[QCowSnapshot]) -> int:
    return sum(len(sn.to_header().pack()) for sn in snaps)


def _parse_table(s: Qcow2State, avail: int, incomplete: list[int] | None = None) -> tuple[list[QCowSnapshotHeader], int]:
    """The header's snapshot table parsed from at most ``avail`` bytes at its offset, read in
    growing pieces (an entry's length is known only once read); ``incomplete`` as
    :func:`~emulator.block.format.parse_snapshot_table`'s.  A table longer than ``avail`` raises
    the parser's "runs past the end" error."""
    h = s.header
    want = min(avail, h.nb_snapshots * 128 + s.cluster_size)
    while True:
        buf = s.file.pread(h.snapshots_offset, want)  # past the end of the file: zeros
        if incomplete is not None:
            incomplete.clear()
        try:
            return parse_snapshot_table(buf, h.nb_snapshots, h.version, incomplete=incomplete)
        except ImageFormatError as err:
            if "runs past the end" in str(err) and want < avail:
                want = min(avail, want * 4)
                continue
            raise


def read_snapshots(s: Qcow2State, file_size: int) -> list[QCowSnapshot]:
    """qcow2_read_snapshots(): parse the table with every length bounded."""
    h = s.header
    if h.nb_snapshots == 0:
        return []
    if h.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise ImageFormatError("nb_snapshots", "Too many snapshots")
    try:
        entries, _ = _parse_table(s, min(file_size - h.snapshots_offset, QCOW_MAX_SNAPSHOTS_SIZE))
    except ImageFormatError as err:
        if "runs past the end" in str(err):
            raise ImageFormatError(err.field, "Snapshot table too large or truncated") from err
        raise
    snaps = [QCowSnapshot.from_header(e) for e in entries]
    for i, sn in enumerate(snaps):
        if sn.l1_size * 8 > QCOW_MAX_L1_SIZE:
            raise ImageFormatError(f"snapshot[{i}].l1_size", "Snapshot L1 table too large")
        if sn.l1_size and (sn.l1_table_offset % s.cluster_size or sn.l1_table_offset == 0
                           or sn.l1_table_offset + sn.l1_size * 8 > file_size):
            raise ImageFormatError(f"snapshot[{i}].l1_table_offset", "Snapshot L1 table offset invalid")
    return snaps


def read_snapshots_for_check(s: Qcow2State) -> tuple[list[QCowSnapshot], int, list[int]]:
    """qcow2_check_read_snapshot_table() without repair: the snapshot table of an image opened
    for a check (whose open left it alone), read as QEMU's check reads it, zeros past the end
    of the file.  Returns the snapshots, the table's bytes (``snapshots_size``) and the
    version 3 entries with too little extra data (each a corruption to the check).  A table
    that cannot be read raises :class:`CheckFailedError` with QEMU's words."""
    h = s.header
    try:  # qcow2_validate_table(), as the open's without its end-of-file and header-overlap tests
        if h.snapshots_offset or not h.nb_snapshots:
            check_snapshot_table_pointer(h)
    except ImageFormatError as err:
        if err.field == "nb_snapshots":
            raise CheckFailedError("ERROR snapshot table too large", "File too large") from err
        raise CheckFailedError("ERROR snapshot table offset invalid", "Invalid argument") from err
    if h.nb_snapshots == 0:
        return [], 0, []
    incomplete: list[int] = []
    try:
        entries, used = _parse_table(s, QCOW_MAX_SNAPSHOTS_SIZE, incomplete)
    except ImageFormatError as err:
        past_end = "runs past the end" in str(err)
        why = "Snapshot table is too big" if past_end else str(err).split(" (field")[0]
        raise CheckFailedError(f"ERROR failed to read the snapshot table: {why}",
                               "File too large" if past_end or "Too much" in str(err) else "Invalid argument") from err
    return [QCowSnapshot.from_header(e) for e in entries], used, incomplete


def read_snapshot_l1(s: Qcow2State, sn: QCowSnapshot) -> np.ndarray:
    if sn.l1_size == 0:
        return np.zeros(0, dtype=_U64)
    return np.frombuffer(s.file.pread(sn.l1_table_offset, sn.l1_size * 8), ">u8").astype(_U64)


def find_snapshot(s: Qcow2State, id_or_name: str) -> QCowSnapshot:
    """find_snapshot_by_id_or_name(): an id matches first, then a name."""
    for sn in s.snapshots:
        if sn.id_str == id_or_name:
            return sn
    for sn in s.snapshots:
        if sn.name == id_or_name:
            return sn
    raise SnapshotNotFoundError(f"Can't find the snapshot '{id_or_name}'")


def find_snapshot_by_id_and_name(s: Qcow2State, id_str: str | None, name: str | None) -> QCowSnapshot:
    """find_snapshot_by_id_and_name(): both given must match; one given matches it alone."""
    for sn in s.snapshots:
        if id_str is not None and sn.id_str != id_str:
            continue
        if name is not None and sn.name != name:
            continue
        if id_str is None and name is None:
            break
        return sn
    raise SnapshotNotFoundError("Can't find the snapshot")


def find_new_snapshot_id(s: Qcow2State) -> str:
    best = 0
    for sn in s.snapshots:
        try:
            best = max(best, int(sn.id_str))
        except ValueError:
            pass
    return str(best + 1)


def _write_table(s: Qcow2State, txn: RefcountTxn, snaps: list[QCowSnapshot]) -> tuple[int, int]:
    """qcow2_write_snapshots(): the new table in fresh clusters; the old one freed at commit."""
    data = b"".join(sn.to_header().pack() for sn in snaps)
    if len(data) > QCOW_MAX_SNAPSHOTS_SIZE:
        raise SnapshotError("Snapshot table too large")
    off = 0
    if data:
        n = size_to_clusters(s.cluster_size, len(data))
        off = txn.reserve(n)
        s.file.pwrite(off, data)
    old_bytes = table_bytes(s.snapshots)
    if s.header.snapshots_offset and old_bytes:
        txn.decref_range(s.header.snapshots_offset, size_to_clusters(s.cluster_size, old_bytes))
    return off, len(snaps)


def fix_snapshot_table(s: Qcow2State) -> None:
    """qcow2_check_fix_snapshot_table(): the snapshot table written again, every entry with
    its full extra data (an entry that lacked the disk size gets the image's, as QEMU's read
    gives it), in fresh clusters; the header switches to it and the old table is freed."""
    snaps = [replace(sn, disk_size=s.size) if sn.disk_size is None else sn for sn in s.snapshots]
    txn = RefcountTxn(s.refcounts)
    try:
        off, nb = _write_table(s, txn, snaps)
    except BaseException:
        txn.rollback()
        raise
    s.commit(txn, nb_snapshots=nb, snapshots_offset=off)
    s.snapshots = snaps


def _write_l1(s: Qcow2State, txn: RefcountTxn, l1: np.ndarray) -> int:
    if len(l1) == 0:
        return 0
    n = size_to_clusters(s.cluster_size, len(l1) * 8)
    off = txn.reserve(n)
    s.file.pwrite(off, l1.astype(">u8").tobytes())
    return off


def _copied_flags(s: Qcow2State, txn: RefcountTxn, l2: np.ndarray) -> np.ndarray:
    """L2 entries with QCOW_OFLAG_COPIED set exactly where the final refcount is 1."""
    out = l2 & ~_COPIED
    kinds = cluster.cluster_kinds(s, l2)
    plain = np.flatnonzero((kinds == cluster.NORMAL) | (kinds == cluster.ZERO_ALLOC))
    if len(plain):
        rc = txn.refcounts_after((l2[plain] & _L2_MASK).astype(np.int64) >> s.cluster_bits)
        one = plain[rc == 1]
        out[one] |= _COPIED
    return out


def _drop_tree(s: Qcow2State, txn: RefcountTxn, l1: np.ndarray, l1_offset: int) -> None:
    """Defer -1 on every L2 table of ``l1`` and on every cluster those tables reference, as
    QEMU's update_snapshot_refcount(addend=-1): a refcount counts paths from every L1, so an L2
    table that qemu-img's snapshot shares between two L1s (refcount 2) holds its data at 2 too,
    and dropping one L1 takes one from each (not only from the data of tables that reach 0)."""
    l2_offs = [(i, int(e) & L1E_OFFSET_MASK) for i, e in enumerate(l1) if int(e) & L1E_OFFSET_MASK]
    if l2_offs:
        idx = np.array([o for _, o in l2_offs], dtype=np.int64) >> s.cluster_bits
        txn.decref(idx)
        for i, off in l2_offs:
            txn.decref(cluster.referenced_clusters(s, cluster.load_l2(s, off, i)))
    if l1_offset and len(l1):
        txn.decref_range(l1_offset, size_to_clusters(s.cluster_size, len(l1) * 8))


def snapshot_create(s: Qcow2State, name: str, *, id_str: str | None, vm_state_size: int, date_sec: int | None,
                    date_nsec: int | None, vm_clock_nsec: int, icount: int) -> QCowSnapshot:
    """qcow2_snapshot_create(): the snapshot keeps the active L1; the guest gets copies.

    The VM state must already be written with save_vmstate(); it stays with the
    snapshot and is dropped from the active L1, as QEMU does.
    """
    if id_str is None:
        id_str = find_new_snapshot_id(s)
    elif any(sn.id_str == id_str for sn in s.snapshots):
        raise SnapshotExistsError(f"Snapshot with id '{id_str}' already exists")
    if len(s.snapshots) >= QCOW_MAX_SNAPSHOTS:
        raise SnapshotError("Too many snapshots")
    if len(id_str.encode()) > 0xFFFF or len(name.encode()) > 0xFFFF:
        raise SnapshotError("Snapshot id or name too long")
    now = time.time_ns()
    sn = QCowSnapshot(
        id_str=id_str, name=name, l1_table_offset=s.l1_table_offset, l1_size=s.l1_size,
        vm_state_size=vm_state_size,
        date_sec=now // 1_000_000_000 if date_sec is None else date_sec,
        date_nsec=now % 1_000_000_000 if date_nsec is None else date_nsec,
        vm_clock_nsec=vm_clock_nsec, disk_size=s.size, icount=icount)
    disk_l1 = min(s.l1_vm_state_index, s.l1_size)
    new_l1 = np.zeros(max(s.l1_size, s.l1_vm_state_index), dtype=_U64)
    copies: dict[int, np.ndarray] = {}
    txn = RefcountTxn(s.refcounts)
    try:
        _give_guest_l2_copies(s, txn, disk_l1, new_l1, copies)
        l1_off = _write_l1(s, txn, new_l1)
        snaps = [*s.snapshots, sn]
        t_off, nb = _write_table(s, txn, snaps)
    except BaseException:
        txn.rollback()
        raise
    s.commit(txn, l1_table_offset=l1_off, l1_size=len(new_l1), nb_snapshots=nb, snapshots_offset=t_off)
    s.l1_table = new_l1
    s.snapshots = snaps
    s.l2_cache.update(copies)
    return sn


def _check_disk_size(s: Qcow2State, sn: QCowSnapshot) -> None:
    if sn.disk_size is not None and sn.disk_size != s.size:
        raise SnapshotError("qcow2: Loading snapshots with different disk size is not implemented")


def snapshot_goto_check(s: Qcow2State, sn: QCowSnapshot) -> None:
    """snapshot_goto()'s reads and checks, nothing written."""
    _check_disk_size(s, sn)
    sn_l1 = read_snapshot_l1(s, sn)
    for i in range(min(s.l1_vm_state_index, len(sn_l1))):
        off = int(sn_l1[i]) & L1E_OFFSET_MASK
        if off:
            cluster.referenced_clusters(s, cluster.load_l2(s, off, i))


def snapshot_goto(s: Qcow2State, sn: QCowSnapshot) -> QCowSnapshot:
    """qcow2_snapshot_goto(): the active L1 becomes copies of the snapshot's disk L2 tables."""
    _check_disk_size(s, sn)
    sn_l1 = read_snapshot_l1(s, sn)
    disk_l1 = min(s.l1_vm_state_index, len(sn_l1))
    new_l1 = np.zeros(max(s.l1_size, s.l1_vm_state_index), dtype=_U64)
    txn = RefcountTxn(s.refcounts)
    copies: dict[int, np.ndarray] = {}
    try:
        sources = []
        for i in range(disk_l1):
            off = int(sn_l1[i]) & L1E_OFFSET_MASK
            if off:
                l2 = cluster.load_l2(s, off, i)
                txn.incref(cluster.referenced_clusters(s, l2))
                sources.append((i, l2))
        _drop_tree(s, txn, s.l1_table, s.l1_table_offset)
        for i, l2 in sources:
            copy = _copied_flags(s, txn, l2)
            new = txn.reserve(1)
            s.file.pwrite(new, copy.astype(">u8").tobytes())
            new_l1[i] = _U64(new) | _COPIED
            copies[new] = copy
        l1_off = _write_l1(s, txn, new_l1)
    except BaseException:
        txn.rollback()
        raise
    s.commit(txn, l1_table_offset=l1_off, l1_size=len(new_l1))
    s.l1_table = new_l1
    s.l2_cache.clear()
    s.l2_cache.update(copies)
    return sn


def _fix_active_flags(s: Qcow2State, txn: RefcountTxn) -> tuple[dict[str, int], np.ndarray, dict[int, np.ndarray]]:
    """After refcounts drop, QCOW_OFLAG_COPIED must be set again where they reach 1: rewrite
    (into new clusters) the active L2 tables and L1 whose flags change."""
    fields: dict[str, int] = {}
    new_l1 = s.l1_table.copy()
    copies: dict[int, np.ndarray] = {}
    changed = False
    for i in range(s.l1_size):
        ent = int(s.l1_table[i])
        off = ent & L1E_OFFSET_MASK
        if not off:
            continue
        l2 = cluster.load_l2(s, off, i)
        l2_rc = int(txn.refcounts_after(np.array([off >> s.cluster_bits]))[0])
        if l2_rc == 1:
            want = _copied_flags(s, txn, l2)
            if not np.array_equal(want, l2):
                new = txn.reserve(1)
                s.file.pwrite(new, want.astype(">u8").tobytes())
                txn.decref_range(off, 1)
                copies[new] = want
                off = new
            new_l1[i] = _U64(off) | _COPIED
        else:
            new_l1[i] = _U64(off)
        changed |= int(new_l1[i]) != ent
    if changed:
        fields["l1_table_offset"] = _write_l1(s, txn, new_l1)
        fields["l1_size"] = len(new_l1)
        txn.decref_range(s.l1_table_offset, size_to_clusters(s.cluster_size, s.l1_size * 8))
    return fields, new_l1, copies


def _install(s: Qcow2State, fields: dict[str, int], new_l1: np.ndarray, copies: dict[int, np.ndarray]) -> None:
    if "l1_table_offset" in fields:
        s.l1_table = new_l1
    s.l2_cache.clear()
    s.l2_cache.update(copies)


def snapshot_delete(s: Qcow2State, sn: QCowSnapshot) -> QCowSnapshot:
    """qcow2_snapshot_delete(): free what only the snapshot held, fix COPIED flags."""
    snaps = [x for x in s.snapshots if x is not sn]
    txn = RefcountTxn(s.refcounts)
    try:
        _drop_tree(s, txn, read_snapshot_l1(s, sn), sn.l1_table_offset)
        fields, new_l1, copies = _fix_active_flags(s, txn)
        t_off, nb = _write_table(s, txn, snaps)
    except BaseException:
        txn.rollback()
        raise
    s.commit(txn, nb_snapshots=nb, snapshots_offset=t_off, **fields)
    s.snapshots = snaps
    _install(s, fields, new_l1, copies)
    return sn


@dataclass
class PendingSnapshot:
    """A snapshot whose disk state is frozen but whose table entry is not written yet.

    Used by the background engines: the guest's disk state is taken at the stop instant
    (:func:`snapshot_prepare`), the VM state is written into the frozen tree while the guest
    runs, and :func:`snapshot_finish` adds the table entry last.  A process killed in between
    leaves only leaked clusters.
    """

    table: np.ndarray
    old_l1_offset: int
    old_l1_size: int

    def set_entry(self, i: int, value: int) -> None:
        self.table[i] = value

    def ensure(self, size: int) -> None:
        if size > len(self.table):
            grow = np.zeros(max(size, len(self.table) + len(self.table) // 2) - len(self.table), dtype=_U64)
            self.table = np.concatenate([self.table, grow])


def _give_guest_l2_copies(s: Qcow2State, txn: RefcountTxn, disk_l1: int, new_l1: np.ndarray,
                          copies: dict[int, np.ndarray]) -> None:
    """The snapshot keeps the active disk L2 tables; the guest gets fresh copies of them
    (their clusters gain a reference, QCOW_OFLAG_COPIED cleared) in ``new_l1``."""
    for i in range(disk_l1):
        off = int(s.l1_table[i]) & L1E_OFFSET_MASK
        if not off:
            continue
        l2 = cluster.load_l2(s, off, i)
        txn.incref(cluster.referenced_clusters(s, l2))
        copy = l2 & ~_COPIED
        new = txn.reserve(1)
        s.file.pwrite(new, copy.astype(">u8").tobytes())
        new_l1[i] = _U64(new) | _COPIED
        copies[new] = copy


def snapshot_prepare(s: Qcow2State) -> PendingSnapshot:
    """The first half of snapshot_create: freeze the active tree, give the guest copies."""
    disk_l1 = min(s.l1_vm_state_index, s.l1_size)
    new_l1 = np.zeros(max(s.l1_size, s.l1_vm_state_index), dtype=_U64)
    copies: dict[int, np.ndarray] = {}
    frozen = s.l1_table.copy()
    # The frozen tree must not carry VM state of an earlier, unfinished save.
    frozen[disk_l1:] = 0
    txn = RefcountTxn(s.refcounts)
    try:
        _give_guest_l2_copies(s, txn, disk_l1, new_l1, copies)
        l1_off = _write_l1(s, txn, new_l1)
        # VM state left in the active L1 by an earlier blocking save goes with the old table.
        _drop_vmstate_entries(s, txn, s.l1_table[disk_l1:])
    except BaseException:
        txn.rollback()
        raise
    pending = PendingSnapshot(frozen, s.l1_table_offset, s.l1_size)
    s.commit(txn, l1_table_offset=l1_off, l1_size=len(new_l1))
    s.l1_table = new_l1
    s.l2_cache.update(copies)
    return pending


def _drop_vmstate_entries(s: Qcow2State, txn: RefcountTxn, entries: np.ndarray) -> None:
    offs = [int(e) & L1E_OFFSET_MASK for e in entries if int(e) & L1E_OFFSET_MASK]
    if offs:
        idx = np.array(offs, dtype=np.int64) >> s.cluster_bits
        txn.decref(idx)
        after = txn.refcounts_after(idx)
        for off, rc in zip(offs, after.tolist(), strict=True):
            if rc == 0:
                txn.decref(cluster.referenced_clusters(s, cluster.load_l2(s, off, 0)))


def snapshot_finish(s: Qcow2State, p: PendingSnapshot, name: str, *, vm_state_size: int, date_sec: int,
                    date_nsec: int, vm_clock_nsec: int, icount: int = -1) -> QCowSnapshot:
    """The second half: the frozen tree (with its VM state) gets its table entry, last."""
    if any(sn.name == name for sn in s.snapshots):
        raise SnapshotExistsError(f"Snapshot '{name}' already exists")
    txn = RefcountTxn(s.refcounts)
    try:
        l1_off = _write_l1(s, txn, p.table)
        if p.old_l1_size:
            txn.decref_range(p.old_l1_offset, size_to_clusters(s.cluster_size, p.old_l1_size * 8))
        sn = QCowSnapshot(id_str=find_new_snapshot_id(s), name=name, l1_table_offset=l1_off, l1_size=len(p.table),
                          vm_state_size=vm_state_size, date_sec=date_sec, date_nsec=date_nsec,
                          vm_clock_nsec=vm_clock_nsec, disk_size=s.size, icount=icount)
        snaps = [*s.snapshots, sn]
        t_off, nb = _write_table(s, txn, snaps)
    except BaseException:
        txn.rollback()
        raise
    s.commit(txn, nb_snapshots=nb, snapshots_offset=t_off)
    s.snapshots = snaps
    return sn


def _free_pending_vmstate(s: Qcow2State, p: PendingSnapshot) -> None:
    """The pending tree's VM state freed in place: its L2 tables and data are referenced by
    nothing on disk (the pending L1 is written only by snapshot_finish), so refcount 1 -> 0
    leaves no reference behind at any instant, and needs no free cluster (a full disk)."""
    disk_l1 = min(s.l1_vm_state_index, len(p.table))
    for i in range(disk_l1, len(p.table)):
        off = int(p.table[i]) & L1E_OFFSET_MASK
        if not off:
            continue
        c = off >> s.cluster_bits
        if s.refcounts.get_refcount(c) != 1:
            continue  # shared: left to the shadow commit
        data = cluster.referenced_clusters(s, cluster.load_l2(s, off, i))
        only = data[s.refcounts.get_refcounts(data) == 1] if len(data) else data
        if len(only) != len(data):
            continue
        s.refcounts.update_clusters(data, -1)
        s.refcounts.update_clusters(np.array([c]), -1)
        s.l2_cache.pop(off, None)
        p.table[i] = 0


def snapshot_abort(s: Qcow2State, p: PendingSnapshot) -> None:
    """Give back everything a pending snapshot held: its VM state in place first (so a full
    disk has the clusters back), the rest (the frozen disk tree, QCOW_OFLAG_COPIED of the
    guest's tables) with one shadow commit."""
    _free_pending_vmstate(s, p)
    txn = RefcountTxn(s.refcounts)

    def held() -> int:  # the clusters this give-back would free
        return len(np.unique(np.concatenate(txn.pending))) if txn.pending else 0

    try:
        _drop_tree(s, txn, p.table, 0)
        if p.old_l1_size:
            txn.decref_range(p.old_l1_offset, size_to_clusters(s.cluster_size, p.old_l1_size * 8))
        fields, new_l1, copies = _fix_active_flags(s, txn)
    except BaseException as err:
        n = held()
        txn.rollback()
        _leaked(s, err, n)
        raise
    n = held()  # before the commit, which adds the old refcount table's clusters
    try:
        s.commit(txn, **fields)
    except BlockIOError as err:
        _leaked(s, err, n)
        raise
    _install(s, fields, new_l1, copies)


def _leaked(s: Qcow2State, err: BaseException, held: int) -> None:
    """A give-back the disk refused: what it would have freed stays referenced, a leak, said
    so as :func:`cluster.free_quietly` says it (``qemu-img check`` counts the same clusters)."""
    if isinstance(err, BlockIOError) and held:
        s.messages.append(f"qcow2: {held} cluster(s) leaked: could not free them")
