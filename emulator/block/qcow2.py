"""The qcow2 format driver: open, create, read, write, snapshots, check.

Mirrors QEMU's block/qcow2.c, in two classes, one per concern:

* :class:`Qcow2Metadata` is BDRVQcow2State with the code that keeps it: opening
  (``qcow2_do_open``: header, feature bits, refcount table, L1 table, snapshot table, the
  dirty and autoclear bits), header updates and metadata commits (``qcow2_update_header``),
  ``qcow2_mark_corrupt``/``qcow2_signal_corruption``, the overlap check and the durability
  points.  It implements :class:`~emulator.block.state.Qcow2State`.
* :class:`Qcow2Image` is the BlockDriver: ``qcow2_co_create``, guest I/O
  (``qcow2_co_preadv_part``, ``qcow2_co_pwritev_part``, ``qcow2_co_pwrite_zeroes``,
  ``qcow2_co_pdiscard``), the VM state area (``qcow2_save_vmstate``,
  ``qcow2_load_vmstate``), the snapshot callbacks and ``qcow2_co_check``.

The mapping lives in cluster.py, refcounts in refcount.py, snapshots in snapshot.py and
the consistency check in check.py, as QEMU splits qcow2*.c; they see the image only as a
:class:`~emulator.block.state.Qcow2State` (state.py, QEMU's qcow2.h) and never import
this module.

Streams in, paths as a classmethod: ``Qcow2Image(file)`` takes a BlockFile or a
Python file object; ``Qcow2Image.open(path)`` and ``Qcow2Image.create(path, size)``
are for users.  Every public method holds the image lock, so a vCPU thread and
a snapshot thread can share one image.  Imports neither unicorn nor asyncio.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any, ParamSpec, TypeVar, cast

import numpy as np

import emulator.block.cluster as cluster
import emulator.block.snapshot as snapshot
from emulator.block.check import CheckResult, check_image, metadata_clusters
from emulator.block.format import (
    DEFAULT_CLUSTER_BITS,
    FEATURE_TYPE_INCOMPATIBLE,
    HEADER_AUTOCLEAR_OFFSET,
    HEADER_INCOMPAT_OFFSET,
    HEADER_POINTERS_OFFSET,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_DIRTY,
    QCOW2_INCOMPAT_EXTL2,
    QCowHeader,
    new_image_layout,
    parse_feature_table,
    parse_header,
)
from emulator.block.io import BlockFile, MemoryFile, OsFile, as_block_file
from emulator.block.refcount import Refcounts, RefcountTxn, size_to_clusters
from emulator.block.state import BackingReader, QCowSnapshot
from emulator.errors import (
    BlockIOError,
    ImageCorruptError,
    ImageFormatError,
    OutOfRangeError,
    ReadOnlyError,
    SnapshotError,
    UnsupportedFeatureError,
)

P = ParamSpec("P")
R = TypeVar("R")

_KNOWN_INCOMPAT = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_COMPRESSION
_INCOMPAT_NAMES = {
    QCOW2_INCOMPAT_DATA_FILE: "external data file",
    QCOW2_INCOMPAT_EXTL2: "extended L2 entries",
}


MAX_RECOVERED_SPARE = 64  # spare clusters a writable open finds again at most (deviation 54)


def _locked(fn: Callable[P, R]) -> Callable[P, R]:
    """The method runs holding the image lock."""

    @wraps(fn)
    def inner(*args: P.args, **kwargs: P.kwargs) -> R:
        with cast(Qcow2Metadata, args[0])._lock:
            return fn(*args, **kwargs)

    return inner


def _check_features(h: QCowHeader) -> None:
    """qcow2_do_open()'s feature checks (report_unsupported_feature): what snaplab cannot
    open, named from the image's feature name table where it has one."""
    names: dict[tuple[int, int], str] = {}
    for ext in h.extensions:
        if ext.magic == QCOW2_EXT_MAGIC_FEATURE_TABLE:
            names = parse_feature_table(ext.data)
    unknown = h.incompatible_features & ~_KNOWN_INCOMPAT
    if unknown:
        feats = []
        for bit in range(64):
            if unknown >> bit & 1:
                name = names.get((FEATURE_TYPE_INCOMPATIBLE, bit)) or _INCOMPAT_NAMES.get(1 << bit)
                feats.append(name or f"Unknown incompatible feature: {1 << bit:x}")
        raise UnsupportedFeatureError("Unsupported qcow2 feature(s): " + ", ".join(feats))
    if h.compression_type != 0:
        raise UnsupportedFeatureError(
            f"Unsupported qcow2 feature(s): compression type {h.compression_type} (only zlib is supported)")


