"""Lazy restore (postcopy-style load): the guest resumes at once, RAM arrives on first touch.

The CPU and devices are loaded with the guest stopped, guest RAM is emptied (its populated
mapping moved aside) and the guest resumed; the disks are reverted right after, before any
guest disk access gets through.  A missing-page fault on a
2 MiB chunk makes the fault-service thread read that chunk's pages from the snapshot and
install them (which wakes the guest); a background filler does the same for every chunk
nobody touched.  A chunk is read into the old RAM's own pages at the same offset and moved
into place with UFFDIO_MOVE (nothing freed, allocated or copied), or, without that, read into
a buffer and installed with UFFDIO_COPY.  The guest never sees a page that is not the
snapshot's: a page is mapped only with the snapshot's bytes (zeros for zero pages).

The VM state is read with plain preads of precomputed host offsets, around the page cache
where the file allows (O_DIRECT, docs/deviations.md 57; the snapshot's clusters
cannot change while it exists and the snapshot lock is held), never through the image lock:
the vCPU may be blocked on a missing page while holding it for a disk request.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from emulator.block.io import BlockFile
from emulator.errors import SnaplabError
from emulator.memory import GuestRAM
from emulator.migration.cow import CHUNK, WARM_BUFFERS, WriteProtector
from emulator.migration.vmstate import PAGE, WARM_PAGES, RamLayout, read_grouped
from emulator.uffd import Fault
from emulator.workers import spawn

READ_GAP = 256 << 10  # bytes between two pages of a chunk in the file that one read reads through
BOUNCE_BYTES = 2 * (CHUNK + READ_GAP)  # the most one such read brings in

UNFILLED, FILLING, FILLED = 0, 1, 2
PREFETCH_READERS = 8  # reads of a loading set at once (LazyLoad._prefetch)
PREFETCH_GROUP = 8  # chunks of a loading set next to each other in RAM and in the file: one read (16 MiB)
FILL_BY_FAULT, FILL_BY_SET, FILL_BY_REST = 0, 1, 2  # who brought a chunk in (LazyStats.filled)


@dataclass
class LazyStats:
    moved_chunks: int = 0  # refilled with the old RAM's own pages (UFFDIO_MOVE), not new ones
    zero_chunks: int = 0  # all zero in the snapshot: nothing read, nothing installed (_touch_zeros)
    zero_touched_chunks: int = 0  # of those, touched by the guest before the fill's end (collapsed then)
    faults: int = 0
    fault_chunks: int = 0
    bg_chunks: int = 0
    handler_s: list[float] = field(default_factory=list)
    fill_s: float = 0.0
    bytes_read: int = 0  # from the image (zero pages are not read)
    resident_at: float = 0.0  # perf_counter() when the last chunk was in
    prefetched_chunks: int = 0  # filled from the loading set, ahead of the rest
    grouped_chunks: int = 0  # of those, read together with a neighbour, in one read (set_groups)
    prefetch_done_at: float = 0.0  # perf_counter() when the loading set was all in (0: none)
    prefetch_start_at: float = 0.0  # perf_counter() when its readers began (0: none)
    paced_s: float = 0.0  # the filler's pauses between chunks of the rest (a paced fill)
    # the memory map of the load (notebook 11): each fault's time (perf_counter) and chunk, and
    # each chunk as it came in: (perf_counter, chunk, by whom: FILL_BY_FAULT, _SET or _REST,
    # all zero in the snapshot: nothing read)
    fault_at: list[float] = field(default_factory=list)
    fault_chunk: list[int] = field(default_factory=list)
    filled: list[tuple[float, int, int, bool]] = field(default_factory=list)


@contextlib.contextmanager
def idle_priority(on: bool) -> Iterator[None]:
    """The calling thread at SCHED_IDLE for the block (Linux applies sched_setscheduler(0) to
    the calling thread only), then back to the policy it had."""
    if not on:
        yield
        return
    before = os.sched_getscheduler(0)
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        before = -1
    try:
        yield
    finally:
        if before >= 0:
            os.sched_setscheduler(0, before, os.sched_param(0))


def check_cluster_map(cluster_map: np.ndarray, cluster_size: int) -> None:
    """What lazy restore cannot read (checked once per snapshot, when its map is made)."""
    if cluster_size < PAGE:
        raise SnaplabError(f"lazy restore needs a cluster size of at least 4 KiB, not {cluster_size}")
    if (cluster_map < 0).any():
        raise SnaplabError("lazy restore cannot read compressed VM state")


class LazyLoad:
    """One lazy restore.  Made ahead of its load, with nothing but the guest's RAM known (the
    next one is made when a load finishes); the load's own path only binds the snapshot to it.
    ``cluster_map`` must have passed :func:`check_cluster_map` (the controller checks it once
    per snapshot: no array scan between the command and RESUME)."""

    def __init__(self, wp: WriteProtector) -> None:
        self.wp = wp
        self.ram: GuestRAM = wp.ram
        self.uffd = wp.uffd
        self.nchunks = -(-self.ram.size // CHUNK)
        self.state = np.zeros(self.nchunks, dtype=np.int8)
        self._zero = np.zeros(self.nchunks, dtype=bool)  # all zero in the snapshot (or not installed: the load failed): left missing, zero page on first touch or at the fill's end
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.stats = LazyStats()
        self.error: BaseException | None = None
        self.on_error: Callable[[str], None] | None = None
        self._buf, self._fill_buf = WARM_BUFFERS.take_n(2)  # fault service, filler
        self._aside: int | None = None
        self._src: int | None = None  # where the old RAM's pages are, while they are recycled
        self._set_hosts: dict[int, np.ndarray] = {}  # the loading set's pages' file offsets (_prefetch)
        self._set_done: threading.Event | None = None  # the loading set's load, once started (start_prefetch)
        self._free_old: Callable[[], None] | None = None
        self.armed = False
        self._hurry = False  # job-complete, quit: fill the rest now
        self.touched: list[tuple[float, int]] = []  # (perf_counter, chunk) of each chunk's first fault
        self._seen = np.zeros(self.nchunks, dtype=bool)
        self._zero_touched = np.zeros(self.nchunks, dtype=bool)  # zero chunks mapped by _touch_zeros

    def bind(self, file: BlockFile, cluster_map: np.ndarray, cluster_size: int, stream_base: int,
             layout: RamLayout, on_error: Callable[[str], None] | None = None) -> LazyLoad:
        """The snapshot this load reads: its image file, VM-state cluster map and RAM layout.
        ``on_error`` stops the guest when a chunk cannot be read (called once, with the cause)."""
        self.file = file
        # Fault service and the filler's readers: touched before the stop.
        WARM_PAGES.warm(BOUNCE_BYTES // PAGE, count=1 + PREFETCH_READERS)
        # Around the page cache where the file allows, as the blocking load (deviation 57).
        self._read: Callable[[int, memoryview], None] = getattr(file, "preadinto_direct", file.preadinto)
        self.layout = layout
        self.cluster_map = cluster_map
        self.cluster_size = cluster_size
        self.stream_base = stream_base
        self.on_error = on_error
        return self

    def _failed(self, err: BaseException) -> None:
        """A chunk could not be read: the first error stops the guest (before any page that is
        not the snapshot's can be installed), and ends the fill."""
        with self.lock:
            first = self.error is None
            if first:
                self.error = err
        if first and self.on_error is not None:
            self.on_error(f"lazy restore could not read the snapshot's RAM: {err}")

    def _fill(self, c: int, buf: ctypes.Array[ctypes.c_char], hosts: np.ndarray | None = None) -> bool:
        """Chunk ``c`` into guest RAM, unless someone else has filled it or is filling it;
        ``hosts``: its pages' file offsets if already known (:func:`hosts_of`)."""
        with self.lock:
            if self.state[c] != UNFILLED:
                return False
            self.state[c] = FILLING
        off = c * CHUNK
        n = min(CHUNK, self.ram.size - off)
        src = self._src
        if src is not None:  # the old RAM's pages, at the same offset: read into them, move them
            buf = (ctypes.c_char * n).from_address(src + off)
        try:
            if hosts is None:
                hosts = self._hosts(off // PAGE, n // PAGE)
            zero = not hosts.any()
            if not zero:
                self._read_chunk(off, n, buf, hosts)
        except Exception as err:
            # An I/O error: the guest is stopped first; the chunk is then left as an all-zero
            # one, only so that a vCPU blocked on it can reach its stop.
            self._failed(err)
            zero = True
        self._install(c, off, n, ctypes.addressof(buf), zero)
        return True

    def _install(self, c: int, off: int, n: int, data: int, zero: bool) -> None:
        """Chunk ``c`` (RAM [off, off+n)), read to address ``data``, into guest RAM: moved
        when ``data`` is the old RAM's own pages at that offset, else copied; an all-zero chunk
        (``zero``) is left missing.  Then FILLED, whatever happens: an error fails the load."""
        src = self._src
        try:
            if zero:
                pass  # nothing installed: see _touch_zeros and the fill's end
            elif src is not None and data == src + off and self._move(off, src, n):
                with self.lock:  # (several readers)
                    self.stats.moved_chunks += 1
            elif self.uffd.copy(self.ram.addr + off, data, n) != n:
                # Not moved whole (the kernel refused a page), or some pages were already there
                # (a previous partial copy): install the rest one by one.
                for p in range(0, n, PAGE):
                    r = self.uffd.copy(self.ram.addr + off + p, data + p, PAGE)
                    if r < 0 and r != -errno.EEXIST:
                        raise OSError(-r, f"UFFDIO_COPY failed: {os.strerror(-r)}")
        except OSError as err:  # not installed: the load has failed, as for an unreadable chunk
            self._failed(err)
            zero = True
        finally:  # never left FILLING: the fill's end waits for no chunk to be
            with self.lock:
                if zero:
                    self._zero[c] = True
                    self.stats.zero_chunks += 1
                self.state[c] = FILLED
                self.cond.notify_all()

    def _touch_zeros(self, addr: int) -> None:
        """A fault on an all-zero chunk.  Such a chunk is left missing by the fill: after the
        load a missing page reads as zeros and the fill's end read-maps it to the shared huge
        zero page (one 2 MiB entry: no memory, a cheap write-protect arm, a zero-page scan from
        cache).  A chunk touched during the fill gets the zero page in all its 512 entries now
        (one UFFDIO_ZEROPAGE, as QEMU's postcopy places a zero page,
        ``postcopy_place_page_zero``), so its other pages do not fault one by one; pages
        already there are left as they are.  The faulting thread is woken.  The fill's end
        collapses such a chunk into a huge page: the guest is using it."""
        off = (addr - self.ram.addr) // CHUNK * CHUNK
        n = min(CHUNK, self.ram.size - off)
        self._zero_touched[off // CHUNK] = True
        if self.uffd.zeropage(self.ram.addr + off, n) != n:
            for p in range(0, n, PAGE):  # (some pages were there: an earlier touch, a host read)
                r = self.uffd.zeropage(self.ram.addr + off + p, PAGE)
                if r < 0 and r != -errno.EEXIST:
                    raise OSError(-r, f"UFFDIO_ZEROPAGE failed: {os.strerror(-r)}")
        self.uffd.wake(addr & ~(PAGE - 1), PAGE)

    def _move(self, off: int, src: int, n: int) -> bool:
        """UFFDIO_MOVE of RAM [off, off+n) from the old RAM at ``src``; True if all of it moved.
        A page an O_DIRECT read has just filled may still be pinned for a moment (the kernel
        releases such pages from a workqueue): the move refuses it with EBUSY and is tried
        again, from where it stopped, a few times before the caller copies the rest."""
        done = 0
        for attempt in range(20):
            r = self.uffd.move(self.ram.addr + off + done, src + off + done, n - done)
            done += max(r, 0)
            if done >= n:
                return True
            if r < 0 and r != -errno.EBUSY:
                return False
            time.sleep(0 if attempt < 10 else 1e-4)
        return False

    def _read_chunk(self, off: int, n: int, buf: ctypes.Array[ctypes.c_char], hosts: np.ndarray) -> None:
        """The snapshot's bytes of RAM [off, off+n) into ``buf`` (zeros for zero pages).  Pages
        that lie near each other in the file (at most READ_GAP apart: a blocking save's stream
        holds a chunk's non-zero pages side by side, a copy-on-write save's by page index)
        come in with one read into a bounce buffer and are copied into place: around the page
        cache every read is a request to the disk."""
        if self.error is not None:
            raise SnaplabError("an earlier chunk could not be read")
        idx = np.flatnonzero(hosts)
        if len(idx) < n // PAGE:  # (a chunk without a zero page is all overwritten by its reads)
            ctypes.memset(buf, 0, n)
        if not len(idx):
            return
        mv = memoryview(buf).cast("B")
        h = hosts[idx]
        # Runs: pages next to each other both in RAM and in the file.
        cut = np.flatnonzero((np.diff(idx) != 1) | (np.diff(h) != PAGE)) + 1
        first_pages = np.concatenate(([0], cut))
        lens = np.diff(np.concatenate((first_pages, [len(idx)]))).astype(np.int64) * PAGE
        with WARM_PAGES.take(BOUNCE_BYTES // PAGE) as bounce:
            read_grouped(self._read, mv, ctypes.addressof(buf), idx[first_pages].astype(np.int64) * PAGE,
                         h[first_pages].astype(np.int64), lens, bounce, READ_GAP)
        with self.lock:  # (several readers)
            self.stats.bytes_read += len(idx) * PAGE

    def _hosts(self, first: int, n: int) -> np.ndarray:
        """Host file offset of pages [first, first+n) of RAM (0 for zero pages)."""
        nz = self.layout.nonzero_range(first, n)
        pos = self.layout.page_offsets(first, n) + self.stream_base
        clusters = pos // self.cluster_size - self.stream_base // self.cluster_size
        host = self.cluster_map[np.clip(clusters, 0, len(self.cluster_map) - 1)]
        return np.where(nz & (host > 0), host + pos % self.cluster_size, 0)

    def on_fault(self, f: Fault) -> None:
        if f.wp:
            self.wp.default(f)
            return
        t0 = time.perf_counter()
        self.stats.faults += 1
        c = (f.address - self.ram.addr) // CHUNK
        self.stats.fault_at.append(t0)
        self.stats.fault_chunk.append(c)
        if not self._seen[c]:
            self._seen[c] = True
            self.touched.append((t0, c))
        filled = self._fill(c, self._buf, self._set_hosts.get(c))
        if filled:
            self.stats.fault_chunks += 1
            self.stats.filled.append((time.perf_counter(), c, FILL_BY_FAULT, bool(self._zero[c])))
        else:
            with self.lock:
                while self.state[c] != FILLED:
                    self.cond.wait()
        if self._zero[c]:
            self._touch_zeros(f.address)
        elif not filled:
            self.uffd.wake(f.address & ~(PAGE - 1), PAGE)
        self.stats.handler_s.append(time.perf_counter() - t0)

    def reserve(self) -> None:
        """Before the stop: the address space the populated RAM will be moved to."""
        self._aside = self.ram.reserve_aside()

    def release(self) -> None:
        """A reservation that was not used (the load failed before arming)."""
        if self._aside is not None:
            self.ram.release_aside(self._aside)
            self._aside = None

    def arm(self) -> None:
        """With the guest stopped: empty RAM and route missing-page faults here.  The old
        pages are freed by :meth:`free_old`, once the guest runs."""
        self.armed = True
        self.wp.handler = self.on_fault
        aside, self._aside = self._aside, None
        self._free_old = self.wp.discard_ram(aside)
        if self._free_old is not None and aside is not None and self.wp.can_move:
            self._src = aside  # the fill reads each chunk into its old pages and moves them back

    def free_old(self) -> None:
        """After RESUME: hand the pages RAM had before the load to a thread that frees them;
        when they are being recycled into RAM, the (then empty) mapping goes after the fill."""
        if self._src is not None:
            return
        free, self._free_old = self._free_old, None
        if free is not None:
            spawn(free)

    def close(self) -> None:
        """A load that was never armed: its buffers go back to the pool."""
        if not self.armed:
            self._give_back_buffers()

    def _give_back_buffers(self) -> None:
        WARM_BUFFERS.give_back([self._buf, self._fill_buf])

    def complete(self) -> None:
        """Fill the rest now (job-complete on an on-demand load, or the machine's shutdown)."""
        with self.lock:
            self._hurry = True
            self.cond.notify_all()

    def _all_in(self) -> bool:
        return bool((self.state == FILLED).all())

    def _wait_faults_only(self, until: float | None) -> None:
        """Serve faults only: until :meth:`complete`, every chunk is in, an error, or ``until``
        (perf_counter; None: no limit)."""
        with self.lock:
            while not (self._hurry or self.error is not None or self._all_in()):
                left = None if until is None else until - time.perf_counter()
                if left is not None and left <= 0:
                    return
                self.cond.wait(0.1 if left is None else min(left, 0.1))

    def _pace(self, busy_s: float, duty: float) -> None:
        """After ``busy_s`` of the filler's CPU time, wait so that it uses ``duty`` of a CPU;
        :meth:`complete` (or an error) ends the wait and the pacing.  CPU time, not wall time:
        the reads go around the page cache, and the filler's wait for the disk takes nothing
        from the guest's vCPU (measured at 4 GiB: a chunk's read 4-5 ms of wall time, so a
        wall-time duty of 5% filled the rest in 192 s)."""
        t = time.perf_counter()
        with self.lock:
            if not (self._hurry or self.error is not None):
                self.cond.wait(busy_s * (1.0 / duty - 1.0))
        self.stats.paced_s += time.perf_counter() - t

    def _prefetch(self, order: np.ndarray, buf: ctypes.Array[ctypes.c_char]) -> list[int]:
        """The chunks of ``order`` (a loading set) in range, which it returns, taken in that order by
        :data:`PREFETCH_READERS` readers at once (this thread one of them): around the page
        cache each chunk is a disk read of a few milliseconds, and a guest that touches its
        working set faster than one reader reads it faults on most of it anyway (measured at
        4 GiB with one reader: 126 faults against on-demand's 129).  Chunks that follow each
        other in RAM and in the file are read together, up to :data:`PREFETCH_GROUP` at a time
        (:func:`set_groups`, when the chunks are read into the old RAM's pages; measured at
        4 GiB with a 256 MiB set, prefetch's to90 61 ms against 74 ms chunk by chunk, and 62
        against 70 ms with 8 readers of up to 16 MiB against 4 of up to 8 MiB, alternated;
        data/results/restore-scale/README.md).  A chunk a fault reads first is skipped; a
        fault on a chunk being read waits for that read."""
        todo = [c for c in order.tolist() if 0 <= c < self.nchunks]
        try:
            hosts = self._set_hosts = hosts_of(self._hosts, self.ram.size, todo)  # (a fault on one of them uses it too)
        except Exception as err:  # the load fails as for an unreadable chunk
            self._failed(err)
            return todo
        chunks = iter(set_groups(todo, hosts) if self._src is not None else [[c] for c in todo])
        take = threading.Lock()
        # Reading into the old RAM's pages (UFFDIO_MOVE) needs no buffer; else one per reader.
        extra = WARM_BUFFERS.take_n(PREFETCH_READERS - 1) if self._src is None else []

        def reader(b: ctypes.Array[ctypes.c_char]) -> None:
            while self.error is None:
                with take:
                    g = next(chunks, None)
                if g is None:
                    return
                done = _fill_group(self, g, hosts, b)
                now = time.perf_counter()
                for c in done:
                    self.stats.filled.append((now, c, FILL_BY_SET, bool(self._zero[c])))
                with take:
                    self.stats.prefetched_chunks += len(done)

        try:
            done = [spawn(reader, extra[i] if i < len(extra) else buf) for i in range(PREFETCH_READERS - 1)]
            reader(buf)
            for d in done:
                d.wait()
        finally:
            WARM_BUFFERS.give_back(extra)
        return todo

    def start_prefetch(self, order: np.ndarray, background: bool = True) -> None:
        """Load the loading set ``order`` now: on a worker (``background``; the engine starts it
        right after RESUME, so the readers do not wait for the disks' revert and flush, while
        the guest already faults on its first chunks), else on this thread.  :meth:`fill_all`
        waits for it before the rest."""
        self.stats.prefetch_start_at = time.perf_counter()
        if background:
            self._set_done = spawn(_load_set, self, order)
        else:
            _load_set(self, order)

    def prefetch_and_wait(self, order: np.ndarray) -> None:
        """(:func:`_load_set`) The set read, then every chunk of it in place (a chunk a fault
        was still reading is waited for)."""
        want = self._prefetch(order, self._fill_buf)
        with self.lock:
            while (self.state[want] != FILLED).any() and self.error is None:
                self.cond.wait(0.1)
            if self.error is None:
                self.stats.prefetch_done_at = time.perf_counter()

    def fill_all(self, order: np.ndarray | None = None, faults_only_until: float | None = 0.0,
                 rest_idle: bool = False, rest_duty: float = 1.0) -> None:
        """The filler; returns when every chunk is in guest RAM.  ``order``: chunks to fill
        first (a loading set, in first-touch order), then the rest by address (``rest_idle``:
        at SCHED_IDLE priority; ``rest_duty`` < 1: using only that fraction of a CPU,
        until :meth:`complete`).
        ``faults_only_until``: serve only faults until then (perf_counter; None: until
        :meth:`complete` or until the guest has touched every chunk)."""
        t0 = time.perf_counter()
        buf = self._fill_buf
        try:
            if faults_only_until is None or faults_only_until > t0:
                self._wait_faults_only(faults_only_until)
            if self._set_done is None and order is not None and len(order):
                self.start_prefetch(order, background=False)
            if self._set_done is not None:  # (the set's readers use this filler's buffer)
                self._set_done.wait()
            with idle_priority(rest_idle):
                for c in range(self.nchunks):
                    if self.error is not None:
                        break
                    t = time.thread_time()
                    if self._fill(c, buf):
                        self.stats.filled.append((time.perf_counter(), c, FILL_BY_REST, bool(self._zero[c])))
                        self.stats.bg_chunks += 1
                        if rest_duty < 1.0 and not self._hurry:
                            self._pace(time.thread_time() - t, rest_duty)
            with self.lock:
                while not self._all_in() and self.error is None:
                    self.cond.wait(0.1)
                self.stats.resident_at = time.perf_counter()
        finally:
            with self.lock:  # a fault's fill may still be under way (after an error)
                while (self.state == FILLING).any():
                    self.cond.wait(0.1)
            self.wp.handler = None
            self.wp.unregister()  # every page is in: the next load moves RAM by whole tables
            # The all-zero chunks nobody touched: read-mapped, the shared huge zero page (RAM
            # stays present for write protection; a guest write since then is left as it is).
            self.ram.make_present(0, self.ram.size)
            if self._src is not None:  # every old page was moved back (or is no longer needed)
                self._src = None
                self.free_old()
        self.stats.fill_s = time.perf_counter() - t0
        self.stats.zero_touched_chunks = int(self._zero_touched.sum())
        if self.error is not None:
            raise SnaplabError(f"lazy restore could not read the snapshot's RAM: {self.error}") from self.error
        self._give_back_buffers()  # every chunk is in: no fault uses them
        # Huge pages rebuilt where data was installed, and over the zero chunks the guest
        # touched during the fill (512 small zero-page entries each, which a write then splits
        # into real small pages: the next arm would cost per page).  The zero chunks nobody
        # touched keep the huge zero page (a collapse would make them real zeroed memory).
        self.ram.collapse_chunks(~self._zero | self._zero_touched)


def hosts_of(hosts: Callable[[int, int], np.ndarray], ram_size: int, chunks: list[int]) -> dict[int, np.ndarray]:
    """The pages' file offsets of every chunk of ``chunks`` (``hosts(first, n)``:
    :meth:`LazyLoad._hosts`), one call per run of consecutive chunks (a loading set's working
    set is mostly a few runs): computed per chunk, on the readers' threads, this numpy work
    held the GIL for 0.2-0.3 ms a chunk while the guest waited for the set (measured at 4 GiB:
    50 ms summed over the 129 chunks' reads)."""
    per = CHUNK // PAGE
    pages = ram_size // PAGE
    out: dict[int, np.ndarray] = {}
    todo = sorted(set(chunks))
    i = 0
    while i < len(todo):
        j = i + 1
        while j < len(todo) and todo[j] == todo[j - 1] + 1:
            j += 1
        first = todo[i] * per
        run = hosts(first, min(todo[j - 1] * per + per, pages) - first)
        for k, c in enumerate(todo[i:j]):
            out[c] = run[k * per:(k + 1) * per]
        i = j
    return out


def group_size(chunks: int, group: int | None = None, readers: int | None = None) -> int:
    """The block size, in chunks, :func:`set_groups` cuts a loading set of ``chunks`` chunks
    into: ``group`` (PREFETCH_GROUP), fewer when the set is too small to give each of the
    ``readers`` (PREFETCH_READERS) a block of that size, at least 2."""
    group = PREFETCH_GROUP if group is None else group
    readers = PREFETCH_READERS if readers is None else readers
    return max(2, min(group, chunks // readers))


def set_groups(todo: list[int], hosts: dict[int, np.ndarray], group: int | None = None,
               readers: int | None = None) -> list[list[int]]:
    """A loading set ``todo`` (first-touch order; ``hosts``: each chunk's pages' file offsets,
    0 for a zero page) as groups of chunks, each to be read with one read: a chunk with the
    set's chunks around it in the same aligned block that are not yet grouped, whose pages
    are all non-zero and lie side by side in the file, each chunk's right after the one
    before (a run in RAM and in the file).  Blocks are ``group`` chunks (PREFETCH_GROUP),
    fewer when the set is too small to give each of the ``readers`` (PREFETCH_READERS) a
    group of that size, at least 2 (measured at 1 GiB with a 64 MiB set, 5 alternated loads
    each: to90 medians 14 ms with blocks of 4 against 17 with blocks of 8, ranges 11-18 and
    14-18, a small difference in the spread; one group per reader).  Groups keep the order
    of the chunk that started them, whichever way the guest went through RAM."""
    if (group if group is not None else PREFETCH_GROUP) < 2:
        return [[c] for c in todo]
    size = group_size(len(todo), group, readers)
    per = CHUNK // PAGE
    full = [c for c, h in hosts.items() if len(h) == per]  # (not RAM's last chunk if it is short)
    dense = dict.fromkeys(hosts, False)
    if full:  # every page non-zero and each one right after the one before in the file
        h = np.stack([hosts[c] for c in full])
        ok = (h[:, 0] > 0) & (np.diff(h, axis=1) == PAGE).all(axis=1)
        dense.update(zip(full, ok.tolist(), strict=True))
    taken: set[int] = set()

    def joins(a: int, b: int) -> bool:  # chunk b (= a + 1) reads on from chunk a
        return (a not in taken and b not in taken and dense.get(a, False) and dense.get(b, False)
                and hosts[b][0] == hosts[a][-1] + PAGE)

    out: list[list[int]] = []
    for c in todo:
        if c in taken:
            continue
        block = c - c % size
        lo = hi = c
        while lo > block and joins(lo - 1, lo):
            lo -= 1
        while hi < block + size - 1 and joins(hi, hi + 1):
            hi += 1
        out.append(list(range(lo, hi + 1)))
        taken.update(out[-1])
    return out


def _fill_group(lazy: LazyLoad, group: list[int], hosts: dict[int, np.ndarray],
                buf: ctypes.Array[ctypes.c_char]) -> list[int]:
    """(:meth:`LazyLoad._prefetch`'s readers) Chunks ``group`` (a :func:`set_groups` group:
    consecutive, all pages non-zero and side by side in the file) with one read into the old
    RAM's pages, then moved into place chunk by chunk; the chunks a fault has taken meanwhile
    are left to it (the group is cut at the first one).  A group of one is an ordinary
    :meth:`LazyLoad._fill` into ``buf``.  Returns the chunks this call filled."""
    if len(group) == 1:
        return group if lazy._fill(group[0], buf, hosts[group[0]]) else []
    with lazy.lock:
        k = 0
        while k < len(group) and lazy.state[group[k]] == UNFILLED:
            lazy.state[group[k]] = FILLING
            k += 1
    mine, rest = group[:k], group[k:]
    if mine:
        src = lazy._src
        assert src is not None
        off, n = mine[0] * CHUNK, len(mine) * CHUNK
        zero = False
        try:  # (one run of pages in RAM and in the file: read_grouped reads it straight into place)
            lazy._read_chunk(off, n, (ctypes.c_char * n).from_address(src + off), np.concatenate([hosts[c] for c in mine]))
        except Exception as err:
            lazy._failed(err)
            zero = True
        for c in mine:
            lazy._install(c, c * CHUNK, CHUNK, src + c * CHUNK, zero)
        if len(mine) > 1:
            with lazy.lock:
                lazy.stats.grouped_chunks += len(mine)
    return mine + [c for c in rest if lazy._fill(c, buf, hosts[c])]  # (after a fault's chunk: one by one)


def _load_set(lazy: LazyLoad, order: np.ndarray) -> None:
    """A loading set's load (:meth:`LazyLoad.start_prefetch`): an error fails the load as an
    unreadable chunk does."""
    try:
        lazy.prefetch_and_wait(order)
    except BaseException as err:
        lazy._failed(err)
