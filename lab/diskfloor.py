"""The disk's own speed for as many bytes as a lazy load reads, measured beside the loads.

A lazy load is back to speed once the guest's working set is in RAM, and reading those bytes
from the image is most of that time.  How fast the disk gives them back moves with the host:
on the AMD EPYC host the 4 GiB blocking load read its VM state in 0.59-0.75 s one evening and
in 1.7-2.3 s the next night, with nothing else changed (data/results/restore-scale/README.md).
So a restore measurement carries its own reference, read from the same image in the same run
(:func:`disk_floor`), in the two ways the load policies read:

- ``serial``: one 2 MiB chunk at a time, in a shuffled order (the guest touches its working
  set at random), on one thread: the reads of an on-demand load whose guest faults on one
  chunk after another (each fault's read ends before the guest can touch the next chunk),
  without the faults' own round trips (a background load's filler also shares the disk then);
- ``parallel``: :data:`~emulator.migration.postcopy.PREFETCH_READERS` threads each reading
  a block of chunks at once, the blocks :func:`~emulator.migration.postcopy.group_size` cuts a
  set of that size into: what the prefetch policy's readers do with a loading set whose
  chunks are side by side in RAM and in the file (``LazyLoad._prefetch``).

Both read into memory backed by huge pages and written once before (as the old RAM a lazy
load reads into), with ``O_DIRECT`` where the file system allows it (as the engine reads the
VM state, docs/deviations.md 57); ``page_cache`` says when it did not.

What it is not: the working set's own bytes (it reads as many bytes from the middle of the
image's longest data extent, in a snapshot image its VM state), nor the loads' conditions
exactly: it runs with the guest running and in Python threads, where a load's guest is mostly
blocked on faults, and without a background filler sharing the disk.  Measured on the EPYC
host (data/results/restore-scale/README.md) prefetch's set came in as fast as this parallel
read or faster (0.60-1.08 of it, run by run): read it as the disk's speed at that moment, not
as a bound no load can beat.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from typing import Any

import numpy as np

from emulator.block import OsFile, data_extents
from emulator.migration.cow import CHUNK  # the lazy load's unit too
from emulator.migration.engines import PREFETCH_READERS, group_size


def data_span(path: str | os.PathLike[str], nbytes: int) -> tuple[int, int]:
    """The offset and length of a span of ``path`` holding data, ``nbytes`` long (or all the
    whole chunks of the file's longest data extent, if that is shorter), in the middle of
    that extent (in a snapshot image, its VM state), chunk aligned.  ValueError if no data
    extent holds a whole chunk."""
    if nbytes <= 0:
        raise ValueError(f"data_span: nbytes ({nbytes}) must be positive")
    best = (0, 0)
    f = OsFile.open(path, read_only=True)
    try:
        extents = list(data_extents(f))
    finally:
        f.close()
    for start, end in extents:
        first = -(-start // CHUNK) * CHUNK  # chunk aligned inside the extent
        usable = (end - first) // CHUNK * CHUNK
        if usable > best[1]:
            best = (first, usable)
    first, usable = best
    n = min(nbytes, usable) // CHUNK * CHUNK
    if n <= 0:
        raise ValueError(f"data_span: {path} has no data extent of a whole {CHUNK >> 20} MiB chunk "
                         f"(or nbytes, {nbytes}, is under one): no data to time a read of")
    return first + (usable - n) // 2 // CHUNK * CHUNK, n


def _open(path: str | os.PathLike[str]) -> tuple[int, bool]:
    """A read descriptor around the page cache where the file system allows it; and whether
    it goes through the page cache instead."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), False
        except OSError:
            pass  # a file system without O_DIRECT (older tmpfs)
    return os.open(path, os.O_RDONLY), True


def read_span(fd: int, off: int, buf: memoryview, block: int, threads: int, seed: int | None = None) -> float:
    """Read the file's [off, off + len(buf)) into ``buf`` with ``threads`` threads, each taking
    the next ``block`` bytes in turn (``seed``: blocks in a shuffled order, else in file
    order); seconds from the first read to the last."""
    starts = list(range(0, len(buf), block))
    if seed is not None:
        starts = np.random.default_rng(seed).permutation(starts).tolist()
    it = iter(starts)
    take = threading.Lock()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while True:
                with take:
                    a = next(it, None)
                if a is None:
                    return
                with buf[a:a + block] as piece:  # (released even when the error below keeps this frame)
                    got, want = os.preadv(fd, [piece], off + a), len(piece)
                if got != want:
                    raise OSError(f"short read: {got} of {want} bytes at {off + a}")
        except BaseException as err:  # reported on the caller's thread
            errors.append(err)

    t0 = time.perf_counter()
    others = [threading.Thread(target=reader, name="snaplab-diskfloor") for _ in range(threads - 1)]
    for t in others:
        t.start()
    reader()
    for t in others:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def disk_floor(path: str | os.PathLike[str], nbytes: int, seed: int = 0,
               parallel_first: bool = True) -> dict[str, Any]:
    """Time bare reads of ``nbytes`` of ``path`` (:func:`data_span`), ``serial`` and
    ``parallel`` (the module docstring), in that order or the other (``parallel_first``):
    ms each, the bytes, the span's offset, and whether the page cache was in the way."""
    off, n = data_span(path, nbytes)
    mem = mmap.mmap(-1, n + CHUNK)  # room to start on a 2 MiB boundary: whole huge pages
    try:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mem.madvise(mmap.MADV_HUGEPAGE)
        anchor = ctypes.c_char.from_buffer(mem)
        skip = -ctypes.addressof(anchor) % CHUNK
        del anchor
        with memoryview(mem) as whole, whole[skip:skip + n] as buf:
            np.frombuffer(buf, dtype=np.uint8)[::mmap.PAGESIZE] = 1  # every page in place: no fault is timed
            fd, cached = _open(path)
            try:
                # as the set's readers cut a set of this size, when they read into the old RAM's
                # pages (UFFDIO_MOVE); without it they read chunk by chunk
                block = group_size(n // CHUNK) * CHUNK
                ways = {"parallel": (block, PREFETCH_READERS, None), "serial": (CHUNK, 1, seed)}
                order = ["parallel", "serial"] if parallel_first else ["serial", "parallel"]
                out: dict[str, Any] = {"bytes": n, "offset": off, "page_cache": cached}
                for way in order:
                    size, threads, shuffle = ways[way]
                    out[f"{way}_ms"] = read_span(fd, off, buf, size, threads, shuffle) * 1e3
                return out
            finally:
                os.close(fd)
    finally:
        mem.close()