class Qcow2Metadata:
    """An open image's metadata and the code that keeps it consistent and durable.

    BDRVQcow2State with qcow2.c's ``qcow2_do_open``, ``qcow2_update_header``,
    ``qcow2_mark_corrupt`` and ``qcow2_signal_corruption``; implements
    :class:`~emulator.block.state.Qcow2State` for cluster.py, snapshot.py and check.py.
    Nothing here takes the image lock: :class:`Qcow2Image`'s public methods hold it.
    """

    GROW_STEP = 256 << 20

    def __init__(self, file: BlockFile | Any, *, read_only: bool = False, strict_barriers: bool = False,
                 filename: str = "", for_check: bool = False) -> None:
        self.file: BlockFile = as_block_file(file)
        self.filename = filename
        self.read_only = read_only
        self.strict_barriers = strict_barriers
        self.messages: list[str] = []
        self._lock = threading.RLock()
        # Set when the guest's view could not be made consistent (a revert failed half-way):
        # guest requests then fail with an I/O error until a snapshot_goto succeeds.
        self.io_error: str | None = None
        self.l2_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.l2_cache_max = 4096
        self._meta: np.ndarray | None = None
        self.backing: BackingReader | None = None  # set by the opener (bdrv_open_backing_file)
        # QEMU's BDRV_O_CHECK: tables held only to QEMU's rules, the snapshot table read by check()
        self.opened_for_check = for_check
        self._open()

    # -- opening (qcow2_do_open) ------------------------------------------------------
    def _open(self) -> None:
        fsize = self.file.size()
        h = parse_header(self._read_header_cluster(fsize), fsize, for_check=self.opened_for_check)
        _check_features(h)
        if h.incompatible_features & QCOW2_INCOMPAT_CORRUPT and not self.read_only:
            self.read_only = True
            msg = ("qcow2: Image is corrupt (the corrupt bit is set); opened read-only. "
                   "Run 'qemu-img check -r all' to repair it")
            self.messages.append(msg)
            warnings.warn(msg, stacklevel=3)
        self.header = h
        self.version = h.version
        self.cluster_bits = h.cluster_bits
        self.cluster_size = 1 << h.cluster_bits
        self.l2_bits = h.cluster_bits - 3
        self.l2_size = 1 << self.l2_bits
        self.size = h.size
        grows = isinstance(self.file, OsFile) and not self.read_only
        self.refcounts = Refcounts(self.file, h.cluster_bits, h.refcount_order, h.refcount_table_offset,
                                   h.refcount_table_clusters, read_only=self.read_only,
                                   write_pointers=self._write_reftable_pointers, sync=self.sync_point,
                                   on_alloc=self._grow_file if grows else None)
        self._file_size = fsize
        self._grown = False
        self._closed = False  # close() ran (a graph may hold one image under two nodes)
        self._defer = 0
        self.l1_table = self._read_l1(h.l1_table_offset, h.l1_size, "l1_table_offset")
        self.snapshots: list[QCowSnapshot] = [] if self.opened_for_check else snapshot.read_snapshots(self, fsize)
        if not self.read_only:
            self._clear_open_bits(h)
            self.refcounts.recover_spare(fsize >> self.cluster_bits, self._spare_wanted())

    def _spare_wanted(self) -> int:
        """How many spare clusters a reopened image looks for: what a snapshot goto or delete
        commit writes besides shadow refcount blocks for what it changes (a new refcount table,
        L1 table and snapshot table, a few blocks), at most :data:`MAX_RECOVERED_SPARE`: every
        spare cluster splits a free run the data allocation has to step over."""
        cs = self.cluster_size
        rc = self.refcounts
        want = (rc.table_clusters + size_to_clusters(cs, self.l1_size * 8)
                + size_to_clusters(cs, snapshot.table_bytes(self.snapshots)) + 4)
        return min(MAX_RECOVERED_SPARE, want)

    def _read_header_cluster(self, fsize: int) -> bytes:
        """The first cluster (or the whole file if smaller): the header and its extensions."""
        head = self.file.pread(0, min(max(fsize, 0), 1 << MIN_CLUSTER_BITS << 7))
        if len(head) >= 24:
            cbits = int.from_bytes(head[20:24], "big")
            if MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS and len(head) < (1 << cbits) <= fsize:
                head = self.file.pread(0, 1 << cbits)
        return head

    def _clear_open_bits(self, h: QCowHeader) -> None:
        """What a writable open changes: unknown autoclear bits cleared, and after an unclean
        shutdown (the dirty bit) refcounts rebuilt, then the bit cleared, as QEMU does."""
        if h.autoclear_features:
            # QEMU clears autoclear bits it does not know; we know none.
            self.file.pwrite(HEADER_AUTOCLEAR_OFFSET, bytes(8))
            self.header = self.header.with_pointers(autoclear_features=0)
        if h.incompatible_features & QCOW2_INCOMPAT_DIRTY:
            # Refcounts may be stale (lazy refcounts): rebuild them, then clear the bit.
            self.messages.append("qcow2: the dirty bit is set; repairing refcounts")
            res = check_image(self, "all")
            final = res.repaired or res
            if final.corruptions or final.check_errors:
                self.signal_corruption("refcounts could not be repaired after an unclean shutdown")
            self._set_incompat(self.header.incompatible_features & ~QCOW2_INCOMPAT_DIRTY)

    def _read_l1(self, offset: int, n: int, fieldname: str) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        if offset % self.cluster_size:
            raise ImageFormatError(fieldname, "L1 table offset invalid")
        return np.frombuffer(self.file.pread(offset, n * 8), ">u8").astype(np.uint64)

    # -- geometry ---------------------------------------------------------------------
    @property
    def l1_size(self) -> int:
        return len(self.l1_table)

    @property
    def l1_table_offset(self) -> int:
        return self.header.l1_table_offset

    @property
    def l1_vm_state_index(self) -> int:
        """size_to_l1(): the first L1 index past the virtual disk."""
        return -(-self.size // (1 << (self.cluster_bits + self.l2_bits)))

    @property
    def vm_state_offset(self) -> int:
        """qcow2_vm_state_offset(): where the VM state starts in the guest address space."""
        return self.l1_vm_state_index << (self.cluster_bits + self.l2_bits)

    def file_size_hint(self) -> int:
        return self.file.size()

    def replace_file(self, file: BlockFile) -> BlockFile:
        """Put ``file`` below the open image in place of the current one and return that one
        (a test inserts a :class:`~emulator.block.io.BlkdebugFile`, as QEMU's blkdebug is
        inserted as a qcow2 node's file child)."""
        with self._lock:
            old, self.file = self.file, file
            self.refcounts.file = file
            return old

    # -- durability -------------------------------------------------------------------
    def sync_point(self) -> None:
        """fdatasync at a commit, unless inside :meth:`deferred_flush`."""
        if not self._defer:
            self.file.flush()

    @contextlib.contextmanager
    def deferred_flush(self) -> Iterator[None]:
        """Commits inside skip their fdatasync; the caller flushes afterwards.

        Ordering against a killed process is unchanged (page-cache writes are seen in order);
        what is given up until the flush is power-loss durability.  The blocking snapshot
        engine uses it so that the fdatasync happens after the guest resumed.
        """
        with self._lock:
            self._defer += 1
        try:
            yield
        finally:
            with self._lock:
                self._defer -= 1

    def barrier(self) -> None:
        """An ordering point between dependent writes; fdatasync when strict_barriers."""
        if self.strict_barriers:
            self.file.flush()

    def _grow_file(self, end: int) -> None:
        """Extend the file ahead of allocations (ftruncate, sparse): writes inside i_size are
        ~10x cheaper on ext4 than writes that extend it.  Trimmed back on close."""
        if end <= self._file_size:
            return
        target = max(end, self._file_size + self.GROW_STEP)
        target = -(-target // self.cluster_size) * self.cluster_size
        self.file.truncate(target)
        self._file_size = target
        self._grown = True

    def _trim_file(self) -> None:
        if self._grown and not self.read_only:
            # The spare stays in the file, for the next open to find (recover_spare()).
            end = max(self.refcounts.highest_used(), self.cluster_size,
                      (self.refcounts.spare[-1] + 1) * self.cluster_size if self.refcounts.spare else 0)
            if end < self.file.size():
                self.file.truncate(end)
            self._file_size = self.file.size()
            self._grown = False

    # -- header updates and corruption --------------------------------------------------
    def metadata_changed(self) -> None:
        self._meta = None

    def _write_pointers(self, **fields: int) -> None:
        """Write header bytes 36..71 in one write, then flush: a metadata commit."""
        h = self.header.with_pointers(**fields)
        self.file.pwrite(HEADER_POINTERS_OFFSET, h.pack_pointers())
        self.sync_point()
        self.header = h
        self.metadata_changed()

    def _write_reftable_pointers(self, offset: int, clusters: int) -> None:
        """A commit that moves only the refcount table (refcount block creation)."""
        self._write_pointers(refcount_table_offset=offset, refcount_table_clusters=clusters)

    def commit(self, txn: RefcountTxn, **fields: int) -> None:
        """Commit a refcount shadow transaction together with header pointer changes."""
        txn.commit(lambda off, n: self._write_pointers(refcount_table_offset=off, refcount_table_clusters=n,
                                                       **fields))

    def _set_incompat(self, bits: int) -> None:
        self.file.pwrite(HEADER_INCOMPAT_OFFSET, bits.to_bytes(8, "big"))
        self.file.flush()
        self.header = self.header.with_pointers(incompatible_features=bits)

    def check_overlap(self, clusters: np.ndarray) -> None:
        """qcow2_pre_write_overlap_check() for data written in place."""
        if self._meta is None:
            self._meta = metadata_clusters(self)
        hit = np.isin(clusters, self._meta)
        if hit.any():
            c = int(clusters[np.flatnonzero(hit)[0]])
            self.signal_corruption(f"Preventing invalid write on metadata (overlaps with cluster {c})")

    def signal_corruption(self, msg: str) -> None:
        """qcow2_signal_corruption(): mark the image corrupt, go read-only, raise."""
        if not self.read_only:
            try:
                self._set_incompat(self.header.incompatible_features | QCOW2_INCOMPAT_CORRUPT)
            finally:
                self.read_only = True
                self.refcounts.read_only = True
        raise ImageCorruptError(f"qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed")


class Qcow2Image(Qcow2Metadata):
    """An open qcow2 image (BlockDriverState + the qcow2 BlockDriver's callbacks).

    Every public method takes the image lock; the metadata it works on is
    :class:`Qcow2Metadata`'s.
    """

    driver = "qcow2"

    # -- creating and opening -------------------------------------------------------
    @classmethod
    def create(cls, target: str | os.PathLike[str] | BlockFile | Any, size: int, *, cluster_size: int = 1 << DEFAULT_CLUSTER_BITS,
               refcount_bits: int = 16, version: int = 3, backing_file: str = "",
               backing_fmt: str = "") -> Qcow2Image:
        """qcow2_co_create(): header, refcount table, refcount block(s), empty L1.

        Lays the image out as qemu-img 7.2 does (:func:`~emulator.block.format.new_image_layout`):
        refcount table in cluster 1, the first refcount block in cluster 2, the L1 table from
        cluster 3.  ``backing_file``/``backing_fmt`` are only written into the header; the
        opener attaches the backing image (:attr:`backing`).
        """
        writes = new_image_layout(size, cluster_size, refcount_bits, version, backing_file, backing_fmt)
        close_on_fail = False
        if isinstance(target, (str, os.PathLike)):
            f: BlockFile = OsFile.open(target, create=True)
            close_on_fail = True
            filename = os.fspath(target)
        else:
            f = as_block_file(target)
            filename = ""
        try:
            f.truncate(0)
            for offset, data in writes:
                f.pwrite(offset, data)
            f.flush()
        except BaseException:
            if close_on_fail:
                f.close()
            raise
        return cls(f, filename=filename)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False, no_flush: bool = False) -> Qcow2Image:
        f = OsFile.open(path, read_only=read_only, no_flush=no_flush)
        try:
            return cls(f, read_only=read_only, filename=os.fspath(path))
        except BaseException:
            f.close()
            raise

    @classmethod
    def in_memory(cls, size: int, *, cluster_size: int = 1 << DEFAULT_CLUSTER_BITS, refcount_bits: int = 16,
                  version: int = 3) -> Qcow2Image:
        """A new image held in memory (tests, notebooks)."""
        return cls.create(MemoryFile(), size, cluster_size=cluster_size, refcount_bits=refcount_bits, version=version)

    # -- the backing file ------------------------------------------------------------
    @property
    def backing_file(self) -> str:
        """The backing file name in the header ("" without one)."""
        return self.header.backing_file

    @property
    def backing_format(self) -> str:
        """The backing file format extension ("" when absent: the opener probes)."""
        return self.header.backing_format

    @_locked
    def is_allocated(self, offset: int, length: int) -> np.ndarray:
        """Per cluster of [offset, offset+length): True where this image has the data itself
        (data or a zero flag), False where it reads from the backing file
        (bdrv_is_allocated(), one cluster at a time)."""
        return cluster.allocated_here(self, offset, length)

    # -- request checks ---------------------------------------------------------------
    def _check_rw(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"Block node is read-only{': ' + self.filename if self.filename else ''}")

    def _check_range(self, offset: int, length: int, limit: int | None = None) -> None:
        lim = self.size if limit is None else limit
        if offset < 0 or length < 0 or offset + length > lim:
            raise OutOfRangeError(f"Request at offset {offset} of {length} bytes is outside the disk ({lim} bytes)")

    def _check_io(self) -> None:
        if self.io_error is not None:
            raise BlockIOError(f"Input/output error: {self.io_error}")

    # -- guest I/O ------------------------------------------------------------------
    @_locked
    def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        mv = memoryview(buf).cast("B")
        self._check_io()
        self._check_range(offset, mv.nbytes)
        cluster.read_through(self, self.l1_table, offset, mv)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    @_locked
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        self._check_rw()
        self._check_io()
        self._check_range(offset, mv.nbytes)
        if mv.nbytes:
            cluster.write_clusters(self, offset, mv)

    @_locked
    def write_zeroes(self, offset: int, length: int) -> None:
        """Whole clusters get the zero flag (v3); partial ones are written with zeros (and
        everything is, on a v2 image over a backing file: it has no zero flag)."""
        self._check_rw()
        self._check_range(offset, length)
        cs = self.cluster_size
        if self.backing is not None and self.version < 3:
            for pos in range(offset, offset + length, 1 << 20):
                cluster.write_clusters(self, pos, memoryview(bytes(min(1 << 20, offset + length - pos))))
            return
        head_end = min(offset + length, -(-offset // cs) * cs)
        tail_start = max(head_end, (offset + length) // cs * cs)
        if head_end > offset:
            cluster.write_clusters(self, offset, memoryview(bytes(head_end - offset)))
        if tail_start > head_end:
            cluster.zeroize(self, head_end, tail_start - head_end, discard=False)
        if offset + length > tail_start:
            cluster.write_clusters(self, tail_start, memoryview(bytes(offset + length - tail_start)))

    @_locked
    def discard(self, offset: int, length: int) -> int:
        """Whole clusters become unallocated; partial clusters are left (as QEMU does)."""
        self._check_rw()
        self._check_range(offset, length)
        return cluster.zeroize(self, offset, length, discard=True)

    @contextlib.contextmanager
    def drained(self) -> Iterator[None]:
        """bdrv_drained_begin()/bdrv_drained_end(): no request from another thread gets in
        until the section ends (they wait on the image's lock); the holder's own calls go on.

        The copy-on-write engine enters it inside its downtime and freezes the disk after the
        guest resumed: a guest request in between waits, so the disk stays at the stop instant.
        """
        with self._lock:
            yield

    @_locked
    def flush(self) -> None:
        self.file.flush()

    @_locked
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.read_only:
            self._trim_file()
            self.file.flush()
        self.file.close()

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def allocation_map(self) -> np.ndarray:
        """Per guest cluster: True where the active L1 maps data (not zero/unallocated)."""
        return cluster.allocation_map(self)

    # -- VM state (qcow2_save_vmstate / qcow2_load_vmstate) -----------------------
    @_locked
    def save_vmstate(self, pos: int, data: bytes | bytearray | memoryview, direct: bool = False) -> None:
        """Write VM state at ``pos`` of the vmstate area, through the active L1 (qcow2_save_vmstate);
        ``direct``: whole aligned clusters around the page cache where the file allows."""
        self._check_rw()
        mv = memoryview(data).cast("B")
        if pos < 0:
            raise OutOfRangeError("negative vmstate position")
        if mv.nbytes:
            cluster.write_clusters(self, self.vm_state_offset + pos, mv, direct=direct)

    @_locked
    def discard_vmstate(self) -> int:
        """Give back the VM state a failed save left in the active L1 (its L2 tables and data
        clusters); returns the clusters freed.  Each L1 entry is cleared before the refcounts
        drop, so a process killed in between leaves leaks, never corruption.  QEMU keeps such
        a VM state allocated until the next snapshot (see docs/deviations.md)."""
        self._check_rw()
        return cluster.drop_vmstate(self)

    @_locked
    def load_vmstate(self, pos: int, buf: memoryview | bytearray, snapshot_id: str | None = None,
                     direct: bool = False) -> None:
        """Read VM state into ``buf``: of a snapshot (by id) or from the active L1 (qcow2_load_vmstate);
        ``direct``: around the page cache where the file and the alignment allow."""
        mv = memoryview(buf).cast("B")
        l1 = self.l1_table if snapshot_id is None else snapshot.read_snapshot_l1(self, self.find_snapshot(snapshot_id))
        cluster.read_through(self, l1, self.vm_state_offset + pos, mv, direct=direct)

    @_locked
    def vmstate_host_map(self, length: int) -> np.ndarray:
        """Per cluster of the active VM-state area: host offset (0 unallocated, -1 compressed)."""
        return cluster.host_map(self, self.l1_table, self.vm_state_offset, length)

    @_locked
    def snapshot_vmstate_map(self, id_or_name: str) -> tuple[np.ndarray, int]:
        """Per cluster of a snapshot's VM state: host offset (0 zero, -1 compressed); and the
        byte offset of the VM state's first cluster boundary (the stream starts there)."""
        sn = self.find_snapshot(id_or_name)
        l1 = snapshot.read_snapshot_l1(self, sn)
        return cluster.host_map(self, l1, self.vm_state_offset, sn.vm_state_size), self.vm_state_offset

    @_locked
    def snapshot_vmstate_rewrite(self, id_or_name: str, pos: int, data: bytes) -> None:
        """Overwrite bytes of a snapshot's VM state in place (snaplab's loading set, recorded
        after the snapshot was taken; QEMU never changes a snapshot).  Only where every cluster
        is allocated and owned by that snapshot alone (refcount 1): nothing shared, no
        metadata changed.  :class:`SnapshotError` names what is refused."""
        self._check_rw()
        sn = self.find_snapshot(id_or_name)
        if pos < 0 or pos + len(data) > sn.vm_state_size:
            raise SnapshotError(f"VM state range {pos}+{len(data)} is outside snapshot '{sn.name}' "
                                f"({sn.vm_state_size} bytes)")
        l1 = snapshot.read_snapshot_l1(self, sn)
        cs = self.cluster_size
        start = self.vm_state_offset + pos
        hosts = cluster.host_map(self, l1, start, len(data))
        if (hosts <= 0).any():
            raise SnapshotError(f"snapshot '{sn.name}': VM state bytes {pos}+{len(data)} are not plainly allocated")
        refs = self.refcounts.get_refcounts(hosts // cs)
        if (refs != 1).any():
            raise SnapshotError(f"snapshot '{sn.name}': VM state bytes {pos}+{len(data)} are shared (refcount "
                                f"{int(refs.max())})")
        done = 0
        for i, host in enumerate(hosts.tolist()):
            within = (start + done) % cs if i == 0 else 0
            n = min(cs - within, len(data) - done)
            self.file.pwrite(host + within, data[done:done + n])
            done += n

    # -- snapshots --------------------------------------------------------------------
    def snapshot_list(self) -> list[QCowSnapshot]:
        """qcow2_snapshot_list()."""
        return list(self.snapshots)

    def find_snapshot(self, id_or_name: str) -> QCowSnapshot:
        return snapshot.find_snapshot(self, id_or_name)

    @_locked
    def snapshot_create(self, name: str, *, id_str: str | None = None, vm_state_size: int = 0,
                        date_sec: int | None = None, date_nsec: int | None = None, vm_clock_nsec: int = 0,
                        icount: int = -1) -> QCowSnapshot:
        self._check_rw()
        return snapshot.snapshot_create(self, name, id_str=id_str, vm_state_size=vm_state_size, date_sec=date_sec,
                                        date_nsec=date_nsec, vm_clock_nsec=vm_clock_nsec, icount=icount)

    @_locked
    def snapshot_prepare(self) -> snapshot.PendingSnapshot:
        """Freeze the disk state now; see :class:`~emulator.block.snapshot.PendingSnapshot`."""
        self._check_rw()
        return snapshot.snapshot_prepare(self)

    @_locked
    def pending_save_vmstate(self, p: snapshot.PendingSnapshot, pos: int, data: bytes | bytearray | memoryview,
                             direct: bool = False) -> None:
        """Write VM state into a pending snapshot's frozen tree (the guest's tree is untouched);
        ``direct``: around the page cache where the file allows (:meth:`OsFile.pwrite_direct`)."""
        mv = memoryview(data).cast("B")
        if mv.nbytes:
            cluster.write_clusters(self, self.vm_state_offset + pos, mv, tree=p, direct=direct)

    def pending_save_vmstate_bulk(self, p: snapshot.PendingSnapshot, pos: int, data: memoryview) -> None:
        """A large run of VM state (whole clusters) into a pending snapshot, the data written
        without the image lock (and around the page cache where the file allows), so that
        several writers keep the file busy; only the allocation and the L2 link are locked."""
        self._vmstate_bulk(p, pos, data)

    def save_vmstate_bulk(self, pos: int, data: memoryview) -> None:
        """:meth:`save_vmstate` (active L1, around the page cache) for a large run of whole
        clusters, the data written without the image lock: several writers at once."""
        self._check_rw()
        if pos < 0:
            raise OutOfRangeError("negative vmstate position")
        self._vmstate_bulk(None, pos, data)

    def _vmstate_bulk(self, tree: snapshot.PendingSnapshot | None, pos: int, data: memoryview) -> None:
        mv = memoryview(data).cast("B")
        off = self.vm_state_offset + pos
        if off % self.cluster_size or mv.nbytes % self.cluster_size:
            if tree is None:
                self.save_vmstate(pos, mv, direct=True)
            else:
                self.pending_save_vmstate(tree, pos, mv, direct=True)
            return
        with self._lock:
            slices = cluster.alloc_for_write(self, off, mv.nbytes, tree=tree)
        write = cluster.data_writer(self, direct=True)
        try:
            for at, host, n in cluster.host_extents(self, slices):
                write(host, mv[at:at + n])
        except BaseException:
            with self._lock:
                cluster.abort_slices(self, slices)
            raise
        with self._lock:
            cluster.link_for_write(self, slices, tree=tree)

    @_locked
    def snapshot_finish(self, p: snapshot.PendingSnapshot, name: str, **kw: int) -> QCowSnapshot:
        return snapshot.snapshot_finish(self, p, name, **kw)

    @_locked
    def snapshot_abort(self, p: snapshot.PendingSnapshot) -> None:
        snapshot.snapshot_abort(self, p)

    @_locked
    def snapshot_goto(self, id_or_name: str) -> QCowSnapshot:
        self._check_rw()
        sn = snapshot.snapshot_goto(self, self.find_snapshot(id_or_name))
        self.io_error = None  # the guest's view is a consistent one again
        return sn

    @_locked
    def snapshot_goto_check(self, id_or_name: str) -> None:
        """What snapshot_goto would refuse, found without changing anything: the disk size,
        the snapshot's L1 table and every L2 table it points to (all read and checked)."""
        self._check_rw()
        snapshot.snapshot_goto_check(self, self.find_snapshot(id_or_name))

    @_locked
    def snapshot_delete(self, id_str: str | None = None, name: str | None = None) -> QCowSnapshot:
        self._check_rw()
        return snapshot.snapshot_delete(self, snapshot.find_snapshot_by_id_and_name(self, id_str, name))

    @_locked
    def snapshot_read(self, id_or_name: str, offset: int, buf: memoryview | bytearray) -> None:
        """Read guest data as it was in a snapshot (qemu-img convert -l)."""
        sn = self.find_snapshot(id_or_name)
        mv = memoryview(buf).cast("B")
        self._check_range(offset, mv.nbytes, sn.disk_size if sn.disk_size is not None else self.size)
        cluster.read_through(self, snapshot.read_snapshot_l1(self, sn), offset, mv)

    # -- check ----------------------------------------------------------------------------
    @_locked
    def check(self, repair: str | None = None) -> CheckResult:
        """qcow2_co_check(): count leaks and corruptions; ``repair`` 'leaks' or 'all'."""
        if repair is not None:
            self._check_rw()
        return check_image(self, repair)
