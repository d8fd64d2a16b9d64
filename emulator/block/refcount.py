"""qcow2 reference counts: lookup, allocation, and atomic metadata commits.

Mirrors QEMU's block/qcow2-refcount.c: ``alloc_clusters``, ``update_refcount``,
``free_clusters``, ``get_refcount``.  Two ways of changing refcounts live here:

* **In place** (the guest-write path, as QEMU does it): a refcount is raised
  before anything points at the cluster and lowered only after nothing does, so
  a process killed between two writes leaves leaks, never corruption.

* **Shadow commit** (:class:`RefcountTxn`, used by snapshot create/goto/delete,
  L1 growth, refcount block creation and repair): every refcount block the
  operation touches is written to a fresh cluster, with a fresh refcount table,
  and the switch happens in *one* write of header bytes 36..71.  Snapshot
  operations change refcounts and ``QCOW_OFLAG_COPIED`` flags in different
  clusters; no order of in-place writes keeps those consistent at every instant,
  so snaplab commits them together (see docs/deviations.md).  A large write
  creates the refcount blocks of all of it in one such commit (``allocating``).

Refcount blocks are cached as native numpy arrays; the table is a numpy array.
The image is reached only through the callbacks :class:`Refcounts` is built with
(write the header pointers, sync, grow the file).  Imports none of the other qcow2
modules but format.py and io.py, and neither unicorn nor asyncio.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterator

import numpy as np

from emulator.block.format import REFT_OFFSET_MASK
from emulator.block.io import BlockFile, data_extents
from emulator.errors import (
    BlockIOError,
    ImageCorruptError,
    ImageFormatError,
    ReadOnlyError,
    UnsupportedFeatureError,
)

_DTYPES = {3: np.uint8, 4: np.uint16, 5: np.uint32, 6: np.uint64}


MAX_BLOCKS_PER_COMMIT = 4096  # refcount blocks one allocation creates ahead at most (2 MiB of blocks at 512 B)


def _no_hook(end: int) -> None:
    """The default ``on_alloc``: nothing to do."""


def size_to_clusters(cluster_size: int, size: int) -> int:
    return -(-size // cluster_size)


class Refcounts:
    """The refcount table and its blocks for one image (part of BDRVQcow2State)."""

    def __init__(self, file: BlockFile, cluster_bits: int, refcount_order: int,
                 table_offset: int, table_clusters: int, *, read_only: bool,
                 write_pointers: Callable[[int, int], None], sync: Callable[[], None],
                 on_alloc: Callable[[int], None] | None = None) -> None:
        """``write_pointers(reftable_offset, reftable_clusters)`` writes the header pointers of a
        commit (header bytes 36..71, one write); ``sync`` is the durability point before that
        write (the image may defer it); ``on_alloc`` is called with the end offset of every
        allocation (the image may grow the file ahead)."""
        if refcount_order not in _DTYPES:
            raise UnsupportedFeatureError(
                f"refcount_order {refcount_order} ({1 << refcount_order}-bit refcounts) is not supported; "
                "snaplab handles refcount_bits 8, 16, 32 and 64")
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.refcount_order = refcount_order
        self.dtype = np.dtype(_DTYPES[refcount_order])
        self.disk_dtype = self.dtype.newbyteorder(">")
        self.entry_bytes = self.dtype.itemsize
        self.block_bits = cluster_bits + 3 - refcount_order
        self.entries_per_block = 1 << self.block_bits
        self.max_refcount = (1 << (1 << refcount_order)) - 1
        self.read_only = read_only
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = file.pread(table_offset, table_clusters * self.cluster_size)
        self.table = np.frombuffer(raw, ">u8").astype(np.uint64)
        self.blocks: dict[int, np.ndarray] = {}
        self.free_hint = 0
        self.ahead_hint = 0  # clusters the allocation in progress may still take (allocating())
        # Clusters the last metadata commit freed (written, so the file system holds their
        # blocks), kept for the next commit: a load or delete on a full file system then
        # finds room for its new metadata.  Free (refcount 0) on disk; data never takes them.
        self.spare: list[int] = []
        self.txn: RefcountTxn | None = None
        self.write_pointers = write_pointers
        self.sync = sync
        self.on_alloc: Callable[[int], None] = on_alloc if on_alloc is not None else _no_hook

    # -- lookup ---------------------------------------------------------------
    def block_offset(self, b: int) -> int:
        if b >= len(self.table):
            return 0
        off = int(self.table[b]) & REFT_OFFSET_MASK
        if off and off % self.cluster_size:
            raise ImageCorruptError(f"Refblock offset {off:#x} unaligned (reftable index: {b:#x})")
        return off

    def block(self, b: int) -> np.ndarray | None:
        """The cached refcount block ``b``; None where the table has no block."""
        arr = self.blocks.get(b)
        if arr is not None:
            return arr
        off = self.block_offset(b)
        if off == 0:
            return None
        raw = self.file.pread(off, self.cluster_size)
        arr = np.frombuffer(raw, self.disk_dtype).astype(self.dtype)
        self.blocks[b] = arr
        return arr

    def get_refcount(self, cluster: int) -> int:
        """QEMU's qcow2_get_refcount()."""
        blk = self.block(cluster >> self.block_bits)
        return 0 if blk is None else int(blk[cluster & (self.entries_per_block - 1)])

    def get_refcounts(self, clusters: np.ndarray) -> np.ndarray:
        """Refcounts of many clusters at once, as int64."""
        clusters = np.asarray(clusters, dtype=np.int64)
        out = np.zeros(len(clusters), dtype=np.int64)
        if len(clusters) == 0:
            return out
        bidx = clusters >> self.block_bits
        for b in np.unique(bidx):
            blk = self.block(int(b))
            if blk is None:
                continue
            sel = bidx == b
            out[sel] = blk[clusters[sel] & (self.entries_per_block - 1)]
        return out

    def all_refcounts(self, nb_clusters: int) -> np.ndarray:
        """Stored refcounts of clusters [0, nb_clusters) as int64 (for check; a block whose
        table entry is unaligned reads as none: the check reports the entry)."""
        out = np.zeros(nb_clusters, dtype=np.int64)
        epb = self.entries_per_block
        for b in range(min(len(self.table), size_to_clusters(epb, nb_clusters))):
            if int(self.table[b]) & REFT_OFFSET_MASK & (self.cluster_size - 1):
                continue
            blk = self.block(b)
            if blk is None:
                continue
            lo = b * epb
            hi = min(lo + epb, nb_clusters)
            out[lo:hi] = blk[:hi - lo]
        return out

    # -- allocation -----------------------------------------------------------
    def find_free(self, n: int, start: int) -> int:
        """First index of ``n`` consecutive clusters with refcount 0 (alloc_clusters_noref)."""
        epb = self.entries_per_block
        run_start = start
        run_len = 0
        idx = start
        while True:
            b = idx >> self.block_bits
            lo = idx - b * epb
            blk = self.block(b)
            if blk is None or not blk[lo:].any():
                if run_len == 0:
                    run_start = idx
                run_len += epb - lo
                if run_len >= n:
                    return run_start
                idx = (b + 1) * epb
                continue
            nz = np.flatnonzero(blk[lo:])
            first = int(nz[0])
            if run_len + first >= n:
                return run_start if run_len else idx
            if len(nz) > 1:
                gaps = np.flatnonzero(np.diff(nz) > n)
                if len(gaps):
                    return idx + int(nz[gaps[0]]) + 1
            last = int(nz[-1])
            run_start = idx + last + 1
            run_len = epb - lo - last - 1
            if run_len >= n:
                return run_start
            idx = (b + 1) * epb

    def find_free_data(self, n: int) -> int:
        """:meth:`find_free` for data: the spare clusters of metadata commits are skipped."""
        start = self.find_free(n, self.free_hint)
        sp = self.spare
        while sp:
            first, last = bisect.bisect_left(sp, start), bisect.bisect_left(sp, start + n)
            if first == last:  # no spare cluster in [start, start + n)
                break
            start = self.find_free(n, sp[last - 1] + 1)
        return start

    def recover_spare(self, file_clusters: int, want: int) -> None:
        """Find the spare again in a reopened image: free clusters inside the file whose blocks
        the file system holds (not holes), the first ``want`` of them.  The last commit before
        the image was closed left its spare there, so a delete or load after the reopen finds
        room on a full file system, and data allocated meanwhile does not take it (deviation
        54).  Nothing is written: a cluster becomes metadata only when a commit takes it, and
        :meth:`take_spare` checks then that it is still free.  Clusters whose refcount block
        is missing are not known to be free and are left alone."""
        refs = self.all_refcounts(file_clusters)
        for b in range(size_to_clusters(self.entries_per_block, file_clusters)):
            if self.block_offset(b) == 0:
                refs[b * self.entries_per_block:(b + 1) * self.entries_per_block] = 1
        refs[:1] = 1  # the header
        cb = self.cluster_bits
        found: list[int] = []
        for start, end in data_extents(self.file, 0, file_clusters << cb):
            lo, hi = -(-start >> cb), end >> cb  # clusters wholly inside the extent
            found.extend((np.flatnonzero(refs[lo:hi] == 0) + lo)[:want - len(found)].tolist())
            if len(found) >= want:
                break
        self.spare = sorted(set(self.spare) | set(found))

    def take_spare(self, n: int) -> int | None:
        """``n`` consecutive spare clusters for a metadata commit (taken off the spare list),
        or None.  Spare clusters that are no longer free (a refcount repair found them in use)
        are dropped first."""
        if self.spare:
            self.spare = [c for c, r in zip(self.spare, self.get_refcounts(np.array(self.spare)), strict=True) if r == 0]
        sp = self.spare
        for i in range(len(sp) - n + 1):
            if sp[i + n - 1] - sp[i] == n - 1:
                start = sp[i]
                del sp[i:i + n]
                return start
        return None

    def alloc_clusters(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters (refcount 0 -> 1); returns the byte offset.

        QEMU's qcow2_alloc_clusters().  Missing refcount blocks, or a refcount
        table too small, are created first with a shadow commit.
        """
        if self.txn is not None:
            return self.txn.reserve(n)
        start, _ = self._claim(lambda: (self.find_free_data(n), n), first_fit=n == 1)
        return start << self.cluster_bits

    @contextlib.contextmanager
    def allocating(self, n: int) -> Iterator[None]:
        """Allocations inside will take up to ``n`` clusters in all (a large write, run by
        cluster.write_clusters() one L2 table at a time): the first that needs a refcount block
        creates those of the rest too (:meth:`_claim`)."""
        before, self.ahead_hint = self.ahead_hint, max(self.ahead_hint, n)
        try:
            yield
        finally:
            self.ahead_hint = before

    def _claim(self, find: Callable[[], tuple[int, int]], first_fit: bool = False) -> tuple[int, int]:
        """The run of free clusters ``find`` names, allocated (refcount 0 -> 1).  Refcount
        blocks it lacks are created first with a shadow commit, which may take clusters, so
        ``find`` is asked again after one.  Returns (first cluster, count).

        When a commit is needed inside :meth:`allocating`, it creates the missing blocks of
        the clusters the write may still take too (at most
        :data:`MAX_BLOCKS_PER_COMMIT`): a large request into fresh space makes one commit, not
        one per block (with 512-byte clusters a block covers 128 KiB, and every commit writes
        the whole refcount table again and flushes).

        ``first_fit``: ``find`` returns the first cluster at or after ``free_hint`` that data
        may take, so everything before it is in use or spare and the hint moves past it (else
        every allocation would scan again from a spare cluster near the start of the file)."""
        while True:
            start, n = find()
            first_b = start >> self.block_bits
            last_b = (start + n - 1) >> self.block_bits
            if all(self.block_offset(b) != 0 for b in range(first_b, last_b + 1)):
                break
            ahead = min((start + self.ahead_hint - 1) >> self.block_bits, first_b + MAX_BLOCKS_PER_COMMIT - 1)
            last_b = max(last_b, ahead)
            missing = [b for b in range(first_b, last_b + 1) if self.block_offset(b) == 0]
            txn = RefcountTxn(self)
            txn.spare_discount = len(missing) - 1  # the next commit of a lone block needs no more spare
            for b in missing:
                txn.touch(b)
            txn.commit(self.write_pointers)
        self.on_alloc((start + n) << self.cluster_bits)  # the file grown first: a failure leaks nothing
        self.update_range(start, n, +1)
        if start == self.free_hint or (first_fit and start > self.free_hint):
            self.free_hint = start + n
        return start, n

    def _first_free_run(self, idx: int, cap: int) -> tuple[int, int]:
        """The first run of free, non-spare clusters at or after ``idx``, inside one refcount
        block and at most ``cap`` long: (first cluster, length)."""
        epb = self.entries_per_block
        while True:
            b = idx >> self.block_bits
            lo = idx - b * epb
            blk = self.block(b)
            if blk is None:
                start, end = idx, (b + 1) * epb
            else:
                free = np.flatnonzero(blk[lo:] == 0)
                if not len(free):
                    idx = (b + 1) * epb
                    continue
                start = idx + int(free[0])
                used = np.flatnonzero(blk[start - b * epb:])
                end = start + int(used[0]) if len(used) else (b + 1) * epb
            end = min(end, start + cap)
            i = bisect.bisect_left(self.spare, start)
            if i < len(self.spare) and self.spare[i] < end:
                if self.spare[i] == start:
                    idx = start + 1
                    continue
                end = self.spare[i]
            return start, end - start

    def alloc_cluster_runs(self, n: int) -> np.ndarray:
        """Allocate ``n`` clusters for data, filling the file's free runs first fit (refcount
        0 -> 1); returns their indices, in allocation order.

        QEMU asks for one run per request (qcow2_alloc_clusters()), but its VM state arrives
        in pieces of a few hundred KiB at most, so it fills whatever holes deletes left;
        snaplab's pieces are up to 32 MiB, and one run of that size would grow a file that
        still has room (on a full file system, fail).  Deviation 54.
        """
        if self.txn is not None:
            start = self.txn.reserve(n) >> self.cluster_bits
            return np.arange(start, start + n, dtype=np.int64)
        parts: list[np.ndarray] = []
        left = n
        try:
            while left:
                start, length = self._claim(lambda: self._first_free_run(self.free_hint, left),  # noqa: B023
                                            first_fit=True)
                parts.append(np.arange(start, start + length, dtype=np.int64))
                left -= length
        except BaseException:
            if parts:  # what this call took goes back (nothing points at it yet); a refused
                try:   # write leaks it, as qcow2_free_clusters() does (check reports it)
                    self.update_clusters(np.concatenate(parts), -1)
                except BlockIOError:
                    pass
            raise
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def highest_used(self) -> int:
        """End offset of the last cluster with a non-zero refcount."""
        for b in range(len(self.table) - 1, -1, -1):
            blk = self.block(b)
            if blk is not None and blk.any():
                return (b * self.entries_per_block + int(np.flatnonzero(blk)[-1]) + 1) << self.cluster_bits
        return 0

    def update_range(self, start: int, n: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of clusters [start, start+n), in place."""
        b = start >> self.block_bits
        blk = self.block(b) if n > 0 and (start + n - 1) >> self.block_bits == b and not self.read_only else None
        if blk is None:  # several blocks, a missing one, or read-only: the general path says what is wrong
            self.update_clusters(np.arange(start, start + n, dtype=np.int64), delta)
            return
        lo = start & (self.entries_per_block - 1)
        vals = blk[lo:lo + n].astype(np.int64) + delta
        bad = np.flatnonzero((vals < 0) | (vals > self.max_refcount))
        if len(bad):
            raise ImageCorruptError(f"Refcount of cluster {start + int(bad[0])} would become "
                                    f"{int(vals[bad[0]])}, outside [0, {self.max_refcount}]")
        # On disk first: a failed write leaves the cached block what the disk holds.
        self.file.pwrite(self.block_offset(b) + lo * self.entry_bytes, vals.astype(self.disk_dtype).tobytes())
        blk[lo:lo + n] = vals.astype(self.dtype)
        if delta < 0:
            self.free_hint = min(self.free_hint, start)

    def update_clusters(self, clusters: np.ndarray, delta: int) -> None:
        """QEMU's update_refcount(): in place, one write per refcount block touched.

        Repeated indices count repeatedly.  Raises ImageCorruptError (and changes
        nothing) if a refcount would leave [0, max].
        """
        clusters = np.asarray(clusters, dtype=np.int64)
        if len(clusters) == 0:
            return
        if self.read_only:
            raise ImageCorruptError("refcount update on a read-only image")
        bidx = clusters >> self.block_bits
        mask = self.entries_per_block - 1
        plans = []
        for b in np.unique(bidx):
            b = int(b)
            blk = self.block(b)
            if blk is None:
                raise ImageCorruptError(f"Refcount block missing for cluster {int(clusters[bidx == b][0])} "
                                        "(a cluster in use has no refcount)")
            local = clusters[bidx == b] & mask
            new = blk.astype(np.int64)
            np.add.at(new, local, delta)
            touched = np.unique(local)
            vals = new[touched]
            if (vals < 0).any() or (vals > self.max_refcount).any():
                bad = int(touched[np.flatnonzero((vals < 0) | (vals > self.max_refcount))[0]])
                raise ImageCorruptError(
                    f"Refcount of cluster {b * self.entries_per_block + bad} would become "
                    f"{int(new[bad])}, outside [0, {self.max_refcount}]")
            plans.append((b, blk, touched, vals))
        for b, blk, touched, vals in plans:
            # On disk first: a failed write leaves the cached block what the disk holds.
            new = blk.copy()
            new[touched] = vals.astype(self.dtype)
            lo, hi = int(touched[0]), int(touched[-1]) + 1
            self.file.pwrite(self.block_offset(b) + lo * self.entry_bytes,
                             new[lo:hi].astype(self.disk_dtype).tobytes())
            blk[touched] = new[touched]
        if delta < 0:
            self.free_hint = min(self.free_hint, int(clusters.min()))

    def free_clusters(self, offset: int, n: int) -> None:
        """QEMU's qcow2_free_clusters() for ``n`` clusters at byte ``offset``."""
        self.update_range(offset >> self.cluster_bits, n, -1)


