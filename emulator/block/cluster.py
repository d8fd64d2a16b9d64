"""qcow2 guest-to-host mapping: L1/L2 lookup, cluster allocation and copy-on-write.

Mirrors QEMU's block/qcow2-cluster.c (``qcow2_get_host_offset``,
``qcow2_alloc_host_offset``, ``l2_allocate``, ``qcow2_grow_l1_table``,
``qcow2_cluster_discard``, ``qcow2_subcluster_zeroize``), working on whole runs
of clusters with numpy instead of one cluster at a time.

Ordering on the write path (what makes a killed process leave only leaks):
refcount +1 of new clusters -> data -> L2 entry -> refcount -1 of replaced ones.
Works on the image through :class:`~emulator.block.state.Qcow2State`; imports
neither qcow2.py, snapshot.py nor check.py, and neither unicorn nor asyncio.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import NamedTuple, Protocol

import numpy as np

from emulator.block.format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
)
from emulator.block.io import zero_fill
from emulator.block.refcount import RefcountTxn, size_to_clusters
from emulator.block.state import Qcow2State
from emulator.errors import BlockIOError, ImageCorruptError

# Cluster kinds (QEMU's QCow2ClusterType, folded)
UNALLOCATED = 0
ZERO_PLAIN = 1
ZERO_ALLOC = 2
NORMAL = 3
COMPRESSED = 4

_U64 = np.uint64
_COPIED = _U64(QCOW_OFLAG_COPIED)
_COMPRESSED = _U64(QCOW_OFLAG_COMPRESSED)
_ZERO = _U64(QCOW_OFLAG_ZERO)
_L2_MASK = _U64(L2E_OFFSET_MASK)


def cluster_kinds(s: Qcow2State, ents: np.ndarray) -> np.ndarray:
    """Vectorised qcow2_get_cluster_type()."""
    kinds = np.full(len(ents), UNALLOCATED, dtype=np.int8)
    comp = (ents & _COMPRESSED) != 0
    off = (ents & _L2_MASK) != 0
    zero = ((ents & _ZERO) != 0) if s.version >= 3 else np.zeros(len(ents), dtype=bool)
    kinds[off] = NORMAL
    kinds[zero & off] = ZERO_ALLOC
    kinds[zero & ~off] = ZERO_PLAIN
    kinds[comp] = COMPRESSED
    return kinds


def compressed_clusters(s: Qcow2State, ent: int) -> tuple[int, int, np.ndarray]:
    """Host offset, byte length and host clusters of a compressed descriptor."""
    x = 62 - (s.cluster_bits - 8)
    host = ent & ((1 << x) - 1)
    nb_sectors = ((ent >> x) & ((1 << (s.cluster_bits - 8)) - 1)) + 1
    length = nb_sectors * 512 - (host & 511)
    first = host >> s.cluster_bits
    last = (host + length - 1) >> s.cluster_bits
    return host, length, np.arange(first, last + 1, dtype=np.int64)


def referenced_clusters(s: Qcow2State, ents: np.ndarray) -> np.ndarray:
    """Host clusters an array of L2 entries holds a reference to (one per reference)."""
    kinds = cluster_kinds(s, ents)
    plain = (kinds == NORMAL) | (kinds == ZERO_ALLOC)
    out = [(ents[plain] & _L2_MASK).astype(np.int64) >> s.cluster_bits]
    for e in ents[kinds == COMPRESSED]:
        out.append(compressed_clusters(s, int(e))[2])
    return np.concatenate(out) if len(out) > 1 else out[0]


def load_l2(s: Qcow2State, l2_offset: int, l1_index: int) -> np.ndarray:
    """Read (or take from the cache) the L2 table at ``l2_offset``."""
    if l2_offset & (s.cluster_size - 1):
        raise ImageCorruptError(f"L2 table offset {l2_offset:#x} unaligned (L1 index: {l1_index:#x})")
    arr = s.l2_cache.get(l2_offset)
    if arr is not None:
        s.l2_cache.move_to_end(l2_offset)
        return arr
    if l2_offset + s.cluster_size > s.file_size_hint():
        raise ImageCorruptError(f"L2 table offset {l2_offset:#x} lies past the end of the image (L1 index: {l1_index:#x})")
    arr = np.frombuffer(s.file.pread(l2_offset, s.cluster_size), ">u8").astype(_U64)
    s.l2_cache[l2_offset] = arr
    if len(s.l2_cache) > s.l2_cache_max:
        s.l2_cache.popitem(last=False)
    return arr


def read_through(s: Qcow2State, l1: np.ndarray, offset: int, buf: memoryview, direct: bool = False) -> None:
    """Fill ``buf`` with guest bytes from ``offset`` as mapped by ``l1`` (active or a snapshot's);
    ``direct``: data clusters around the page cache where the file can (VM state)."""
    read_data = getattr(s.file, "preadinto_direct", s.file.preadinto) if direct else s.file.preadinto
    cs = s.cluster_size
    span = 1 << (s.cluster_bits + s.l2_bits)
    end = offset + buf.nbytes
    pos = offset
    while pos < end:
        l1i = pos // span
        slice_end = min(end, (l1i + 1) * span)
        dst = buf[pos - offset:slice_end - offset]
        l2_off = int(l1[l1i]) & L1E_OFFSET_MASK if l1i < len(l1) else 0
        if l2_off == 0:
            read_backing(s, pos, dst)
            pos = slice_end
            continue
        l2 = load_l2(s, l2_off, l1i)
        base = l1i * span
        c0 = (pos - base) >> s.cluster_bits
        c1 = ((slice_end - 1 - base) >> s.cluster_bits) + 1
        ents = l2[c0:c1]
        kinds = cluster_kinds(s, ents)
        hosts = (ents & _L2_MASK).astype(np.int64)
        normal = kinds == NORMAL
        if (hosts[normal] & (cs - 1)).any():
            i = int(np.flatnonzero(normal & ((hosts & (cs - 1)) != 0))[0])
            raise ImageCorruptError(f"Cluster allocation offset {hosts[i]:#x} unaligned "
                                    f"(L2 offset: {l2_off:#x}, L2 index: {c0 + i:#x})")
        readable = np.where(kinds == ZERO_ALLOC, ZERO_PLAIN, kinds)
        n = len(ents)
        brk = np.ones(n, dtype=bool)
        if n > 1:
            brk[1:] = (readable[1:] != readable[:-1]) | (readable[1:] == COMPRESSED) | (
                (readable[1:] == NORMAL) & (hosts[1:] != hosts[:-1] + cs))
        starts = np.flatnonzero(brk)
        stops = np.append(starts[1:], n)
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            g0 = max(pos, base + (c0 + a) * cs)
            g1 = min(slice_end, base + (c0 + b) * cs)
            d = dst[g0 - pos:g1 - pos]
            kind = readable[a]
            if kind == NORMAL:
                read_data(int(hosts[a]) + (g0 - base - (c0 + a) * cs), d)
            elif kind == COMPRESSED:
                data = decompress_cluster(s, int(ents[a]))
                inner = g0 - base - (c0 + a) * cs
                d[:] = data[inner:inner + (g1 - g0)]
            elif kind == UNALLOCATED:
                read_backing(s, g0, d)
            else:
                zero_fill(d)
        pos = slice_end


def read_backing(s: Qcow2State, offset: int, buf: memoryview) -> None:
    """Unallocated clusters read from the backing file (qcow2_co_preadv_task's
    QCOW2_SUBCLUSTER_UNALLOCATED_PLAIN case), as zeros past its end or without one."""
    b = s.backing
    n = max(0, min(buf.nbytes, b.size - offset)) if b is not None else 0
    if b is not None and n:
        b.readinto(offset, buf[:n])
    if n < buf.nbytes:
        zero_fill(buf[n:])


def decompress_cluster(s: Qcow2State, ent: int) -> bytes:
    """qcow2_co_decompress(): raw deflate, zlib compression type only."""
    host, length, _ = compressed_clusters(s, ent)
    raw = s.file.pread(host, length)
    try:
        d = zlib.decompressobj(-12)
        out = d.decompress(raw, s.cluster_size)
    except zlib.error as err:
        raise ImageCorruptError(f"Could not decompress cluster at {host:#x}: {err}") from err
    if len(out) != s.cluster_size:
        raise ImageCorruptError(f"Compressed cluster at {host:#x} decompresses to {len(out)} bytes, not {s.cluster_size}")
    return out


def set_l1_entry(s: Qcow2State, l1i: int, value: int) -> None:
    """One active L1 entry, on disk first (a failed write changes nothing)."""
    s.file.pwrite(s.l1_table_offset + 8 * l1i, int(value).to_bytes(8, "big"))
    s.l1_table[l1i] = value


def free_quietly(s: Qcow2State, clusters: np.ndarray) -> None:
    """Refcount -1 on clusters nothing points at any more; an I/O error only leaks them
    (qcow2_free_clusters() reports and goes on)."""
    if len(clusters):
        try:
            s.refcounts.update_clusters(np.asarray(clusters, dtype=np.int64), -1)
        except BlockIOError:
            s.messages.append(f"qcow2: {len(clusters)} cluster(s) leaked: could not free them")


def grow_l1_table(s: Qcow2State, min_size: int) -> None:
    """qcow2_grow_l1_table(): a new, larger active L1, switched in by a shadow commit."""
    new_size = max(min_size, s.l1_size + s.l1_size // 2, 1)
    if new_size * 8 > (32 << 20):
        raise ImageCorruptError("Active L1 table would exceed 32 MiB")
    nclusters = size_to_clusters(s.cluster_size, new_size * 8)
    txn = RefcountTxn(s.refcounts)
    try:
        new_off = txn.reserve(nclusters)
        table = np.zeros(new_size, dtype=_U64)
        table[:s.l1_size] = s.l1_table
        s.file.pwrite(new_off, table.astype(">u8").tobytes() + bytes(nclusters * s.cluster_size - new_size * 8))
        if s.l1_size:
            txn.decref_range(s.l1_table_offset, size_to_clusters(s.cluster_size, s.l1_size * 8))
    except BaseException:
        txn.rollback()
        raise
    s.commit(txn, l1_table_offset=new_off, l1_size=new_size)
    s.l1_table = table


class L1Tree(Protocol):
    """An L1 table the write path can allocate under: the active one, or a pending snapshot's."""

    table: np.ndarray

    def set_entry(self, i: int, value: int) -> None: ...

    def ensure(self, size: int) -> None: ...


def writable_l2(s: Qcow2State, l1i: int, tree: L1Tree | None = None) -> tuple[int, np.ndarray]:
    """An L2 table for ``l1i`` that may be modified in place (l2_allocate / COW)."""
    if tree is not None:
        tree.ensure(l1i + 1)
        l1 = tree.table
    else:
        if l1i >= s.l1_size:
            grow_l1_table(s, l1i + 1)
        l1 = s.l1_table
    ent = int(l1[l1i])
    off = ent & L1E_OFFSET_MASK
    if off and ent & QCOW_OFLAG_COPIED:
        return off, load_l2(s, off, l1i)
    if off:
        old = load_l2(s, off, l1i)
        table = old & ~_COPIED
    else:
        table = np.zeros(s.l2_size, dtype=_U64)
    new = s.refcounts.alloc_clusters(1)
    try:
        s.file.pwrite(new, table.astype(">u8").tobytes())
        s.barrier()
        if tree is not None:
            tree.set_entry(l1i, new | QCOW_OFLAG_COPIED)
        else:
            set_l1_entry(s, l1i, new | QCOW_OFLAG_COPIED)
    except BaseException:
        free_quietly(s, np.array([new >> s.cluster_bits]))  # l2_allocate()'s fail path
        raise
    s.l2_cache[new] = table
    s.metadata_changed()
    if off:
        s.barrier()
        free_quietly(s, np.array([off >> s.cluster_bits]))
    return new, table


def write_l2_range(s: Qcow2State, l2_off: int, l2: np.ndarray, lo: int, hi: int) -> None:
    s.file.pwrite(l2_off + 8 * lo, l2[lo:hi].astype(">u8").tobytes())


class WriteSlice(NamedTuple):
    """Where a write lands inside one L2 table: host offset per cluster, and the clusters
    newly allocated for it (linked into the table only after the data is written)."""

    l1i: int
    c0: int  # first cluster of the write in this L2 table
    hosts: np.ndarray  # host offset per cluster
    need: np.ndarray  # indices (into hosts) of new clusters
    replaced: np.ndarray  # the L2 entries those replace


def _alloc_slice(s: Qcow2State, pos: int, end: int, tree: L1Tree | None) -> WriteSlice:
    """[pos, end) inside one L2 table: clusters writable in place keep their host offset, the
    others get new ones (refcount +1; qcow2_alloc_host_offset)."""
    span = 1 << (s.cluster_bits + s.l2_bits)
    l1i = pos // span
    base = l1i * span
    _, l2 = writable_l2(s, l1i, tree)
    c0 = (pos - base) >> s.cluster_bits
    c1 = ((end - 1 - base) >> s.cluster_bits) + 1
    ents = l2[c0:c1].copy()
    kinds = cluster_kinds(s, ents)
    hosts = (ents & _L2_MASK).astype(np.int64)
    inplace = (kinds == NORMAL) & ((ents & _COPIED) != 0)
    if inplace.any():
        s.check_overlap(hosts[inplace] >> s.cluster_bits)
    need = np.flatnonzero(~inplace)
    if len(need):
        hosts[need] = s.refcounts.alloc_cluster_runs(len(need)) << s.cluster_bits
    return WriteSlice(l1i, c0, hosts, need, ents[need])


def _link_slice(s: Qcow2State, sl: WriteSlice, tree: L1Tree | None) -> None:
    """After the data: the new clusters into the L2 table, then the replaced ones released
    (qcow2_alloc_cluster_link_l2)."""
    if not len(sl.need):
        return
    s.barrier()
    l2_off, l2 = writable_l2(s, sl.l1i, tree)
    idx = sl.c0 + sl.need
    before = l2[idx].copy()
    l2[idx] = sl.hosts[sl.need].astype(_U64) | _COPIED
    try:
        write_l2_range(s, l2_off, l2, sl.c0 + int(sl.need[0]), sl.c0 + int(sl.need[-1]) + 1)
    except BaseException:
        l2[idx] = before  # the table in the cache stays what is on disk
        raise
    old = referenced_clusters(s, sl.replaced)
    if len(old):
        s.barrier()
        free_quietly(s, old)


def abort_slices(s: Qcow2State, slices: list[WriteSlice]) -> None:
    """A write that failed before its clusters were linked gives them back
    (qcow2_alloc_cluster_abort()): nothing points at them, so refcount -1 is all."""
    for sl in slices:
        if len(sl.need):
            free_quietly(s, sl.hosts[sl.need] >> s.cluster_bits)


def _host_runs(s: Qcow2State, sl: WriteSlice, edge: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Cluster index ranges [a, b) of ``sl`` contiguous on the host (``edge`` clusters alone)."""
    n = len(sl.hosts)
    brk = np.ones(n, dtype=bool)
    if n > 1:
        brk[1:] = sl.hosts[1:] != sl.hosts[:-1] + s.cluster_size
        if edge is not None:
            brk[1:] |= edge[1:] | edge[:-1]
    starts = np.flatnonzero(brk)
    return list(zip(starts.tolist(), np.append(starts[1:], n).tolist(), strict=True))


def data_writer(s: Qcow2State, direct: bool) -> Callable[[int, memoryview], None]:
    """How data clusters are written: ``direct`` around the page cache where the file can
    (:meth:`OsFile.pwrite_direct`), else an ordinary pwrite."""
    fn: Callable[[int, memoryview], None] = getattr(s.file, "pwrite_direct", s.file.pwrite) if direct else s.file.pwrite
    return fn


def _most_clusters(s: Qcow2State, offset: int, end: int) -> int:
    """The most clusters a write of [offset, end) allocates: one per cluster written, one L2
    table per L2 table's slice (for Refcounts.allocating)."""
    span = 1 << (s.cluster_bits + s.l2_bits)
    return ((end - 1) >> s.cluster_bits) - (offset >> s.cluster_bits) + 1 + (end - 1) // span - offset // span + 1


def write_clusters(s: Qcow2State, offset: int, data: memoryview, tree: L1Tree | None = None,
                   direct: bool = False) -> None:
    """Guest write through the active L1, or through ``tree`` (qcow2_co_pwritev_part).
    ``direct``: whole data clusters go around the page cache where the file can (VM state)."""
    write_data = data_writer(s, direct)
    span = 1 << (s.cluster_bits + s.l2_bits)
    end = offset + data.nbytes
    pos = offset
    with s.refcounts.allocating(_most_clusters(s, offset, end)):
        while pos < end:
            slice_end = min(end, (pos // span + 1) * span)
            sl = _alloc_slice(s, pos, slice_end, tree)
            try:
                _write_slice(s, sl, offset, data, pos, slice_end, tree, write_data)
                _link_slice(s, sl, tree)
            except BaseException:
                abort_slices(s, [sl])
                raise
            pos = slice_end


def _write_slice(s: Qcow2State, sl: WriteSlice, offset: int, data: memoryview, pos: int, slice_end: int,
                 tree: L1Tree | None, write_data: Callable[[int, memoryview], None]) -> None:
    """The data of ``sl`` (one L2 table's part of a write), old contents of partially written
    clusters that move copied in (copy-on-write)."""
    cs = s.cluster_size
    span = 1 << (s.cluster_bits + s.l2_bits)
    base = pos // span * span
    c0, n = sl.c0, len(sl.hosts)
    moved = np.zeros(n, dtype=bool)
    moved[sl.need] = True
    first_partial = (pos - base) % cs != 0 or (n == 1 and slice_end - base - c0 * cs < cs)
    last_partial = (slice_end - base) % cs != 0
    # Old contents of partially written clusters that move (copy-on-write).
    cow: dict[int, bytearray] = {}
    for i in {0 if first_partial else -1, n - 1 if last_partial else -1} - {-1}:
        if moved[i]:
            buf = bytearray(cs)
            read_through(s, s.l1_table if tree is None else tree.table, base + (c0 + i) * cs, memoryview(buf))
            cow[i] = buf
    edge = np.zeros(n, dtype=bool)
    edge[list(cow)] = True
    # Data: runs of clusters contiguous on the host, one write each.
    for a, b in _host_runs(s, sl, edge):
        g0 = max(pos, base + (c0 + a) * cs)
        g1 = min(slice_end, base + (c0 + b) * cs)
        src = data[g0 - offset:g1 - offset]
        if a in cow:
            buf = cow[a]
            inner = g0 - base - (c0 + a) * cs
            buf[inner:inner + src.nbytes] = src
            s.file.pwrite(int(sl.hosts[a]), buf)
        else:
            write_data(int(sl.hosts[a]) + (g0 - base - (c0 + a) * cs), src)


def alloc_for_write(s: Qcow2State, offset: int, nbytes: int, tree: L1Tree | None = None) -> list[WriteSlice]:
    """The first half of a write of whole clusters: where every cluster goes on the host, new
    ones allocated (refcount +1) but not linked yet.  The caller writes the data (without the
    image lock if it likes: nobody else knows these clusters) and then calls
    :func:`link_for_write`, keeping QEMU's order refcount -> data -> L2 -> refcount -1."""
    cs = s.cluster_size
    if offset % cs or nbytes % cs:
        raise ValueError(f"alloc_for_write takes whole clusters, not [{offset:#x}, +{nbytes:#x})")
    span = 1 << (s.cluster_bits + s.l2_bits)
    out = []
    pos, end = offset, offset + nbytes
    with s.refcounts.allocating(_most_clusters(s, offset, end)):
        while pos < end:
            slice_end = min(end, (pos // span + 1) * span)
            out.append(_alloc_slice(s, pos, slice_end, tree))
            pos = slice_end
    return out


def host_extents(s: Qcow2State, slices: list[WriteSlice]) -> list[tuple[int, int, int]]:
    """(offset into the write's data, host offset, bytes) of each host-contiguous run."""
    cs = s.cluster_size
    out = []
    done = 0
    for sl in slices:
        for a, b in _host_runs(s, sl):
            out.append((done + a * cs, int(sl.hosts[a]), (b - a) * cs))
        done += len(sl.hosts) * cs
    return out


def link_for_write(s: Qcow2State, slices: list[WriteSlice], tree: L1Tree | None = None) -> None:
    """The second half (after the data): :func:`alloc_for_write`'s clusters linked; those of
    a slice that could not be linked, and of every slice after it, are given back."""
    for k, sl in enumerate(slices):
        try:
            _link_slice(s, sl, tree)
        except BaseException:
            abort_slices(s, slices[k:])
            raise


def drop_vmstate(s: Qcow2State) -> int:
    """The active L1's entries past the disk cleared (each on disk before its refcounts drop),
    their L2 tables freed, and the data of those that reach refcount 0; returns the clusters
    freed.  What a failed save gives back."""
    freed = 0
    for l1i in range(s.l1_vm_state_index, s.l1_size):
        off = int(s.l1_table[l1i]) & L1E_OFFSET_MASK
        if not off:
            continue
        l2 = load_l2(s, off, l1i)
        set_l1_entry(s, l1i, 0)
        s.barrier()
        c = off >> s.cluster_bits
        if s.refcounts.get_refcount(c) == 1:
            data = referenced_clusters(s, l2)
            free_quietly(s, data)
            freed += len(data)
        free_quietly(s, np.array([c]))
        s.l2_cache.pop(off, None)
        freed += 1
    s.metadata_changed()
    return freed


def zeroize(s: Qcow2State, offset: int, length: int, *, discard: bool) -> int:
    """Whole clusters in [offset, offset+length) become zero (or unallocated when
    ``discard``); returns the bytes affected.  qcow2_cluster_zeroize/discard."""
    cs = s.cluster_size
    span = 1 << (s.cluster_bits + s.l2_bits)
    first = -(-offset // cs)
    last = (offset + length) // cs
    done = 0
    c = first
    while c < last:
        l1i = (c * cs) // span
        base_c = l1i * (span // cs)
        hi = min(last, base_c + s.l2_size)
        if (l1i >= s.l1_size or not int(s.l1_table[l1i]) & L1E_OFFSET_MASK) and (s.backing is None or discard):
            c = hi  # no L2 table: already reads as zeros (or from the backing file, for a discard)
            continue
        l2_off, l2 = writable_l2(s, l1i)
        lo_i, hi_i = c - base_c, hi - base_c
        ents = l2[lo_i:hi_i].copy()
        old = referenced_clusters(s, ents)
        # qcow2_cluster_discard: over a backing file a discarded cluster reads as zeros, not as
        # the backing file's data (v2 has no zero flag: Qcow2Image.write_zeroes writes zeros)
        new_val = _U64(0) if (s.version < 3 or (discard and s.backing is None)) else _ZERO
        l2[lo_i:hi_i] = new_val
        try:
            write_l2_range(s, l2_off, l2, lo_i, hi_i)
        except BaseException:
            l2[lo_i:hi_i] = ents
            raise
        if len(old):
            s.barrier()
            free_quietly(s, old)
        done += (hi - c) * cs
        c = hi
    return done


def host_map(s: Qcow2State, l1: np.ndarray, offset: int, length: int) -> np.ndarray:
    """Host offset of every cluster of [offset, offset+length) under ``l1``: 0 where it reads as
    zeros, -1 where it is compressed.  Lets a reader fetch data with plain preads and no image
    lock (lazy restore reads a snapshot's VM state this way)."""
    cs = s.cluster_size
    first = offset // cs
    last = -(-(offset + length) // cs)
    out = np.zeros(last - first, dtype=np.int64)
    per = s.l2_size
    for l1i in range(first // per, (last - 1) // per + 1):
        off = int(l1[l1i]) & L1E_OFFSET_MASK if l1i < len(l1) else 0
        if not off:
            continue
        l2 = load_l2(s, off, l1i)
        a = max(first, l1i * per)
        b = min(last, (l1i + 1) * per)
        ents = l2[a - l1i * per:b - l1i * per]
        kinds = cluster_kinds(s, ents)
        hosts = (ents & _L2_MASK).astype(np.int64)
        vals = np.where(kinds == NORMAL, hosts, 0)
        vals = np.where(kinds == COMPRESSED, -1, vals)
        out[a - first:b - first] = vals
    return out


def allocation_map(s: Qcow2State) -> np.ndarray:
    """Per guest cluster: True where the active L1 maps data, not zeros or nothing (what
    qcow2_co_block_status() reports as BDRV_BLOCK_DATA, one cluster at a time)."""
    nclusters = size_to_clusters(s.cluster_size, s.size)
    out = np.zeros(nclusters, dtype=bool)
    for i in range(min(s.l1_vm_state_index, s.l1_size)):
        off = int(s.l1_table[i]) & L1E_OFFSET_MASK
        if not off:
            continue
        k = cluster_kinds(s, load_l2(s, off, i))
        lo = i * s.l2_size
        hi = min(lo + s.l2_size, nclusters)
        out[lo:hi] = ((k == NORMAL) | (k == COMPRESSED))[:hi - lo]
    return out


def allocated_here(s: Qcow2State, offset: int, length: int) -> np.ndarray:
    """Per cluster of [offset, offset+length) under the active L1: True where the image holds
    the data (normal, compressed or zero clusters), False where reads go to the backing file."""
    cs = s.cluster_size
    first = offset // cs
    last = -(-(offset + length) // cs)
    out = np.zeros(last - first, dtype=bool)
    per = s.l2_size
    for l1i in range(first // per, (last - 1) // per + 1 if last > first else first // per):
        off = int(s.l1_table[l1i]) & L1E_OFFSET_MASK if l1i < s.l1_size else 0
        if not off:
            continue
        a = max(first, l1i * per)
        b = min(last, (l1i + 1) * per)
        kinds = cluster_kinds(s, load_l2(s, off, l1i)[a - l1i * per:b - l1i * per])
        out[a - first:b - first] = kinds != UNALLOCATED
    return out
