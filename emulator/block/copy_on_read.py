"""The copy-on-read filter driver (QEMU's block/copy-on-read.c).

A filter node over one format node: guest writes pass through, and a read of clusters that
the node below does not hold itself (they come from its backing file) writes the data it read
into that node, so the next read is served from the overlay (``bdrv_co_copy_on_readv``).  The
node below must be able to say what it holds (:meth:`Qcow2Image.is_allocated`); without a
backing file there is nothing to copy and the filter only passes requests through.

A filter has no snapshot callbacks: snapshots go to the filtered child (block/snapshot.c
``bdrv_snapshot_fallback``, see :attr:`~emulator.block.node.BlockNode.snapshot_node`).
Imports neither unicorn nor asyncio.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class FilteredImage(Protocol):
    """What the filter needs of the node below (a qcow2 or raw image)."""

    size: int
    read_only: bool

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...


class CopyOnRead:
    """An open copy-on-read filter over ``child`` (BDRVStateCOR)."""

    driver = "copy-on-read"

    def __init__(self, child: FilteredImage, *, filename: str = "") -> None:
        self.child = child
        self.filename = filename
        self.read_only = child.read_only
        self.size = child.size
        self.copied_bytes = 0  # what reads have copied up so far (for tests and the curious)

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        """cor_co_preadv_part(): read, then copy up what came from below the child."""
        mv = memoryview(buf).cast("B")
        self.child.readinto(offset, mv)
        if self.read_only or not mv.nbytes:
            return
        allocated = getattr(self.child, "is_allocated", None)
        cs = int(getattr(self.child, "cluster_size", 0))
        if allocated is None or getattr(self.child, "backing", None) is None or not cs:
            return
        self.bdrv_co_copy_on_readv(offset, mv.nbytes, cs, np.asarray(allocated(offset, mv.nbytes)))

    def bdrv_co_copy_on_readv(self, offset: int, length: int, cs: int, here: np.ndarray) -> None:
        """Write every cluster of the request that the child does not hold into the child,
        whole clusters at a time (QEMU copies aligned to the cluster size, too)."""
        first = offset // cs
        runs = np.flatnonzero(np.diff(np.concatenate(([1], here.astype(np.int8), [1]))))
        for a, b in zip(runs[::2].tolist(), runs[1::2].tolist(), strict=True):
            start = (first + a) * cs
            end = min((first + b) * cs, self.size)
            data = bytearray(end - start)
            self.child.readinto(start, data)
            self.child.write(start, data)
            self.copied_bytes += end - start

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.child.write(offset, data)

    def flush(self) -> None:
        self.child.flush()

    def close(self) -> None:
        """The child is a node of its own and closes itself."""
