"""The qcow2 state shared by the per-concern modules (QEMU's block/qcow2.h).

In QEMU, qcow2-cluster.c, qcow2-refcount.c and qcow2-snapshot.c see an open image's
BDRVQcow2State through qcow2.h, never through qcow2.c.  :class:`Qcow2State` is that view
here: the part of an open image that cluster.py, snapshot.py and check.py read and change.
The image (:class:`~emulator.block.qcow2.Qcow2Image`) implements it; those modules import
this one, never qcow2.py, so imports inside the block layer point one way.  Also here, as
in qcow2.h, :class:`QCowSnapshot`: a snapshot table entry as the driver keeps it.

Owns no behaviour.  Imports format.py, io.py and refcount.py only (none of cluster,
snapshot, check or qcow2), and neither unicorn nor asyncio.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from emulator.block.format import QCowHeader, QCowSnapshotHeader
from emulator.block.io import BlockFile
from emulator.block.refcount import Refcounts, RefcountTxn


@dataclass(frozen=True)
class QCowSnapshot:
    """A snapshot as the driver knows it (QEMU's QCowSnapshot / QEMUSnapshotInfo)."""

    id_str: str
    name: str
    l1_table_offset: int
    l1_size: int
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    disk_size: int | None
    icount: int | None
    unknown_extra: bytes = b""

    def to_header(self) -> QCowSnapshotHeader:
        return QCowSnapshotHeader(self.l1_table_offset, self.l1_size, self.id_str, self.name, self.date_sec,
                                  self.date_nsec, self.vm_clock_nsec, self.vm_state_size, self.disk_size,
                                  self.icount, self.unknown_extra)

    @classmethod
    def from_header(cls, h: QCowSnapshotHeader) -> QCowSnapshot:
        return cls(h.id_str, h.name, h.l1_table_offset, h.l1_size, h.vm_state_size, h.date_sec, h.date_nsec,
                   h.vm_clock_nsec, h.disk_size, h.icount, h.unknown_extra)


class BackingReader(Protocol):
    """A backing file as the overlay reads it (the ``backing`` child: bs->backing)."""

    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None: ...


class Qcow2State(Protocol):
    """What the mapping, snapshot and check code needs of an open image (BDRVQcow2State).

    Callers hold the image lock; nothing here takes it.
    """

    file: BlockFile
    header: QCowHeader  # as last written: a metadata commit replaces it
    version: int
    size: int  # guest disk bytes
    cluster_bits: int
    cluster_size: int
    l2_bits: int
    l2_size: int  # entries per L2 table
    l1_table: np.ndarray  # the active L1 table, native uint64
    l2_cache: OrderedDict[int, np.ndarray]  # L2 tables by host offset, least recently used first
    l2_cache_max: int
    refcounts: Refcounts
    snapshots: list[QCowSnapshot]
    opened_for_check: bool  # BDRV_O_CHECK: the open left the snapshot table to the check
    backing: BackingReader | None  # where unallocated clusters read from (None: zeros)
    messages: list[str]  # warnings for the user (a repair, clusters leaked by an I/O error)

    @property
    def l1_size(self) -> int: ...

    @property
    def l1_table_offset(self) -> int: ...

    @property
    def l1_vm_state_index(self) -> int:
        """size_to_l1(): the first L1 index past the virtual disk."""
        ...

    def file_size_hint(self) -> int:
        """The image file's size, for bounds checks of offsets read from metadata."""
        ...

    def barrier(self) -> None:
        """An ordering point between dependent writes."""
        ...

    def metadata_changed(self) -> None:
        """Forget what was derived from the metadata's places (the overlap-check set)."""
        ...

    def check_overlap(self, clusters: np.ndarray) -> None:
        """qcow2_pre_write_overlap_check(): signal corruption if data would land on metadata."""
        ...

    def commit(self, txn: RefcountTxn, **fields: int) -> None:
        """Commit a refcount shadow transaction together with header pointer changes."""
        ...
