"""The disk's own speed for the bytes a lazy load reads: the floor under its time to speed.

A lazy load is back to speed once the guest's working set is in RAM, and reading those bytes
from the image is most of that time.  How fast the disk gives them back moves with the host:
on the AMD EPYC host a bare read of 256 MiB around the page cache took 46 ms one evening
(about 5.5 GiB/s) and 130-160 ms the next night (about 1.8 GiB/s), with nothing else changed.
So a restore measurement carries its own reference, read from the same image in the same run
(:func:`disk_floor`), in the two ways the load policies read:

- ``serial``: one 2 MiB chunk at a time, in a shuffled order, on one thread: the best an
  on-demand or background load can do while the guest faults on one chunk after another (each
  fault waits for its read before the guest can touch the next chunk);
- ``parallel``: :data:`~emulator.migration.postcopy.PREFETCH_READERS` threads each reading
  a block of chunks at once, the blocks :func:`~emulator.migration.postcopy.group_size` cuts a
  set of that size into: what the prefetch policy's readers do with a loading set whose
  chunks are side by side in RAM and in the file (``LazyLoad._prefetch``).

Both read into memory backed by huge pages and written once before (as the old RAM a lazy
load reads into), with ``O_DIRECT`` where the file system allows it (as the engine reads the
VM state, docs/deviations.md 57); ``page_cache`` says when it did not.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Any

import numpy as np

from emulator.migration.engines import PREFETCH_READERS, group_size

CHUNK = 2 << 20  # the lazy load's unit (emulator.migration.postcopy)


def data_extents(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The file's data extents, (offset, length), in file order (SEEK_DATA / SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            pos = hole
    finally:
        os.close(fd)
    return out


def data_span(path: str | os.PathLike[str], nbytes: int) -> tuple[int, int]:
    """The offset and length of a span of ``path`` holding data, ``nbytes`` long (or all the
    whole chunks of the file's longest data extent, if that is shorter), in the middle of
    that extent (in a snapshot image, its VM state), chunk aligned.  ValueError if no data
    extent holds a whole chunk."""
    if nbytes <= 0:
        raise ValueError(f"data_span: nbytes ({nbytes}) must be positive")
    best = (0, 0)
    for off, length in data_extents(path):
        first = -(-off // CHUNK) * CHUNK  # chunk aligned inside the extent
        usable = (off + length - first) // CHUNK * CHUNK
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
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)), False
    except OSError:
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
                piece = buf[a:a + block]
                got = os.preadv(fd, [piece], off + a)
                if got != len(piece):
                    raise OSError(f"short read: {got} of {len(piece)} bytes at {off + a}")
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
    mem = mmap.mmap(-1, n)
    try:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mem.madvise(mmap.MADV_HUGEPAGE)
        np.frombuffer(mem, dtype=np.uint8)[::mmap.PAGESIZE] = 1  # every page in place: no fault is timed
        fd, cached = _open(path)
        buf = memoryview(mem)
        try:
            block = group_size(n // CHUNK) * CHUNK  # as the set's readers cut a set of this size
            ways = {"parallel": (block, PREFETCH_READERS, None), "serial": (CHUNK, 1, seed)}
            order = ["parallel", "serial"] if parallel_first else ["serial", "parallel"]
            out: dict[str, Any] = {"bytes": n, "offset": off, "page_cache": cached}
            for way in order:
                block, threads, shuffle = ways[way]
                out[f"{way}_ms"] = read_span(fd, off, buf, block, threads, shuffle) * 1e3
            return out
        finally:
            buf.release()
            os.close(fd)
    finally:
        mem.close()