def rebuild_refcount_structure(rc: Refcounts, counts: np.ndarray, start: int) -> None:
    """rebuild_refcount_structure(): a new refcount table and blocks holding ``counts``
    (one per cluster from 0), written from cluster ``start`` on (past everything in use),
    then switched in with one header write; the old structure is then unreferenced.
    Blocks all of whose entries would be 0 are left out (table entry 0)."""
    if rc.read_only:
        raise ReadOnlyError("image is read-only")
    cs, epb = rc.cluster_size, rc.entries_per_block
    used_blocks = set(np.unique(np.flatnonzero(counts) >> rc.block_bits).tolist())
    n_blk, n_tab = 0, 1
    while True:  # the structure's own clusters need refcounts too: to a fixed point
        own = np.arange(start, start + n_blk + n_tab, dtype=np.int64)
        blocks = sorted(used_blocks | set((own >> rc.block_bits).tolist()))
        tab = size_to_clusters(cs, (blocks[-1] + 1) * 8)
        if (len(blocks), tab) == (n_blk, n_tab):
            break
        n_blk, n_tab = len(blocks), tab
    new = np.zeros((blocks[-1] + 1) * epb, dtype=np.int64)
    new[:len(counts)] = counts
    new[own] += 1
    if int(new.max()) > rc.max_refcount:
        raise ImageCorruptError(f"a refcount of {int(new.max())} does not fit {1 << rc.refcount_order} bits")
    table = np.zeros(n_tab * cs // 8, dtype=np.uint64)
    data = bytearray()
    for i, b in enumerate(blocks):
        table[b] = (start + i) << rc.cluster_bits
        data += new[b * epb:(b + 1) * epb].astype(rc.disk_dtype).tobytes()
    table_offset = (start + n_blk) << rc.cluster_bits
    rc.file.pwrite(start << rc.cluster_bits, bytes(data))
    rc.file.pwrite(table_offset, table.astype(">u8").tobytes())
    rc.sync()
    rc.write_pointers(table_offset, n_tab)  # one header write
    rc.table_offset, rc.table_clusters = table_offset, n_tab
    rc.table = table
    rc.blocks = {}
    rc.free_hint = 0
    rc.spare = []


class RefcountTxn:
    """A shadow commit of refcount changes (see the module docstring).

    ``reserve`` and ``incref`` act at once on the cached blocks (a reserved
    cluster is free in the committed state, so writing it is harmless until the
    commit); ``decref`` is deferred to the commit, so a cluster that is still
    live on disk can never be handed out again before the switch.
    """

    def __init__(self, rc: Refcounts) -> None:
        if rc.txn is not None:
            raise RuntimeError("nested refcount transaction")
        self.rc = rc
        self.saved_table = rc.table.copy()
        self.saved_table_loc = (rc.table_offset, rc.table_clusters)
        self.saved_blocks: dict[int, np.ndarray | None] = {}
        self.saved_hint = rc.free_hint
        self.saved_spare = list(rc.spare)
        self.reserved = 0  # clusters this commit allocates (how many the next one may need)
        self.spare_discount = 0  # of those, how many the spare need not cover (blocks made ahead of need)
        self.dirty: set[int] = set()
        self.pending: list[np.ndarray] = []
        rc.txn = self

    def touch(self, b: int) -> np.ndarray:
        """Mark block ``b`` as changed (created if missing); returns the cached array."""
        rc = self.rc
        if b not in self.saved_blocks:
            blk = rc.block(b)
            self.saved_blocks[b] = None if blk is None else blk.copy()
            if blk is None:
                rc.blocks[b] = np.zeros(rc.entries_per_block, dtype=rc.dtype)
        self.dirty.add(b)
        return rc.blocks[b]

    def _add(self, clusters: np.ndarray, delta: int) -> None:
        rc = self.rc
        bidx = clusters >> rc.block_bits
        mask = rc.entries_per_block - 1
        for b in np.unique(bidx):
            blk = self.touch(int(b))
            local = clusters[bidx == b] & mask
            new = blk.astype(np.int64)
            np.add.at(new, local, delta)
            if (new < 0).any() or (new > rc.max_refcount).any():
                raise ImageCorruptError(f"Refcount out of range in refcount block {int(b)}")
            blk[:] = new.astype(rc.dtype)

    def reserve(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters for new metadata; returns the byte offset."""
        rc = self.rc
        start = rc.take_spare(n)
        if start is None:
            start = rc.find_free(n, rc.free_hint)
            rc.spare = [c for c in rc.spare if not start <= c < start + n]
        self._add(np.arange(start, start + n, dtype=np.int64), +1)
        self.reserved += n
        if start == rc.free_hint:
            rc.free_hint = start + n
        rc.on_alloc((start + n) << rc.cluster_bits)
        return start << rc.cluster_bits

    def unreserve(self, offset: int, n: int) -> None:
        start = offset >> self.rc.cluster_bits
        self._add(np.arange(start, start + n, dtype=np.int64), -1)

    def incref(self, clusters: np.ndarray) -> None:
        clusters = np.asarray(clusters, dtype=np.int64)
        if len(clusters):
            self._add(clusters, +1)

    def decref(self, clusters: np.ndarray) -> None:
        clusters = np.asarray(clusters, dtype=np.int64)
        if len(clusters) == 0:
            return
        self.pending.append(clusters.copy())
        for b in np.unique(clusters >> self.rc.block_bits):
            self.touch(int(b))

    def decref_range(self, offset: int, n: int) -> None:
        start = offset >> self.rc.cluster_bits
        self.decref(np.arange(start, start + n, dtype=np.int64))

    def refcounts_after(self, clusters: np.ndarray) -> np.ndarray:
        """Refcounts the clusters will have once the pending decrements apply."""
        clusters = np.asarray(clusters, dtype=np.int64)
        cur = self.rc.get_refcounts(clusters)
        if self.pending and len(clusters):
            u, c = np.unique(np.concatenate(self.pending), return_counts=True)
            pos = np.searchsorted(u, clusters)
            pos_c = np.minimum(pos, len(u) - 1)
            hit = (pos < len(u)) & (u[pos_c] == clusters)
            cur[hit] -= c[pos_c[hit]]
        return cur

    def commit(self, write_pointers: Callable[[int, int], None]) -> None:
        """Write shadow refcount blocks and table, flush, then switch the header.

        ``write_pointers(reftable_offset, reftable_clusters)`` must write header
        bytes 36..71 in one write (and may flush); everything the new pointers
        reach must already be written by the caller.
        """
        rc = self.rc
        try:
            self.decref_range(self.saved_table_loc[0], self.saved_table_loc[1])
            shadow: dict[int, int] = {}
            table_off = 0
            table_entries = 0
            table_clusters = 0
            while True:
                for b in sorted(self.dirty - shadow.keys()):
                    shadow[b] = self.reserve(1)
                    old = (int(self.saved_table[b]) & REFT_OFFSET_MASK) if b < len(self.saved_table) else 0
                    if old:
                        self.decref_range(old, 1)
                if self.dirty - shadow.keys():
                    continue
                need = max(max(self.dirty, default=0) + 1, len(self.saved_table))
                if table_entries < need:
                    if table_off:
                        self.unreserve(table_off, table_clusters)
                    grow = need if need <= len(self.saved_table) else need + need // 2
                    table_clusters = size_to_clusters(rc.cluster_size, grow * 8)
                    if table_clusters * rc.cluster_size > (8 << 20):
                        raise ImageFormatError("refcount_table_clusters", "Reference count table too large")
                    table_entries = table_clusters * rc.cluster_size // 8
                    table_off = self.reserve(table_clusters)
                    continue
                if not (self.dirty - shadow.keys()):
                    break
            # Apply the deferred decrements, now that nothing more is allocated.
            if self.pending:
                allp = np.concatenate(self.pending)
                bidx = allp >> rc.block_bits
                mask = rc.entries_per_block - 1
                for b in np.unique(bidx):
                    blk = rc.blocks[int(b)]
                    new = blk.astype(np.int64)
                    np.subtract.at(new, allp[bidx == b] & mask, 1)
                    if (new < 0).any():
                        bad = int(np.flatnonzero(new < 0)[0])
                        raise ImageCorruptError(
                            f"Refcount of cluster {int(b) * rc.entries_per_block + bad} would drop below 0")
                    blk[:] = new.astype(rc.dtype)
                rc.free_hint = min(rc.free_hint, int(allp.min()))
            new_table = np.zeros(table_entries, dtype=np.uint64)
            new_table[:len(self.saved_table)] = self.saved_table
            for b, off in shadow.items():
                new_table[b] = off
            for b, off in sorted(shadow.items()):
                rc.file.pwrite(off, rc.blocks[b].astype(rc.disk_dtype).tobytes())
            rc.file.pwrite(table_off, new_table.astype(">u8").tobytes())
            rc.sync()
            write_pointers(table_off, table_clusters)
        except BaseException:
            self.rollback()
            raise
        rc.table = new_table
        rc.table_offset = table_off
        rc.table_clusters = table_clusters
        rc.txn = None
        self._keep_spare()

    def _keep_spare(self) -> None:
        """The clusters this commit freed become spare for the next commit, topped up to a
        little more than this one allocated with free clusters written with zeros now, so the
        file system holds their blocks.  A full file system only leaves the spare short."""
        rc = self.rc
        want = max(4, self.reserved - self.spare_discount + 2)
        spare = set(rc.spare)
        if self.pending:
            freed = np.unique(np.concatenate(self.pending))
            for c in freed[rc.get_refcounts(freed) == 0][:want].tolist():
                if c in spare:
                    continue
                # A freed cluster may be a hole in the file (a sparse VM state's zero pages were
                # never written): zeros written now make the file system hold its blocks, or,
                # on a full one, leave it out.
                try:
                    rc.file.pwrite(c << rc.cluster_bits, bytes(rc.cluster_size))
                except BlockIOError:
                    continue
                spare.add(c)
        kept = sorted(spare)[:max(want, len(rc.spare))]
        if len(kept) < len(spare):  # free clusters no longer spare: data may take them again
            rc.free_hint = min(rc.free_hint, min(spare - set(kept)))
        rc.spare = kept
        while len(rc.spare) < want:
            c = rc.find_free_data(1)
            try:
                rc.on_alloc((c + 1) << rc.cluster_bits)
                rc.file.pwrite(c << rc.cluster_bits, bytes(rc.cluster_size))
            except BlockIOError:
                return
            bisect.insort(rc.spare, c)

    def rollback(self) -> None:
        """Forget every change: the committed state on disk is untouched."""
        rc = self.rc
        rc.table = self.saved_table
        rc.table_offset, rc.table_clusters = self.saved_table_loc
        for b, saved in self.saved_blocks.items():
            if saved is None:
                rc.blocks.pop(b, None)
            else:
                rc.blocks[b] = saved
        rc.free_hint = self.saved_hint
        rc.spare = self.saved_spare
        rc.txn = None
