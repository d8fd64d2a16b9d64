"""The VM state stream: QEMU's savevm format, reduced and documented (migration/savevm.c).

Layout (all integers big-endian, as QEMU's QEMUFile)::

    u32 QEVM magic 0x5145564D, u32 version 3
    CONFIGURATION: u8 0x07, u32 len, machine name
    per device:    u8 0x04 FULL, u32 section id, u8 len + idstr, u32 instance id, u32 version id,
                   u32 payload length, payload, u8 0x7E footer, u32 section id
    RAM:           u8 0x01 START + the same section header, u32 32, header
                       (u64 ram size, u32 page size, u32 flags, u64 pages, u64 data offset),
                   (flags bit 0 SPARSE: page i lies at data offset + 4096 i, zero pages are holes;
                    written by the background engines, which save pages in any order)
                   u8 0x02 PART, u32 section id, u64 length, non-zero bitmap (1 bit per page, LSB first),
                   u8 0x02 PART, u32 section id, u64 length, padding to a 4 KiB boundary, then every
                       non-zero page in page order (zero pages are recorded by the bitmap only),
                   u8 0x03 END, u32 section id, u8 0x7E footer, u32 section id
    u8 0x10 EOF
    the loading-set trailer (loading_set.py): snaplab's, past EOF, so readers that stop at
    EOF never see it

Every non-zero page therefore lies at ``data offset + 4096 * (number of non-zero pages before
it)``: any page can be read at random (lazy restore), and a blocking load is one large read
per run of non-zero pages.  Each component registers a :class:`SaveHandler` (id, instance,
version) with save and load side by side; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from emulator import workers
from emulator.errors import LoadVMError
from emulator.migration.loading_set import (
    HEAD_SIZE,
    LoadingSet,
    capacity_for,
    empty_trailer,
    parse_trailer,
)

QEVM_MAGIC = 0x5145564D
QEVM_VERSION = 3
QEMU_VM_EOF = 0x10
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_SECTION_FOOTER = 0x7E
PAGE = 4096
RAM_IDSTR = "ram"
RAM_VERSION = 1
_RAM_HEADER = struct.Struct(">QIIQQ")
RAM_FLAG_SPARSE = 1  # page i at data offset + 4096 i (background engines); else packed
# Bounds on what a stream declares, checked before anything is read or allocated (STYLE.md:
# bound everything a peer controls).  snaplab's sections carry a u32 payload length that
# QEMU's vmstate fields do not; no device of this machine saves more than a few hundred bytes.
MAX_SECTION_SIZE = 16 << 20
MAX_NAME_SIZE = 256  # the configuration section's machine name
MAX_RAM_SIZE = 1 << 40  # a RAM section's declared size (its bitmap is at most 32 MiB)


class SaveHandler(Protocol):
    """What a component registers (QEMU's SaveStateEntry with a VMStateDescription)."""

    idstr: str
    instance_id: int
    version_id: int

    def save(self) -> bytes: ...

    def load(self, data: bytes, version_id: int) -> None: ...


@dataclass
class Handler:
    """A SaveHandler built from two callables; optionally a third that captures the state now
    and encodes it later (see :func:`capture_sections`).  A handler with ``prepare_fn`` may
    leave ``load_fn`` out: its load is the prepared change, made at once."""

    idstr: str
    version_id: int
    save_fn: Callable[[], bytes]
    load_fn: Callable[[bytes, int], None] | None
    instance_id: int = 0
    capture_fn: Callable[[], Callable[[], bytes]] | None = None
    prepare_fn: Callable[[bytes, int], Callable[[], None]] | None = None

    def save(self) -> bytes:
        return self.save_fn()

    def capture(self) -> Callable[[], bytes]:
        if self.capture_fn is not None:
            return self.capture_fn()
        return _ready(self.save_fn())

    def __post_init__(self) -> None:
        if self.load_fn is None and self.prepare_fn is None:
            raise TypeError(f"handler {self.idstr!r} has neither a load nor a prepare function")

    def load(self, data: bytes, version_id: int) -> None:
        if self.load_fn is None:
            self.prepare(data, version_id)()
        else:
            self.load_fn(data, version_id)

    def prepare(self, data: bytes, version_id: int) -> Callable[[], None]:
        """The load split in two (the mirror of capture()): decode now, apply later."""
        if self.prepare_fn is not None:
            return self.prepare_fn(data, version_id)
        load_fn = self.load_fn
        assert load_fn is not None
        return lambda: load_fn(data, version_id)


Captured = list[tuple[SaveHandler, Callable[[], bytes]]]


def capture_sections(handlers: list[SaveHandler]) -> Captured:
    """Every section's state at this instant, with the encoding left for later where a handler
    can split it (``capture()``): what the background engines run inside their downtime."""
    out: Captured = []
    for h in handlers:
        cap: Callable[[], Callable[[], bytes]] | None = getattr(h, "capture", None)
        out.append((h, cap() if cap is not None else _ready(h.save())))
    return out


def _ready(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def encode_sections(captured: Captured) -> list[tuple[SaveHandler, bytes]]:
    """The captured sections as bytes (after the guest resumed)."""
    return [(h, encode()) for h, encode in captured]


class StreamWriter(Protocol):
    def write(self, pos: int, data: bytes | memoryview) -> None: ...


class StreamReader(Protocol):
    def read(self, pos: int, n: int) -> bytes: ...

    def readinto(self, pos: int, buf: memoryview) -> None: ...


def _section_header(kind: int, sid: int, idstr: str, instance: int, version: int) -> bytes:
    name = idstr.encode()
    return struct.pack(">BIB", kind, sid, len(name)) + name + struct.pack(">II", instance, version)


SCAN_STEP = 1 << 10  # pages per reduction: 4 MiB, small temporaries


def scan_threads() -> int:
    """Threads for a zero-page scan while the guest is stopped: the CPUs this process may use,
    at most 4 (the scan is memory-bound; measured on 2 vCPUs: 4 GiB in 0.30 s with one thread,
    0.16 s with two, no better with four)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pages_nonzero(pages: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """One bool per row of ``pages`` (the uint64 words of 4 KiB pages): True where the page
    has a non-zero byte (QEMU's ``!buffer_is_zero()``, vectorised).

    A page whose first word is non-zero needs no more reading (the guest's stamped pages,
    random data: one cache line per page).  Where those are few, the others are read by
    runs (:func:`_runs_nonzero`); where they are most, only the others are read, gathered,
    by a row maximum (exact on unsigned words: 9.1 GB/s on one thread against 5.5 for
    ``np.any`` and 7.7 for an OR)."""
    if out is None:
        out = np.empty(len(pages), dtype=bool)
    if not len(pages):
        return out
    np.not_equal(pages[:, 0], 0, out=out)
    rest = np.flatnonzero(~out)
    if 2 * len(rest) >= len(out):
        _runs_nonzero(pages, out)
    elif len(rest):
        out[rest] = pages[rest].max(axis=1) != 0
    return out


def _runs_nonzero(pages: np.ndarray, out: np.ndarray) -> None:
    """The rest of :func:`pages_nonzero` for rows mostly not known yet (``out``: True where
    the first word is non-zero).  Each run of consecutive unknown rows is reduced as one flat
    stretch (``np.maximum.reduceat``: one call for all runs, ~15 GB/s on one thread against 11
    for a maximum per row, which pays for each row's reduction); a run with a non-zero word
    somewhere (a page whose data starts after its first word: rare in this project's guests,
    common in an operating system's memory) is read again row by row, and where such runs are
    half the rows, every row is: up to ~1.7x the cost of a maximum per row on such memory."""
    if not pages.flags.c_contiguous:
        np.not_equal(pages.max(axis=1), 0, out=out)
        return
    n, width = pages.shape
    change = np.flatnonzero(out[1:] != out[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [n])))
    run_max = np.maximum.reduceat(pages.reshape(-1), starts * width)  # (known rows' runs read too: few)
    again = np.repeat((run_max != 0) & ~out[starts], lengths)  # rows of unknown runs that are not all zero
    k = int(np.count_nonzero(again))
    if 2 * k >= n:
        np.not_equal(pages.max(axis=1), 0, out=out)
    elif k:
        idx = np.flatnonzero(again)
        out[idx] = pages[idx].max(axis=1) != 0


def true_runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) of each run of consecutive True values in ``flags`` (pages, chunks)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flags, [False])).astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def nonzero_pages(ram: np.ndarray, threads: int = 1) -> np.ndarray:
    """Boolean per 4 KiB page: True where the page has a non-zero byte.

    QEMU tests each page as it sends it (``buffer_is_zero()`` in ``save_zero_page()``); here
    :func:`pages_nonzero` per page, in ``threads`` threads over equal slices of RAM (numpy's
    reductions release the GIL).  Use more than one thread only while the guest is stopped:
    a running guest needs its CPU."""
    n = ram.size // PAGE
    view = ram[: n * PAGE].view(np.uint64).reshape(n, PAGE // 8)
    out = np.empty(n, dtype=bool)

    def scan(lo: int, hi: int) -> None:
        for i in range(lo, hi, SCAN_STEP):
            j = min(hi, i + SCAN_STEP)
            pages_nonzero(view[i:j], out=out[i:j])

    per = -(-n // max(1, threads))
    if threads <= 1 or per < 4 * SCAN_STEP:
        scan(0, n)
        return out
    workers = [threading.Thread(target=scan, args=(k, min(n, k + per)), name="zero-scan")
               for k in range(per, n, per)]
    for t in workers:
        t.start()
    try:
        scan(0, per)
    finally:
        for t in workers:
            t.join()
    return out


@dataclass
class SavedState:
    """What save_state wrote: sizes and where the RAM pages went."""

    size: int
    ram_data_offset: int
    nonzero: int
    machine: str
    scan_s: float = 0.0  # scanning RAM for zero pages
    scanned_pages: int = 0  # the pages that scan read (not those known zero without a read)


def aligned_pages(n: int) -> np.ndarray:
    """An (n, PAGE) uint8 array whose first byte is on a page boundary."""
    raw = np.empty((n + 1) * PAGE, dtype=np.uint8)
    skip = -raw.ctypes.data % PAGE
    return raw[skip:skip + n * PAGE].reshape(n, PAGE)


class _WarmPages:
    """Page-aligned scratch buffers (save gathers, load bounce buffers) kept for the process's
    life and touched once when made.  On a host that gives freed memory back to its hypervisor
    (free-page reporting) the first touch of fresh memory is slow and varies: measured here, a
    save that gathered scattered pages into a new 32 MiB array spent 27 ms in the gather
    usually and up to 564 ms when the array's pages had to come back first.  One buffer per
    concurrent user; a buffer is never freed, so its pages stay."""

    def __init__(self) -> None:
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def warm(self, n: int, count: int = 1) -> None:
        """Have ``count`` buffers of ``n`` pages ready (made and touched now, before a stop)."""
        with self._lock:
            missing = count - len(self._free.setdefault(n, []))
        for _ in range(max(0, missing)):
            buf = aligned_pages(n)
            buf.fill(0)
            with self._lock:
                self._free[n].append(buf)

    @contextlib.contextmanager
    def take(self, n: int) -> Iterator[np.ndarray]:
        """An (n, PAGE) page-aligned buffer, already touched, for the ``with`` block."""
        with self._lock:
            spare = self._free.setdefault(n, [])
            buf = spare.pop() if spare else None
        if buf is None:
            buf = aligned_pages(n)
            buf.fill(0)  # touched now, not inside a stop
        try:
            yield buf
        finally:
            with self._lock:
                self._free[n].append(buf)


WARM_PAGES = _WarmPages()


def read_grouped(read: Callable[[int, memoryview], None], dst: memoryview, dst_addr: int,
                 dst_offs: np.ndarray, src_offs: np.ndarray, lens: np.ndarray, bounce: np.ndarray,
                 gap: int) -> int:
    """Runs of a file, ``[src_offs[k], src_offs[k] + lens[k])``, into ``dst`` at ``dst_offs[k]``
    (``dst_addr`` is dst's address).  Runs that follow each other in the file, or nearly (at
    most ``gap`` bytes between them, read through), come in with one read into ``bounce``
    (whose size caps such a group) and are copied into place; a group of one run is read
    straight into place.  Around the page cache every read is a request to the disk: a
    blocking save's stream holds scattered pages of RAM side by side, so a load that read them
    one run at a time paid hundreds of requests for what one read brings in (measured: the
    default guest's blocking load 540 ms run by run, 70 ms grouped).  Returns the reads made."""
    n = len(lens)
    if not n:
        return 0
    cap = bounce.nbytes
    follows = np.zeros(n, dtype=bool)
    space = src_offs[1:] - (src_offs[:-1] + lens[:-1])
    follows[1:] = (space >= 0) & (space <= gap)
    d_l, s_l, n_l, f_l = dst_offs.tolist(), src_offs.tolist(), lens.tolist(), follows.tolist()
    staging = memoryview(bounce.reshape(-1).data).cast("B")
    reads, i = 0, 0
    while i < n:
        j, end = i + 1, s_l[i] + n_l[i]
        while j < n and f_l[j] and s_l[j] + n_l[j] - s_l[i] <= cap:
            end = s_l[j] + n_l[j]
            j += 1
        reads += 1
        if j - i == 1:
            read(s_l[i], dst[d_l[i]:d_l[i] + n_l[i]])
        else:
            read(s_l[i], staging[:end - s_l[i]])
            base = bounce.ctypes.data - s_l[i]
            for k in range(i, j):
                ctypes.memmove(dst_addr + d_l[k], base + s_l[k], n_l[k])  # releases the GIL
        i = j
    return reads
GATHER_PAGES = 8192  # save_state gathers scattered pages 32 MiB at a time


def save_state(out: StreamWriter, machine: str, handlers: list[SaveHandler], ram: np.ndarray | None,
               nz: np.ndarray | None = None, align: int = PAGE, threads: int = 1,
               known_zero: np.ndarray | None = None, known_zero_unit: int = 1) -> SavedState:
    """qemu_savevm_state(): the configuration, every device section, RAM, EOF.  ``align``
    (a multiple of the page size: the image's cluster size) rounds the RAM data's offset up,
    so that the data goes out in whole clusters.  Without ``nz`` RAM is scanned for zero
    pages window by window in ``threads`` threads, each window's pages written while the
    next is scanned (:func:`_save_ram_pages`), but for the pages ``known_zero`` marks (one
    bool per ``known_zero_unit`` pages: known to hold zeros without a read, e.g. mapped to the
    shared zero page); the header with the bitmap goes last."""
    head = bytearray(struct.pack(">II", QEVM_MAGIC, QEVM_VERSION))
    name = machine.encode()
    head += struct.pack(">BI", QEMU_VM_CONFIGURATION, len(name)) + name
    sid = 0
    for h in handlers:
        payload = h.save()
        head += _section_header(QEMU_VM_SECTION_FULL, sid, h.idstr, h.instance_id, h.version_id)
        head += struct.pack(">I", len(payload)) + payload
        head += struct.pack(">BI", QEMU_VM_SECTION_FOOTER, sid)
        sid += 1
    if ram is None:
        head += struct.pack(">B", QEMU_VM_EOF)
        out.write(0, bytes(head))
        return SavedState(len(head), 0, 0, machine)
    if align % PAGE:
        raise ValueError("the RAM data's alignment must be a multiple of the page size")
    pages = ram.size // PAGE
    blen = -(-pages // 8)
    blen += -blen % 8
    head += _section_header(QEMU_VM_SECTION_START, sid, RAM_IDSTR, 0, RAM_VERSION)
    hdr_pos = len(head) + 4
    head += struct.pack(">I", _RAM_HEADER.size) + bytes(_RAM_HEADER.size)
    part_at = len(head) + 13 + blen  # after the bitmap's part header and the bitmap
    ram_offset = -(-(part_at + 13) // align) * align
    pad = ram_offset - (part_at + 13)
    pos, nz, scan_s, scanned = _save_ram_pages(out, ram, nz, ram_offset, threads, known_zero, known_zero_unit)
    count = (pos - ram_offset) // PAGE
    bitmap = np.packbits(nz, bitorder="little").tobytes()
    head += struct.pack(">BIQ", QEMU_VM_SECTION_PART, sid, blen) + bitmap + bytes(blen - len(bitmap))
    head += struct.pack(">BIQ", QEMU_VM_SECTION_PART, sid, pad + count * PAGE) + bytes(pad)
    struct.pack_into(">QIIQQ", head, hdr_pos, ram.size, PAGE, 0, pages, ram_offset)
    out.write(0, bytes(head))
    tail = struct.pack(">BI", QEMU_VM_SECTION_END, sid) + struct.pack(">BI", QEMU_VM_SECTION_FOOTER, sid)
    tail += struct.pack(">B", QEMU_VM_EOF) + empty_trailer(ram.size)
    out.write(pos, tail)
    return SavedState(pos + len(tail), ram_offset, count, machine, scan_s, scanned)


SAVE_WRITERS = 2  # threads writing a blocking save's RAM data at once (a stream with write_bulk)
SCAN_WINDOW = 32768  # pages (128 MiB) scanned for zero pages before their data is handed out
SCAN_RUNS_MAX = 16  # runs of pages not known zero per window scanned one by one; more: the whole window


def _save_ram_pages(out: StreamWriter, ram: np.ndarray, nz: np.ndarray | None, pos: int, threads: int,
                    known_zero: np.ndarray | None = None, unit: int = 1) -> tuple[int, np.ndarray, float, int]:
    """The non-zero pages of ``ram`` at ``pos`` in page order, in 32 MiB writes: straight
    from guest RAM where they are contiguous, gathered (one numpy take) where they are
    scattered, into warm page-aligned buffers (WARM_PAGES: no fresh memory is touched inside
    the stop).  A stream with ``write_bulk`` (the qcow2 VM-state area) gets them from
    SAVE_WRITERS threads while the next group is gathered and the next window scanned, the
    data written without the image lock (a disk serves two requests faster than one:
    measured here 1.9 against 2.4 GB/s around the page cache).  Returns the position after
    the last page, the non-zero bitmap, the seconds spent scanning and the pages scanned.
    Pages ``known_zero`` marks (one bool per ``unit`` pages) are not read, so a guest that never
    wrote most of its RAM costs a scan of what it wrote; where a window's other pages are
    scattered (more than SCAN_RUNS_MAX runs), the window is scanned whole in ``threads``
    threads (its zero-mapped pages read from cache) rather than run by run on one."""
    pages_view = ram[: ram.size // PAGE * PAGE].reshape(-1, PAGE)
    n = len(pages_view)
    mv = memoryview(ram.data).cast("B")
    bulk = getattr(out, "write_bulk", None)
    step = GATHER_PAGES
    found = np.zeros(n, dtype=bool) if nz is None else nz
    scan_s = 0.0
    scanned = 0
    with contextlib.ExitStack() as held:
        writes = _Writes(bulk, SAVE_WRITERS) if bulk is not None else None
        held.callback(lambda: writes.close() if writes is not None else None)
        free: list[np.ndarray] = [held.enter_context(WARM_PAGES.take(step))
                                  for _ in range(SAVE_WRITERS + 1 if writes is not None else 1)]

        def emit(sel: np.ndarray) -> None:
            nonlocal pos
            first, last = int(sel[0]), int(sel[-1])
            if last - first == len(sel) - 1:
                data, buf = mv[first * PAGE:(last + 1) * PAGE], None
            else:
                buf = free.pop() if writes is None else writes.free_buffer(free)
                # mode="clip": with the default "raise" numpy buffers ``out`` in a fresh array
                got = np.take(pages_view, sel, axis=0, out=buf[:len(sel)], mode="clip")
                data = memoryview(got.data).cast("B")
            if writes is None:
                out.write(pos, data)
                if buf is not None:
                    free.append(buf)
            else:
                writes.put(pos, data, buf)
            pos += len(sel) * PAGE

        carry = np.empty(0, dtype=np.int64)
        window = n if nz is not None else SCAN_WINDOW
        for w0 in range(0, n, window):
            w1 = min(n, w0 + window)
            if nz is None:
                t = time.perf_counter()
                runs = [(0, w1 - w0)]
                if known_zero is not None:
                    kz = np.repeat(known_zero[w0 // unit:-(-w1 // unit)], unit)[w0 % unit:w0 % unit + w1 - w0]
                    runs = true_runs(~kz)  # (found stays False on the others)
                    if len(runs) > SCAN_RUNS_MAX:
                        runs = [(0, w1 - w0)]
                for a, b in runs:
                    found[w0 + a:w0 + b] = nonzero_pages(ram[(w0 + a) * PAGE:(w0 + b) * PAGE], threads)
                    scanned += b - a
                scan_s += time.perf_counter() - t
            idx = np.concatenate((carry, np.flatnonzero(found[w0:w1]) + w0))
            whole = len(idx) // step * step if w1 < n else len(idx)
            for s0 in range(0, whole, step):
                emit(idx[s0:s0 + step])
            carry = idx[whole:]
        if writes is not None:
            writes.finish()
    return pos, found, scan_s, scanned


class _Writes:
    """``write(pos, data)`` calls run by ``n`` warm worker threads; a gather buffer comes back
    to the free list once its write is done.  The first failure stops the others and is
    raised by the next :meth:`put`, :meth:`free_buffer` or :meth:`finish`."""

    def __init__(self, write: Callable[[int, memoryview], None], n: int) -> None:
        self._write = write
        self._todo: queue.Queue[tuple[int, memoryview, np.ndarray | None] | None] = queue.Queue(maxsize=n)
        self._done: queue.Queue[np.ndarray | None] = queue.Queue()
        self.error: BaseException | None = None
        self._events = [workers.spawn(self._loop) for _ in range(n)]

    def _loop(self) -> None:
        while (item := self._todo.get()) is not None:
            pos, data, buf = item
            try:
                if self.error is None:
                    self._write(pos, data)
            except BaseException as err:
                self.error = self.error or err
            self._done.put(buf)

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, pos: int, data: memoryview, buf: np.ndarray | None) -> None:
        self._check()
        self._todo.put((pos, data, buf))

    def free_buffer(self, free: list[np.ndarray]) -> np.ndarray:
        """A gather buffer whose write is done (waits for one when all are being written)."""
        while not free:
            buf = self._done.get()
            if buf is not None:
                free.append(buf)
        self._check()
        return free.pop()

    def finish(self) -> None:
        """Every write done; raises the first failure."""
        self.close()
        self._check()

    def close(self) -> None:
        """The workers stopped once their writes are done (after a failure too)."""
        if self._events:
            for _ in self._events:
                self._todo.put(None)
            for ev in self._events:
                ev.wait()
            self._events = []


class _Cursor:
    def __init__(self, src: StreamReader, size: int) -> None:
        self.src = src
        self.size = size
        self.pos = 0
        self._buf = b""
        self._buf_pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise LoadVMError(f"truncated stream at offset {self.pos} (wanted {n} bytes of {self.size})", -5)
        end = self.pos + n
        if not (self._buf_pos <= self.pos and end <= self._buf_pos + len(self._buf)):
            want = max(n, 1 << 16)
            self._buf = self.src.read(self.pos, min(want, self.size - self.pos))
            self._buf_pos = self.pos
        off = self.pos - self._buf_pos
        self.pos = end
        return self._buf[off:off + n]

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])


@dataclass
class RamLayout:
    """Where each page of a RAM section is in the stream, from the section's zero-page bitmap.

    The bitmap stays packed (1 bit per page, as stored): parsing costs O(bitmap bytes), and the
    per-page views are unpacked on demand, per range (a lazy restore asks for 2 MiB at a time).
    """

    ram_size: int
    pages: int
    data_offset: int
    bits: np.ndarray  # packed, little-endian bit order: bit i set = page i is stored
    sparse: bool = False  # page i at data offset + 4096 i
    _block_prefix: np.ndarray | None = None
    _nonzero: np.ndarray | None = None

    BLOCK = 512  # pages per prefix-sum block (2 MiB, 64 bitmap bytes)

    @property
    def nonzero(self) -> np.ndarray:
        """Bool per page (unpacked once, on first use)."""
        if self._nonzero is None:
            self._nonzero = self.nonzero_range(0, self.pages)
        return self._nonzero

    def nonzero_range(self, first: int, n: int) -> np.ndarray:
        """Bool per page for pages [first, first+n)."""
        n = max(0, min(n, self.pages - first))
        lo = first // 8
        out = np.unpackbits(self.bits[lo:(first + n + 7) // 8], bitorder="little")
        return out[first - lo * 8:first - lo * 8 + n].view(bool)

    def page_offsets(self, first: int, n: int) -> np.ndarray:
        """Stream offsets of pages [first, first+n) (meaningful for non-zero pages only)."""
        if self.sparse:
            return self.data_offset + (first + np.arange(n, dtype=np.int64)) * PAGE
        if self._block_prefix is None:
            per = self.BLOCK // 8
            packed = np.zeros(-(-self.pages // self.BLOCK) * per, dtype=np.uint8)
            packed[:len(self.bits)] = self.bits[:len(packed)]
            tail = self.pages % 8
            if tail:  # bits past the last page do not count
                packed[self.pages // 8] &= (1 << tail) - 1
            packed[(self.pages + 7) // 8:] = 0
            counts = np.bitwise_count(packed).reshape(-1, per).sum(axis=1, dtype=np.int64)
            self._block_prefix = np.concatenate(([0], np.cumsum(counts)))
        b0 = first // self.BLOCK
        before = int(self._block_prefix[b0]) + int(self.nonzero_range(b0 * self.BLOCK, first - b0 * self.BLOCK).sum())
        local = np.cumsum(self.nonzero_range(first, n), dtype=np.int64) - 1
        return self.data_offset + (before + local) * PAGE

    @property
    def page_offset(self) -> np.ndarray:
        """Stream offset of every page (O(pages): take it once, not per access)."""
        return self.page_offsets(0, self.pages)


@dataclass
class ParsedState:
    """A checked stream: the device payloads to apply and where RAM is."""

    pending: list[tuple[SaveHandler, bytes, int]]
    layout: RamLayout | None
    loading_set: LoadingSet | None = None  # the trailer past EOF, if the stream has one

    def rebind(self, handlers: list[SaveHandler]) -> ParsedState:
        """The same state for another set of handler objects of the same machine."""
        by_id = {(h.idstr, h.instance_id): h for h in handlers}
        try:
            pending = [(by_id[(h.idstr, h.instance_id)], p, v) for h, p, v in self.pending]
        except KeyError as err:
            raise LoadVMError(f"Unknown savevm section or instance '{err.args[0][0]}' {err.args[0][1]}") from err
        if len(pending) + (self.layout is not None) != len(by_id) + (self.layout is not None):
            raise LoadVMError("the stream's sections do not match this machine's devices")
        return ParsedState(pending, self.layout, self.loading_set)


def _section_handler(by_id: dict[tuple[str, int], SaveHandler], idstr: str, instance: int,
                     version: int) -> SaveHandler:
    """The handler for a device section, with qemu_loadvm_section_start_full()'s checks."""
    h = by_id.get((idstr, instance))
    if h is None:
        raise LoadVMError(f"Unknown savevm section or instance '{idstr}' {instance}. Make sure that your "
                          "current VM setup matches your saved VM setup, including any hotplugged devices")
    if version > h.version_id:
        raise LoadVMError(f"savevm: unsupported version {version} for '{idstr}' v{h.version_id}")
    return h


def parse_state(src: StreamReader, size: int, machine: str, handlers: list[SaveHandler]) -> ParsedState:
    """Read and check a whole stream against this machine; nothing is applied."""
    cur = _Cursor(src, size)
    if size < 8 or cur.u32() != QEVM_MAGIC:
        raise LoadVMError("not a VM state stream (bad magic)")
    v = cur.u32()
    if v != QEVM_VERSION:
        raise LoadVMError(f"unsupported VM state stream version {v}")
    by_id = {(h.idstr, h.instance_id): h for h in handlers}
    pending: list[tuple[SaveHandler, bytes, int]] = []
    layout: RamLayout | None = None
    seen: set[tuple[str, int]] = set()
    while True:
        kind = cur.u8()
        if kind == QEMU_VM_EOF:
            break
        if kind == QEMU_VM_CONFIGURATION:
            name = cur.take(_bounded(cur.u32(), MAX_NAME_SIZE, "machine name")).decode(errors="replace")
            if name != machine:
                raise LoadVMError(f"Machine type received is '{name}' and local is '{machine}'")
            continue
        if kind not in (QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_START):
            raise LoadVMError(f"unexpected section type {kind:#x} at offset {cur.pos - 1}")
        sid = cur.u32()
        idstr = cur.take(cur.u8()).decode(errors="replace")
        instance = cur.u32()
        version = cur.u32()
        if idstr == RAM_IDSTR and kind == QEMU_VM_SECTION_START:
            layout = _read_ram(cur, sid, version)
            seen.add((idstr, instance))
            continue
        h = _section_handler(by_id, idstr, instance, version)
        payload = cur.take(_bounded(cur.u32(), MAX_SECTION_SIZE, f"section '{idstr}'"))
        if cur.u8() != QEMU_VM_SECTION_FOOTER or cur.u32() != sid:
            raise LoadVMError(f"Missing section footer for {idstr}")
        pending.append((h, payload, version))
        seen.add((idstr, instance))
    missing = [k for k in by_id if k not in seen]
    if missing:
        raise LoadVMError(f"the stream has no section for '{missing[0][0]}' {missing[0][1]}")
    lset = None
    if layout is not None and cur.pos < size:
        n = min(size - cur.pos, HEAD_SIZE + 4 * capacity_for(layout.ram_size))
        lset = parse_trailer(src.read(cur.pos, n), cur.pos, layout.ram_size)
    return ParsedState(pending, layout, lset)


def _bounded(n: int, limit: int, what: str) -> int:
    """A length the stream declares, refused past ``limit`` before anything is read."""
    if n > limit:
        raise LoadVMError(f"{what} length {n} exceeds the limit of {limit} bytes")
    return n


def apply_state(parsed: ParsedState, load_ram: Callable[[RamLayout], None] | None) -> None:
    """Apply the device payloads (every one decoded before any is applied), then hand RAM to
    ``load_ram``."""
    if load_ram is not None and parsed.layout is None:
        raise LoadVMError("the stream has no RAM section")
    prepare_state(parsed)()
    if load_ram is not None and parsed.layout is not None:
        load_ram(parsed.layout)


def prepare_state(parsed: ParsedState) -> Callable[[], None]:
    """apply_state() without RAM, split in two: every payload decoded now (a bad one fails
    here, before any stop), the returned function applies them (what a lazy load runs in its
    downtime)."""
    steps: list[tuple[str, Callable[[], None]]] = []
    for h, payload, version in parsed.pending:
        prep: Callable[[bytes, int], Callable[[], None]] | None = getattr(h, "prepare", None)
        with _device_errors(h.idstr):
            step = prep(payload, version) if prep is not None else functools.partial(h.load, payload, version)
        steps.append((h.idstr, step))

    def apply() -> None:
        # A plain try per step (no context manager object): this runs inside a downtime.
        for idstr, step in steps:
            try:
                step()
            except (ValueError, struct.error) as err:
                raise _device_error(idstr, err) from err

    return apply


@contextlib.contextmanager
def _device_errors(idstr: str) -> Iterator[None]:
    """A device's bad payload as QEMU words it (vmstate_load_state's error report)."""
    try:
        yield
    except (ValueError, struct.error) as err:
        raise _device_error(idstr, err) from err


def _device_error(idstr: str, err: Exception) -> LoadVMError:
    return LoadVMError(f"error while loading state for instance 0x0 of device '{idstr}': {err}")


def load_state(src: StreamReader, size: int, machine: str, handlers: list[SaveHandler],
               load_ram: Callable[[RamLayout], None] | None) -> None:
    """qemu_loadvm_state(): validate everything, then apply sections in stream order.

    Device payloads are collected first and applied only once the whole stream has been read
    and checked, so a bad stream changes nothing.  RAM is handed to ``load_ram`` last.
    """
    apply_state(parse_state(src, size, machine, handlers), load_ram)


def _read_ram(cur: _Cursor, sid: int, version: int) -> RamLayout:
    if version > RAM_VERSION:
        raise LoadVMError(f"savevm: unsupported version {version} for 'ram' v{RAM_VERSION}")
    if cur.u32() != _RAM_HEADER.size:
        raise LoadVMError("bad RAM section header")
    ram_size, page, _flags, pages, data_offset = _RAM_HEADER.unpack(cur.take(_RAM_HEADER.size))
    if page != PAGE or pages * PAGE != ram_size or ram_size > MAX_RAM_SIZE:
        raise LoadVMError(f"bad RAM geometry (page {page}, {pages} pages, {ram_size} bytes)")
    if cur.u8() != QEMU_VM_SECTION_PART or cur.u32() != sid:
        raise LoadVMError("bad RAM bitmap part")
    blen = cur.u64()
    bitmap_bytes = (pages + 7) // 8
    if blen != (bitmap_bytes + 7) // 8 * 8:
        raise LoadVMError("bad RAM bitmap length")
    bits = np.frombuffer(cur.take(blen), dtype=np.uint8)[:bitmap_bytes]
    if cur.u8() != QEMU_VM_SECTION_PART or cur.u32() != sid:
        raise LoadVMError("bad RAM data part")
    dlen = cur.u64()
    count = int(np.bitwise_count(bits).sum(dtype=np.int64))
    if pages % 8:
        count -= int(np.bitwise_count(bits[-1] >> (pages % 8)))  # bits past the last page
    stored = pages if _flags & RAM_FLAG_SPARSE else count
    if data_offset < cur.pos or cur.pos + dlen != data_offset + stored * PAGE:
        raise LoadVMError("RAM data length does not match the bitmap")
    cur.pos = data_offset + stored * PAGE
    if cur.pos > cur.size:
        raise LoadVMError("truncated stream: RAM pages missing", -5)
    if cur.u8() != QEMU_VM_SECTION_END or cur.u32() != sid:
        raise LoadVMError("bad RAM section end")
    if cur.u8() != QEMU_VM_SECTION_FOOTER or cur.u32() != sid:
        raise LoadVMError("Missing section footer for ram")
    return RamLayout(ram_size, pages, data_offset, bits, bool(_flags & RAM_FLAG_SPARSE))


@dataclass
class SparseRam:
    """Where a background engine's RAM section parts go: sparse (page *i* at data offset +
    4096 *i*, for pre-copy's rounds, which rewrite pages in any order) or compact (the blocking
    save's layout: non-zero pages in page order, for copy-on-write's in-order saver)."""

    sid: int
    bitmap_offset: int
    bitmap_len: int
    data_offset: int
    ram_size: int
    sparse: bool = True
    part_offset: int = 0  # the data PART record (its length is written last when compact)

    def page_offset(self, page: int) -> int:
        return self.data_offset + page * PAGE

    def end_for(self, count: int) -> int:
        """Where the RAM data ends: all of RAM when sparse, ``count`` pages when compact."""
        return self.data_offset + (self.ram_size if self.sparse else count * PAGE)

    @property
    def end(self) -> int:
        return self.end_for(0)


def begin_sparse_stream(out: StreamWriter, machine: str, sections: list[tuple[SaveHandler, bytes]],
                        ram_size: int, min_data_offset: int = 0, align: int = PAGE,
                        sparse: bool = True) -> SparseRam:
    """The stream up to the RAM data, for an engine that writes RAM after the stop instant.

    Device payloads were taken at the stop instant (``sections``).  ``sparse``: layout flag
    SPARSE, page *i* at ``data offset + 4096 * i``, zero pages never written (they read as
    zeros), for an engine that saves pages in any order.  Otherwise the blocking save's compact
    layout (non-zero pages in page order), whose data length is known only at the end.  Either
    way the bitmap is written last (:func:`finish_sparse_stream`).  ``align`` (a multiple of
    the page size) rounds the data offset up: with the image's cluster size, RAM data starts on
    a cluster, so whole clusters are written without a read-modify-write of their edges.
    """
    head = bytearray(struct.pack(">II", QEVM_MAGIC, QEVM_VERSION))
    name = machine.encode()
    head += struct.pack(">BI", QEMU_VM_CONFIGURATION, len(name)) + name
    sid = 0
    for h, payload in sections:
        head += _section_header(QEMU_VM_SECTION_FULL, sid, h.idstr, h.instance_id, h.version_id)
        head += struct.pack(">I", len(payload)) + payload
        head += struct.pack(">BI", QEMU_VM_SECTION_FOOTER, sid)
        sid += 1
    pages = ram_size // PAGE
    blen = ((pages + 7) // 8 + 7) // 8 * 8
    head += _section_header(QEMU_VM_SECTION_START, sid, RAM_IDSTR, 0, RAM_VERSION)
    hdr_pos = len(head) + 4
    head += struct.pack(">I", _RAM_HEADER.size) + bytes(_RAM_HEADER.size)
    head += struct.pack(">BIQ", QEMU_VM_SECTION_PART, sid, blen)
    bitmap_offset = len(head)
    head += bytes(blen)
    part_at = len(head)
    data_offset = -(-max(part_at + 13, min_data_offset) // align) * align
    if data_offset % PAGE:
        raise ValueError("data offset must be page-aligned")
    pad = data_offset - (part_at + 13)
    head += struct.pack(">BIQ", QEMU_VM_SECTION_PART, sid, pad + ram_size) + bytes(pad)
    struct.pack_into(">QIIQQ", head, hdr_pos, ram_size, PAGE, RAM_FLAG_SPARSE if sparse else 0, pages, data_offset)
    out.write(0, bytes(head))
    return SparseRam(sid, bitmap_offset, blen, data_offset, ram_size, sparse, part_at)


def finish_sparse_stream(out: StreamWriter, sp: SparseRam, nonzero: np.ndarray, trailer: bytes | None = None) -> int:
    """Write the bitmap (and, compact, the data length) and the end of the stream, with
    ``trailer`` after EOF (default: an empty loading set); returns the stream size."""
    bitmap = np.packbits(nonzero, bitorder="little").tobytes()
    out.write(sp.bitmap_offset, bitmap + bytes(sp.bitmap_len - len(bitmap)))
    end = sp.end_for(int(np.count_nonzero(nonzero)))
    if not sp.sparse:
        out.write(sp.part_offset, struct.pack(">BIQ", QEMU_VM_SECTION_PART, sp.sid, end - (sp.part_offset + 13)))
    tail = struct.pack(">BI", QEMU_VM_SECTION_END, sp.sid) + struct.pack(">BI", QEMU_VM_SECTION_FOOTER, sp.sid)
    tail += struct.pack(">B", QEMU_VM_EOF) + (empty_trailer(sp.ram_size) if trailer is None else trailer)
    out.write(end, tail)
    return end + len(tail)


# -- the sequential form (migration streams: exec:, file:) -------------------------------------
RAM_FLAG_STREAMED = 2  # RAM as PART records (u64 first page, u32 pages, data), in any page order
_RECORD_CHUNK = 4096  # pages read and placed at a time (16 MiB), whatever a record declares


class SequentialStream:
    """The VM-state stream written strictly in order, for a pipe or a plain file.

    Same framing as the snapshot stream; the RAM section (flag STREAMED) carries records of
    consecutive non-zero pages in whatever order they were saved; zero pages are not sent.
    """

    def __init__(self, write: Callable[[bytes | memoryview], None]) -> None:
        self._write = write
        self.size = 0
        self.sid = 0

    def _out(self, data: bytes | memoryview) -> None:
        self._write(data)
        self.size += len(data)

    def begin(self, machine: str, sections: list[tuple[SaveHandler, bytes]], ram_size: int) -> None:
        head = bytearray(struct.pack(">II", QEVM_MAGIC, QEVM_VERSION))
        name = machine.encode()
        head += struct.pack(">BI", QEMU_VM_CONFIGURATION, len(name)) + name
        for h, payload in sections:
            head += _section_header(QEMU_VM_SECTION_FULL, self.sid, h.idstr, h.instance_id, h.version_id)
            head += struct.pack(">I", len(payload)) + payload + struct.pack(">BI", QEMU_VM_SECTION_FOOTER, self.sid)
            self.sid += 1
        head += _section_header(QEMU_VM_SECTION_START, self.sid, RAM_IDSTR, 0, RAM_VERSION)
        head += struct.pack(">I", _RAM_HEADER.size) + _RAM_HEADER.pack(ram_size, PAGE, RAM_FLAG_STREAMED,
                                                                       ram_size // PAGE, 0)
        self._out(bytes(head))

    def pages(self, first_page: int, data: memoryview) -> None:
        self._out(struct.pack(">BIQI", QEMU_VM_SECTION_PART, self.sid, first_page, len(data) // PAGE))
        self._out(data)

    def end(self) -> int:
        self._out(struct.pack(">BIBIB", QEMU_VM_SECTION_END, self.sid, QEMU_VM_SECTION_FOOTER, self.sid, QEMU_VM_EOF))
        return self.size


def load_sequential(read: Callable[[int], bytes], machine: str, handlers: list[SaveHandler],
                    place: Callable[[int, bytes], None], ram_size: int) -> None:
    """Read a sequential stream: device sections are applied at the end (after validation),
    pages are handed to ``place(first_page, data)`` as they arrive."""

    def take(n: int) -> bytes:
        data = read(n)
        if len(data) != n:
            raise LoadVMError(f"truncated migration stream (wanted {n} bytes, got {len(data)})", -5)
        return data

    if struct.unpack(">I", take(4))[0] != QEVM_MAGIC:
        raise LoadVMError("not a VM state stream (bad magic)")
    if struct.unpack(">I", take(4))[0] != QEVM_VERSION:
        raise LoadVMError("unsupported VM state stream version")
    by_id = {(h.idstr, h.instance_id): h for h in handlers}
    pending: list[tuple[SaveHandler, bytes, int]] = []
    while True:
        kind = take(1)[0]
        if kind == QEMU_VM_EOF:
            break
        if kind == QEMU_VM_CONFIGURATION:
            name = take(_bounded(struct.unpack(">I", take(4))[0], MAX_NAME_SIZE, "machine name")).decode(errors="replace")
            if name != machine:
                raise LoadVMError(f"Machine type received is '{name}' and local is '{machine}'")
            continue
        if kind not in (QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_START):
            raise LoadVMError(f"unexpected section type {kind:#x}")
        sid = struct.unpack(">I", take(4))[0]
        idstr = take(take(1)[0]).decode(errors="replace")
        instance, version = struct.unpack(">II", take(8))
        if idstr == RAM_IDSTR:
            if struct.unpack(">I", take(4))[0] != _RAM_HEADER.size:
                raise LoadVMError("bad RAM section header")
            size, page, flags, _pages, _ = _RAM_HEADER.unpack(take(_RAM_HEADER.size))
            if size != ram_size:
                raise LoadVMError(f"Length mismatch: pc.ram: {size:#x} in != {ram_size:#x}: Invalid argument")
            if page != PAGE or not flags & RAM_FLAG_STREAMED:
                raise LoadVMError("the RAM section is not in the streamed form")
            while True:
                k = take(1)[0]
                rsid = struct.unpack(">I", take(4))[0]
                if rsid != sid:
                    raise LoadVMError("RAM record for another section")
                if k == QEMU_VM_SECTION_END:
                    if take(1)[0] != QEMU_VM_SECTION_FOOTER or struct.unpack(">I", take(4))[0] != sid:
                        raise LoadVMError("Missing section footer for ram")
                    break
                if k != QEMU_VM_SECTION_PART:
                    raise LoadVMError("bad RAM record")
                first, n = struct.unpack(">QI", take(12))
                if (first + n) * PAGE > ram_size:
                    raise LoadVMError(f"RAM record past the end of RAM (page {first}+{n})")
                for done in range(0, n, _RECORD_CHUNK):  # never a whole record in one buffer
                    k = min(_RECORD_CHUNK, n - done)
                    place(first + done, take(k * PAGE))
            continue
        h = _section_handler(by_id, idstr, instance, version)
        payload = take(_bounded(struct.unpack(">I", take(4))[0], MAX_SECTION_SIZE, f"section '{idstr}'"))
        if take(1)[0] != QEMU_VM_SECTION_FOOTER or struct.unpack(">I", take(4))[0] != sid:
            raise LoadVMError(f"Missing section footer for {idstr}")
        pending.append((h, payload, version))
    prepare_state(ParsedState(pending, None))()  # every payload decoded before any is applied
