"""The copy-on-write background snapshot engine (what the seed thread asked QEMU for).

Write-protect all guest RAM with one UFFDIO_WRITEPROTECT while the guest still runs (a write
until the stop releases its chunk and is noted: :meth:`UffdProtector.pre_arm`); stop; drain the
disks; take the CPU context and device state; protect again the chunks written since (a few
ioctls: :meth:`UffdProtector.arm`); resume; freeze the disks (pending qcow2 snapshots) while
still drained, so they are the stop instant's (savevm.py).  From then on:

* a **fault handler** thread (at real-time priority where the host allows:
  :func:`latency_priority`) reads write faults from the userfaultfd; for a 2 MiB chunk not yet
  saved it copies the chunk's non-zero pages (still the stop-instant content), packed, into a
  warm buffer, notes which pages they were, and releases its protection (which wakes the
  writer): one read of the chunk, no second scan of the copy later; a fault on a chunk already saved is only woken
  (UFFDIO_WAKE: no page-table change, so no huge page is split).  When every buffer holds a
  chunk the saver has not reached yet (:func:`fault_buffers`), the fault waits for the saver;
* a **saver** walks RAM in page order, 16 MiB at a time: the chunks nobody faulted on are read
  straight from RAM (still protected, so no copy is needed), the others from their packed copies;
  chunks still mapped to the shared zero page after the arm are known zero without being
  read (a page-table walk); a vectorised scan finds the other zero pages, one per stretch of
  chunks read from RAM; the non-zero ones are gathered, in page order, into a warm 32 MiB
  buffer, and the stretch is released at once.  The stream has the blocking save's compact
  layout (non-zero pages in page order, none of a zero page), so the copy-on-write snapshot
  is as small as a blocking one and a later load reads as much;
* a **scan-ahead** thread, which runs only when a CPU is otherwise idle (``SCHED_IDLE``), finds
  the zero pages of the unsaved chunks from the end of RAM back towards the saver, which then
  only gathers them: a paced guest leaves a CPU mostly idle, and a blocking save scans with
  every CPU;
* **writer** threads write each filled buffer (two at once into an image: whole clusters,
  the RAM data starts on a cluster of the image, around the page cache where the file allows;
  one, in order, into a ``migrate`` stream) while the saver fills the next; then the bitmap,
  and the snapshot table entries are written last.  The saver waits for a free buffer before
  it claims a span, never inside one: a claimed chunk is held for a copy in memory, not for a
  write, so a guest write never waits for the disk or the pipe.

Chunks are 2 MiB, aligned with the transparent huge pages behind guest RAM, so arming stays
O(huge pages) (~0.05-0.1 ms per GiB) across repeated snapshots (docs/reference/unicorn-notes.md,
addendum), and that arm runs before the stop: inside it only the chunks written meanwhile.  The result is the state at the stop instant, bit for bit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from emulator.block.qcow2 import Qcow2Image
from emulator.block.snapshot import PendingSnapshot
from emulator.errors import UffdUnavailable
from emulator.memory import GuestRAM, map_populated
from emulator.migration.loading_set import SOURCE_COW_WINDOW, WINDOW_S, recorded_trailer
from emulator.migration.vmstate import (
    PAGE,
    SAVE_WRITERS,
    WARM_PAGES,
    SaveHandler,
    SparseRam,
    begin_sparse_stream,
    finish_sparse_stream,
    pages_nonzero,
    true_runs,
)
from emulator.uffd import (
    UFFD_FEATURE_MOVE,
    UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_REGISTER_MODE_WP,
    Fault,
    UserFaultFD,
    zero_mapped_units_or_none,
)
from emulator.workers import spawn

CHUNK = 2 << 20
WRITEBACK_STEP = 64 << 20  # start writeback of the vmstate every this many bytes
PROT_RX = 1 | 4  # UC_PROT_READ | UC_PROT_EXEC (unicorn's values; cpu.py owns the constants)
PROT_RWX = 1 | 2 | 4
WP_BACKENDS = ("auto", "userfaultfd", "unicorn-tlb")  # auto: userfaultfd, else the Unicorn TLB fallback
UNSAVED, COPYING, SAVED = 0, 1, 2

log = logging.getLogger(__name__)


@dataclass
class CowStats:
    faults: int = 0
    fault_chunks: int = 0
    bg_chunks: int = 0
    woken: int = 0
    handler_s: list[float] = field(default_factory=list)  # per fault: read -> wake, seconds
    wait_s: list[float] = field(default_factory=list)  # per fault, of it: waiting (for a buffer, the saver or another copy)
    copy_s: list[float] = field(default_factory=list)  # per fault, of it: copying its chunk (0 if it did not)
    bytes_written: int = 0
    peak_buffers: int = 0
    arm_s: float = 0.0  # inside the stop
    pre_arm_s: float = 0.0  # before the stop, the guest running (pre_arm)
    rearmed_chunks: int = 0  # chunks the guest wrote between pre_arm and the stop, protected again inside it
    zero_chunks: int = 0  # zero-page mapped when the saver began and still unwritten: never read
    zero_map_s: float = 0.0  # finding them (a page-table walk)
    ahead_chunks: int = 0  # chunks whose zero pages the scan-ahead found, used by the saver
    ahead_policy: str = ""  # the scan-ahead thread's scheduling, or why there was none ("off (...)")
    touched: list[int] = field(default_factory=list)  # chunks first written in the window's first WINDOW_S, in order
    fault_at_s: list[float] = field(default_factory=list)  # per fault: when it was read, seconds after the arm
    fault_chunk: list[int] = field(default_factory=list)  # per fault: its chunk
    sweep: list[tuple[float, int]] = field(default_factory=list)  # the saver's front: (seconds after the arm, chunks behind it)


class _WarmBuffers:
    """The 2 MiB chunk buffers of every copy-on-write save and lazy restore in this process.

    Each is a page-aligned slice of a huge-page-backed mapping, faulted in when it is made
    (:func:`map_populated`) and kept for the process's life: a fault's copy into fresh memory
    costs ~1 ms more per chunk on this VM, and the guest waits for that copy.  Page alignment
    lets the writer hand a buffer to O_DIRECT as it is.
    """

    def __init__(self) -> None:
        self._free: list[ctypes.Array[ctypes.c_char]] = []
        self.total = 0
        self._lock = threading.Lock()

    def _make(self, n: int) -> list[ctypes.Array[ctypes.c_char]]:
        if n <= 0:
            return []
        addr = map_populated(n * CHUNK)
        self.total += n
        return [(ctypes.c_char * CHUNK).from_address(addr + i * CHUNK) for i in range(n)]

    def reserve(self, n: int) -> None:
        """At least ``n`` buffers exist (made here, outside any downtime)."""
        with self._lock:
            self._free.extend(self._make(n - self.total))

    def reserve_free(self, n: int) -> None:
        """At least ``n`` buffers free now, whatever others hold (made here, outside any
        downtime): a save that takes ``n`` then makes none."""
        with self._lock:
            self._free.extend(self._make(n - len(self._free)))

    def take_n(self, n: int) -> list[ctypes.Array[ctypes.c_char]]:
        """Exactly ``n`` buffers: free ones first, new ones for the rest."""
        with self._lock:
            out, self._free = self._free[:n], self._free[n:]
            return out + self._make(n - len(out))

    def give_back(self, bufs: list[ctypes.Array[ctypes.c_char]]) -> None:
        with self._lock:
            self._free.extend(bufs)

    @property
    def free_count(self) -> int:
        """Buffers made and not held by anyone now."""
        with self._lock:
            return len(self._free)


def fault_buffers(ram_size: int) -> int:
    """How many chunks a copy-on-write save may hold copied before a fault waits for the
    saver: a quarter of RAM, but at least 64 (128 MiB) or all of RAM where it has fewer (and
    never under 16), and at most 256 (512 MiB).

    A fault copies its chunk's non-zero pages into a free buffer and the guest goes on; the copy is
    stored when the in-order saver reaches that chunk.  While every buffer holds a chunk the
    saver has not reached yet, the next fault waits until the saver frees one or takes the
    faulting chunk itself (deviation 38), so a guest writing all over a working set larger
    than the buffers is paced by the saver's progress through RAM.  The floor of 64 is for
    small guests, whose working set can be half of RAM: a 256 MiB guest writing all over
    128 MiB with a quarter of RAM (32 buffers) waited 16 ms per save for the saver through
    ``migrate``, 4 ms with 64 (docs/deviations.md 38).
    """
    nchunks = -(-ram_size // CHUNK)
    return max(16, min(64, nchunks), min(256, ram_size // 4 // CHUNK))


WARM_BUFFERS = _WarmBuffers()


class _PendingStream:
    def __init__(self, img: Qcow2Image, p: PendingSnapshot) -> None:
        self.img, self.p = img, p

    def write(self, pos: int, data: bytes | memoryview) -> None:
        self.img.pending_save_vmstate(self.p, pos, data)

    def write_bulk(self, pos: int, data: memoryview) -> None:
        """RAM chunks: whole clusters, around the page cache where the file allows."""
        self.img.pending_save_vmstate_bulk(self.p, pos, data)


class WriteProtector:
    """A userfaultfd for guest RAM, and the one thread that serves its faults.

    RAM is registered only for an engine's window: write-protect and missing-page modes for a
    copy-on-write save (:meth:`register`, before its stop), missing-page mode for a lazy load
    (its fresh mapping, in its downtime), unregistered when the window is over.  The kernel
    moves a registered mapping one huge-page entry at a time, an unregistered one by whole
    page-table levels, about ten times faster (the next lazy load's ``mremap`` of RAM).  The engines install a handler for their window
    (:attr:`handler`); without one a write fault releases its 2 MiB chunk and a missing-page
    fault gets zeros, so the guest can never stay blocked.
    """

    def __init__(self, ram: GuestRAM) -> None:
        self.ram = ram
        try:  # UFFDIO_MOVE lets a lazy load refill RAM with the old RAM's own pages
            self.uffd = UserFaultFD(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_MOVE)
        except UffdUnavailable:
            self.uffd = UserFaultFD(UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        self.can_move = bool(self.uffd.features & UFFD_FEATURE_MOVE)
        self.registered = 0  # the UFFDIO_REGISTER_MODE_* bits RAM is registered with
        if ram.populate_seconds is None:
            # WP needs present pages: read-mapped, never-written memory stays the shared zero
            # page (no memory, no first-touch cost, and a zero-page scan that reads from cache)
            ram.populate(write=False)
        self.handler: Callable[[Fault], None] | None = None
        self.priority = ""  # the fault thread's scheduling (latency_priority), once it runs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="uffd-faults", daemon=True)
        self._thread.start()

    def warm(self) -> None:
        """Arm and disarm once: the first arm of fresh page tables is the slow one (0.4-0.6 ms
        at 4 GiB against ~0.1 after), so it is paid outside any downtime.  A guest write in
        between is released by the default handler."""
        self.register()
        self.uffd.writeprotect(self.ram.addr, self.ram.span, True)
        self.uffd.writeprotect(self.ram.addr, self.ram.span, False)
        self.unregister()

    def _serve(self) -> None:
        self.priority = latency_priority()
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            for f in self.uffd.read_faults():
                h = self.handler
                try:
                    if h is not None:
                        h(f)
                    else:
                        self.default(f)
                except Exception:
                    try:
                        self.default(f)
                    except Exception:  # this thread must outlive any one fault
                        log.exception("userfaultfd fault at %#x not served", f.address)

    def register(self, mode: int = UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MISSING) -> None:
        """RAM's faults come here (registering touches no page: ~0.03 ms at any size)."""
        if self.registered != mode:
            self.unregister()
            self.uffd.register(self.ram.addr, self.ram.span, mode)
            self.registered = mode

    def unregister(self) -> None:
        """The window is over: RAM is an ordinary mapping again (any waiter is woken)."""
        if self.registered:
            self.registered = 0
            self.uffd.unregister(self.ram.addr, self.ram.span)

    def discard_ram(self, aside: int | None = None) -> Callable[[], None] | None:
        """With the guest stopped: make RAM empty (every page missing) as fast as possible.

        The populated mapping is swapped for an empty one (:meth:`GuestRAM.discard_later`, into
        ``aside`` if reserved) and the function that frees the old pages is returned, for the
        caller to run in another thread once the guest runs (a thread woken inside the
        downtime would lengthen it).  Where the swap is refused, ``MADV_DONTNEED`` in place,
        and None.
        """
        self.unregister()  # as discard_later() wants it (no-op unless a window was left open)
        free_old = self.ram.discard_later(aside)
        if free_old is None:
            self.ram.discard()
        self.register(UFFDIO_REGISTER_MODE_MISSING)
        return free_old

    def chunk_of(self, addr: int) -> int:
        return (addr - self.ram.addr) // CHUNK

    def default(self, f: Fault) -> None:
        base = self.ram.addr + self.chunk_of(f.address) * CHUNK
        try:
            if f.wp:
                self.uffd.writeprotect(base, CHUNK, False)
            else:
                page = f.address & ~(PAGE - 1)
                if self.uffd.zeropage(page, PAGE) < 0:
                    self.uffd.wake(page, PAGE)
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise
            # A fault read after its window ended: unregistering the range woke its waiter.

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            self.unregister()
        finally:
            self.uffd.close()


class Protector(Protocol):
    """How the guest's writes are held back until their chunk is saved."""

    name: str

    def pre_arm(self, save: CowSave) -> bool: ...

    def arm(self, save: CowSave) -> int: ...

    def release(self, c: int) -> None: ...

    def release_span(self, c: int, n: int) -> None: ...

    def wake(self, c: int) -> None: ...

    def release_all(self) -> None: ...

    def disarm(self) -> None: ...


class UffdProtector:
    """Linux userfaultfd write protection (the primary backend)."""

    name = "userfaultfd"

    def __init__(self, wp: WriteProtector) -> None:
        self.wp = wp
        wp.register()  # before the stop: the downtime only arms
        self._pre = False  # pre-armed: a write fault releases its chunk and is noted (under _pre_lock)
        self._noted: list[int] = []
        self._pre_lock = threading.Lock()

    def _protect_all(self) -> None:
        self.wp.uffd.writeprotect(self.wp.ram.addr, self.wp.ram.span, True)

    def pre_arm(self, save: CowSave) -> bool:
        """With the guest running: protect all of RAM (one ioctl, O(huge pages): ~0.05 ms per
        GiB here, which inside the stop made the downtime grow with RAM), a write fault until
        the stop releasing its chunk and noting it (:meth:`arm`)."""
        with self._pre_lock:
            self._pre, self._noted = True, []
        self.wp.handler = lambda f: self._pre_fault(save, f)
        self._protect_all()
        return True

    def _pre_fault(self, save: CowSave, f: Fault) -> None:
        with self._pre_lock:
            if self._pre:
                if f.wp:
                    self._noted.append(self.wp.chunk_of(f.address))
                self.wp.default(f)  # (released before the lock goes: arm then finds it noted)
                return
        save.on_fault(f)  # the stop has armed meanwhile: a fault of the save

    def arm(self, save: CowSave) -> int:
        """Inside the stop: the faults handed to the save, and RAM write-protected; after
        :meth:`pre_arm` only the chunks released since are protected again (a few ioctls,
        whatever the RAM size; all of RAM at once where they are scattered).  Returns how
        many chunks were protected again (0 without a pre-arm)."""
        with self._pre_lock:
            pre, self._pre = self._pre, False
            self.wp.handler = save.on_fault
            noted, self._noted = sorted(set(self._noted)), []
        if not pre:
            self._protect_all()
            return 0
        runs: list[list[int]] = []  # (in plain Python: a few chunks; numpy's calls cost ~0.2 ms here)
        for c in noted:
            if runs and runs[-1][1] == c:
                runs[-1][1] = c + 1
            else:
                runs.append([c, c + 1])
        if len(runs) > REARM_RUNS_MAX:
            self._protect_all()
        else:
            for a, b in runs:
                self.wp.uffd.writeprotect(self.wp.ram.addr + a * CHUNK, min(b * CHUNK, self.wp.ram.span) - a * CHUNK, True)
        return len(noted)

    def release(self, c: int) -> None:
        self.wp.uffd.writeprotect(self.wp.ram.addr + c * CHUNK, CHUNK, False)  # also wakes waiters

    def release_span(self, c: int, n: int) -> None:
        self.wp.uffd.writeprotect(self.wp.ram.addr + c * CHUNK, min(n * CHUNK, self.wp.ram.span - c * CHUNK), False)

    def wake(self, c: int) -> None:
        self.wp.uffd.wake(self.wp.ram.addr + c * CHUNK, CHUNK)

    def release_all(self) -> None:
        self.wp.uffd.writeprotect(self.wp.ram.addr, self.wp.ram.span, False)

    def disarm(self) -> None:
        self.wp.handler = None
        self.wp.unregister()


class TlbProtector:
    """The fallback without userfaultfd: Unicorn's TLB in UC_TLB_VIRTUAL mode with a Python
    fill hook, for the snapshot window only.  A page of an unsaved chunk is mapped read/execute;
    the guest's first write to it re-enters the hook, which saves the chunk and maps it
    writable.  Host-side writes into guest RAM (device DMA) save their chunks first too."""

    name = "unicorn-tlb"

    def __init__(self, ram: GuestRAM, enable: Callable[[Callable[[int, bool], int]], None],
                 disable: Callable[[], None], rx: int, rwx: int) -> None:
        self.ram = ram
        self._enable, self._disable = enable, disable
        self.rx, self.rwx = rx, rwx
        self.save: CowSave | None = None

    def pre_arm(self, save: CowSave) -> bool:
        return False  # (the TLB hook's arm is already O(1): it flushes Unicorn's TLB)

    def arm(self, save: CowSave) -> int:
        self.save = save
        self.ram.before_write = self._host_write
        self._enable(self._perms)
        return 0

    def _perms(self, addr: int, write: bool) -> int:
        save = self.save
        if save is None or not 0 <= addr < self.ram.size:
            return self.rwx if save is None or addr >= self.ram.size else self.rx
        c = addr // CHUNK
        if save.state[c] == SAVED:
            return self.rwx
        if not write:
            return self.rx
        t0 = time.perf_counter()
        save.stats.faults += 1
        cost: list[float] = []
        save.save_or_wait(c, cost)
        save.record_fault(t0, cost, c)
        return self.rwx

    def _host_write(self, addr: int, n: int) -> None:
        save = self.save
        if save is None:
            return
        for c in range(addr // CHUNK, (addr + max(n, 1) - 1) // CHUNK + 1):
            save.save_or_wait(c)

    def release(self, c: int) -> None:
        pass

    def release_span(self, c: int, n: int) -> None:
        pass

    def wake(self, c: int) -> None:
        pass

    def release_all(self) -> None:
        pass  # disarm() turns the tracking off

    def disarm(self) -> None:
        self.ram.before_write = None
        self._disable()
        self.save = None


class StreamSink(Protocol):
    """A sequential VM-state stream (migration to exec:/file:)."""

    def begin(self, machine: str, sections: list[tuple[SaveHandler, bytes]], ram_size: int) -> None: ...

    def pages(self, first_page: int, data: memoryview) -> None: ...

    def end(self) -> int: ...


class CowSave:
    """One background save, from arm to the last chunk written."""

    def __init__(self, protector: Protector, ram: GuestRAM, img: Qcow2Image | None, pending: PendingSnapshot | None,
                 machine: str, sections: list[tuple[SaveHandler, bytes]], max_buffers: int | None = None,
                 sink: StreamSink | None = None) -> None:
        self.protector = protector
        self.ram = ram
        self.sink = sink  # a sequential stream (migrate) instead of a pending qcow2 snapshot
        self.nchunks = -(-self.ram.size // CHUNK)
        self.state = np.zeros(self.nchunks, dtype=np.int8)
        self.lock = threading.Lock()
        self.saved_cond = threading.Condition(self.lock)  # a chunk saved, or a buffer given back
        self.stats = CowStats()
        self.out = _PendingStream(img, pending) if img is not None and pending is not None else None
        self.machine = machine
        self.sections = sections
        self.sparse: SparseRam | None = None
        self.nonzero = np.zeros(self.ram.size // PAGE, dtype=bool)
        self.max_buffers = fault_buffers(ram.size) if max_buffers is None else max_buffers
        # Every buffer this save may use, warm, taken before the stop and returned at the end.
        self._owned = WARM_BUFFERS.take_n(self.max_buffers)
        self._free = list(self._owned)  # under lock
        self._packing: list[ctypes.Array[ctypes.c_char]] = []  # taken by a fault copying into it (under lock)
        self._returned = False  # give_back_buffers has run (under lock)
        # chunk -> its packed copy: the buffer, and which of its pages are non-zero (under lock)
        self._copies: dict[int, tuple[ctypes.Array[ctypes.c_char], np.ndarray]] = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._armed_at = 0.0
        self._seen = np.zeros(self.nchunks, dtype=bool)  # chunks already in stats.touched
        self._zero = np.zeros(self.nchunks, dtype=bool)  # zero-page mapped after the arm (_find_zero_chunks)
        self.scan_ahead: bool | None = None  # a second scan on an idle CPU (_ScanAhead); None: scan_ahead_wanted()
        self.pre_armed = False  # RAM protected before the stop (pre_arm); the stop re-protects what was written since
        self.ahead: _ScanAhead | None = None  # (while the saver runs)

    def attach(self, img: Qcow2Image, pending: PendingSnapshot, sections: list[tuple[SaveHandler, bytes]]) -> None:
        """Where the state goes, once the disks are frozen (after the guest resumed)."""
        self.out = _PendingStream(img, pending)
        self.sections = sections

    def abandon(self) -> None:
        """An armed save that will not run: let every chunk go (and every fault waiting for a
        buffer: its chunk is no longer unsaved)."""
        with self.lock:
            self.state[:] = SAVED
            self.saved_cond.notify_all()
        self.protector.release_all()
        self.give_back_buffers()

    def fail(self, err: BaseException) -> None:
        """A write failed (a full or failing disk): the first error is kept for :meth:`run`,
        the saver stops and every chunk is let go: the guest is never left held back, and a
        fault waiting for a buffer is let go with its chunk unsaved."""
        with self.lock:
            if self.error is None:
                self.error = err
        self._stop.set()
        self.abandon()

    def give_back_buffers(self) -> None:
        """The chunk buffers back to the process's pool (once; no save runs any more), but for
        any a fault is still copying into: that fault gives it back when its copy ends, so
        another save in this process never gets a buffer that is still being written."""
        with self.lock:
            owned, self._owned = self._owned, []
            self._free, self._copies = [], {}
            self._returned = True
            owned = [b for b in owned if not any(b is p for p in self._packing)]
        WARM_BUFFERS.give_back(owned)

    # -- arming (inside the downtime) --------------------------------------------------------
    def prepare(self) -> None:
        """Before the stop: every page of guest RAM present (MADV_POPULATE_READ; ~0.1 ms per
        GiB when it already is).  A page missing when protection is armed would not be
        protected (a write to it would not be held back), and reading it from the fault thread
        would deadlock."""
        self.ram.make_present(0, self.ram.size)

    def pre_arm(self) -> None:
        """Before the stop, the guest running: all of RAM write-protected now where the
        backend can (userfaultfd), so that :meth:`arm`, inside the stop, protects again only the
        chunks the guest wrote in between, and the downtime no longer grows with RAM."""
        t0 = time.perf_counter()
        self.pre_armed = self.protector.pre_arm(self)
        self.stats.pre_arm_s = time.perf_counter() - t0

    @property
    def armed_at(self) -> float:
        """When the arm began (perf_counter seconds; 0: not armed)."""
        return self._armed_at

    def arm(self) -> None:
        t0 = time.perf_counter()
        self._armed_at = t0
        self.stats.rearmed_chunks = self.protector.arm(self)
        self.stats.arm_s = time.perf_counter() - t0

    # -- the fault path ------------------------------------------------------------------------
    def _save_chunk(self, c: int) -> tuple[bool, float, float]:
        """Copy chunk ``c``'s non-zero pages (still protected: the stop instant's bytes) into a
        free buffer, packed (:func:`_pack_chunk`), and let it go, if nobody has; True if this
        call saved it.  With every buffer holding a
        chunk the saver has not reached yet, wait until it gives one back, or reaches ``c``
        itself (back-pressure: the guest's write waits for the saver).  Also returns the
        seconds it waited for that and the seconds it copied."""
        t0 = time.perf_counter()
        with self.lock:
            while self.state[c] == UNSAVED and not self._free:
                self.saved_cond.wait()
            waited = time.perf_counter() - t0
            if self.state[c] != UNSAVED:
                return False, waited, 0.0
            self.state[c] = COPYING
            buf = self._free.pop()
            self._packing.append(buf)
            self.stats.peak_buffers = max(self.stats.peak_buffers, len(self._owned) - len(self._free))
        off = c * CHUNK
        t1 = time.perf_counter()
        try:
            nz = _pack_chunk(self.ram.addr + off, min(CHUNK, self.ram.size - off), buf)
        except BaseException as err:  # (MemoryError in numpy's temporaries): the save fails,
            self.fail(err)  # every chunk is let go, and this write is woken as a waiter
            return False, time.perf_counter() - t0, 0.0
        finally:
            with self.lock:
                self._packing.remove(buf)
                late = self._returned  # the save's buffers went back while this one was written
            if late:
                WARM_BUFFERS.give_back([buf])
        copied = time.perf_counter() - t1
        self.protector.release(c)  # also wakes the writer
        with self.lock:
            if self.state[c] == COPYING:  # (not if the save failed meanwhile)
                self._copies[c] = (buf, nz)
                self.state[c] = SAVED
            self.saved_cond.notify_all()
        return True, waited, copied

    def save_or_wait(self, c: int, cost: list[float] | None = None) -> bool:
        """A write is about to hit chunk ``c``: save it, or wait until whoever is saving it is
        done. True if this call saved it (counted as a fault-saved chunk), False if it waited.
        ``cost`` (a fault's) gets the seconds spent waiting and copying appended.
        A chunk first written within WINDOW_S of the stop goes into the loading set, whether
        this write copies it or waits for the saver."""
        if not self._seen[c] and time.perf_counter() - self._armed_at <= WINDOW_S:
            self._seen[c] = True  # (one fault-serving thread per backend: no race)
            self.stats.touched.append(c)
        saved, waited, copied = self._save_chunk(c)
        if saved:
            self.stats.fault_chunks += 1
        else:
            t0 = time.perf_counter()
            with self.lock:
                while self.state[c] != SAVED:
                    self.saved_cond.wait()
            waited += time.perf_counter() - t0
        if cost is not None:
            cost += (waited, copied)
        return saved

    def record_fault(self, t0: float, cost: list[float], c: int) -> None:
        """One fault on chunk ``c``: when it came (``t0``), its handling time and, of it, the
        waiting and copying (what notebook 7's memory map draws)."""
        self.stats.fault_at_s.append(t0 - self._armed_at)
        self.stats.fault_chunk.append(c)
        self.stats.handler_s.append(time.perf_counter() - t0)
        self.stats.wait_s.append(cost[0])
        self.stats.copy_s.append(cost[1])

    def on_fault(self, f: Fault) -> None:
        """Called on the fault-service thread for every fault during the window."""
        wp = self.protector.wp  # type: ignore[attr-defined]
        if not f.wp:
            wp.default(f)
            return
        t0 = time.perf_counter()
        self.stats.faults += 1
        c = (f.address - self.ram.addr) // CHUNK
        if not 0 <= c < self.nchunks:
            wp.default(f)
            return
        cost: list[float] = []
        if not self.save_or_wait(c, cost):
            self.protector.wake(c)
            self.stats.woken += 1
        self.record_fault(t0, cost, c)

    # -- the saver: every chunk in page order ----------------------------------------------------
    def _take_span(self, c0: int, c1: int) -> tuple[np.ndarray, dict[int, tuple[ctypes.Array[ctypes.c_char], np.ndarray]]]:
        """Chunks [c0, c1) become the saver's: the unsaved ones claimed (their bytes are in RAM,
        still protected), the fault-copied ones with their copies; waits for a copy in flight.
        Returns which are read from RAM, and the copies."""
        with self.lock:
            while (self.state[c0:c1] == COPYING).any():
                self.saved_cond.wait()
            from_ram = self.state[c0:c1] == UNSAVED
            self.state[c0:c1][from_ram] = COPYING
            copies = {c: self._copies.pop(c) for c in range(c0, c1) if c in self._copies}
        return from_ram, copies

    def _let_go(self, c0: int, c1: int, from_ram: np.ndarray,
                copies: dict[int, tuple[ctypes.Array[ctypes.c_char], np.ndarray]]) -> None:
        """Chunks [c0, c1) are in the stream: the claimed ones released (one ioctl for the
        span: releasing a chunk already released changes nothing), the copies' buffers free."""
        if from_ram.any():
            self.protector.release_span(c0, c1 - c0)
        with self.lock:
            if from_ram.any():
                self.state[c0:c1][from_ram & (self.state[c0:c1] == COPYING)] = SAVED
            if self._owned:  # (not once the buffers went back: the save failed)
                self._free.extend(buf for buf, _ in copies.values())
            self.saved_cond.notify_all()

    def background(self) -> None:
        """Every chunk in page order, a span of :data:`SPAN` chunks at a time: the pages of the
        chunks nobody faulted on read straight from guest RAM (still write-protected, so the stop
        instant's bytes), the others from their copies; zero pages found (one vectorised scan
        per span), the non-zero ones gathered into the stream in page order (the blocking save's
        compact layout, no bytes for zero pages), the span let go.  A guest write to a claimed
        chunk waits for the gather (no I/O: the writer threads write the gathered data)."""
        gather: _Gatherer | None = None
        zero = self._zero
        # where each run of zero chunks ends: such a run is taken and let go at once (nothing
        # to read), up to ZERO_SPAN chunks, so untouched GiBs cost a few ioctls
        run_end = _run_ends(zero)
        ahead: _ScanAhead | None = None
        try:
            gather = _Gatherer(self)  # (a failure here is the save's error, as any other)
            want, why = scan_ahead_wanted() if self.scan_ahead is None else (self.scan_ahead, "off")
            if want:
                ahead = self.ahead = _ScanAhead(self, zero)
            else:
                self.stats.ahead_policy = why
            c0 = 0
            self.stats.sweep.append((time.perf_counter() - self._armed_at, 0))
            while c0 < self.nchunks:
                if self._stop.is_set():
                    return
                if ahead is not None:
                    ahead.reached = c0
                c1 = min(c0 + SPAN, self.nchunks)
                if zero[c0]:
                    c1 = min(max(c1, int(run_end[c0])), c0 + ZERO_SPAN)
                # Room for the span's pages before it is claimed: waiting for the writer to
                # hand back a buffer (a disk write, ~20 ms) with chunks claimed would hold up
                # every guest write to them for that long.
                gather.make_room(int(np.count_nonzero(~zero[c0:c1])) * (CHUNK // PAGE))
                from_ram, copies = self._take_span(c0, c1)
                try:
                    read = from_ram & ~zero[c0:c1]
                    if read.any():
                        self.ram.make_present(c0 * CHUNK, min(c1 * CHUNK, self.ram.size) - c0 * CHUNK)
                    c = c0
                    while c < c1:
                        if read[c - c0]:  # a stretch of chunks read from RAM, scanned ahead or not
                            known = ahead is not None and bool(ahead.done[c])
                            e = c + 1
                            while e < c1 and read[e - c0] and (ahead is not None and bool(ahead.done[e])) == known:
                                e += 1
                            self.stats.bg_chunks += e - c
                            gather.chunks(c, e, ahead.result(c, e) if known and ahead is not None else None)
                            # let go at once: a guest write to one of them waits no longer
                            self._let_go(c, e, np.ones(e - c, dtype=bool), {})
                            from_ram[c - c0:e - c0] = False
                            c = e
                            continue
                        if from_ram[c - c0]:  # zero at the stop (see _find_zero_chunks): no page in the stream
                            self.stats.bg_chunks += 1
                            self.stats.zero_chunks += 1
                        elif c in copies:
                            gather.packed(c, *copies[c])
                        # else: let go unsaved, the save has failed
                        c += 1
                finally:
                    self._let_go(c0, c1, from_ram, copies)
                c0 = c1
                self.stats.sweep.append((time.perf_counter() - self._armed_at, c0))
            gather.finish()
        except BaseException as err:
            self.fail(err)  # never leave the guest held back
        finally:
            if ahead is not None:
                ahead.stop()  # (before the saver returns: it reads guest RAM)
                self.stats.ahead_chunks, self.stats.ahead_policy = ahead.used, ahead.policy
            if gather is not None:
                gather.close()

    def _find_zero_chunks(self) -> None:
        """The chunks whose every page is mapped to the shared zero page, found after the arm.

        A chunk still unsaved when the saver claims it has been write-protected since the stop:
        no write has reached it (a write faults, and the fault saves the chunk first).  So one
        that was zero-page mapped at any instant after the arm held zeros at the stop, and the
        saver need not read it: for a guest that never wrote most of its RAM, a page-table walk
        (~1 ms at 16 GiB) replaces a scan of GiBs of zeros.  Chunks saved by a fault keep
        their copies, whatever this finds.  Where the kernel has no PAGEMAP_SCAN, none is known."""
        if not self._armed_at:
            return  # never before the arm (a saver run unarmed, as unit tests do, reads every chunk)
        t0 = time.perf_counter()
        zero = zero_mapped_units_or_none(self.ram.addr, self.ram.size, CHUNK)
        if zero is not None:
            self._zero = zero
        self.stats.zero_map_s = time.perf_counter() - t0

    def run(self) -> int:
        """Start the threads, wait for the last chunk, finish the stream; returns its size.

        The stream header (device sections taken at the stop instant) is written here, after
        the guest resumed: nothing but the arming happens in the downtime.
        """
        try:
            self._find_zero_chunks()
            if self.sink is not None:
                self.sink.begin(self.machine, self.sections, self.ram.size)
            else:
                assert self.out is not None
                self.sparse = begin_sparse_stream(self.out, self.machine, self.sections, self.ram.size,
                                                  align=max(PAGE, self.out.img.cluster_size), sparse=False)
            spawn(self.background).wait()
        except BaseException as err:
            self.fail(err)  # a stream that failed to begin lets every chunk go too
        finally:
            self._stop.set()
            self.give_back_buffers()
        if self.error is not None:
            raise self.error
        if self.sink is not None:
            return self.sink.end()
        assert self.sparse is not None and self.out is not None
        # The chunks the guest wrote first, as the snapshot's loading set: a chunk a fault
        # saved but that turned out all zeros would be read for nothing, so it is left out.
        first = [c for c in self.stats.touched if self.nonzero[c * (CHUNK // PAGE):(c + 1) * (CHUNK // PAGE)].any()]
        trailer = recorded_trailer(self.ram.size, first, SOURCE_COW_WINDOW, int(WINDOW_S * 1000)) if first else None
        return finish_sparse_stream(self.out, self.sparse, self.nonzero, trailer)


REARM_RUNS_MAX = 64  # more runs of chunks to protect again than this: one ioctl over all of RAM instead
SPAN = 8  # chunks the saver takes at a time (16 MiB: a guest write to one waits ~1 ms at most)
ZERO_SPAN = 512  # zero chunks taken and let go at once (1 GiB: nothing read, a write waits two ioctls)


def _run_ends(flags: np.ndarray) -> np.ndarray:
    """For each index, the end (exclusive) of the run of equal values it belongs to."""
    n = len(flags)
    if not n:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    ends = np.concatenate((change, [n]))
    return np.repeat(ends, np.diff(np.concatenate(([0], ends))))
GATHER = 32 << 20  # bytes per write of the gathered pages (one buffer filled while the writers write the others)


def _page_rows(src: int, n: int) -> np.ndarray:
    """The ``n`` bytes at ``src`` as one row of 64-bit words per 4 KiB page (a view: no copy)."""
    return np.frombuffer(memoryview((ctypes.c_char * n).from_address(src)).cast("B"),
                         dtype=np.uint64).reshape(n // PAGE, PAGE // 8)


def _copy_rows(rows: np.ndarray, idx: np.ndarray, dst: int) -> None:
    """Rows ``idx`` (in order) of ``rows`` packed at address ``dst``: one ``memmove`` when
    that is every row (releases the GIL), else one ``np.take``."""
    k = len(idx)
    if k == len(rows):
        ctypes.memmove(dst, rows.ctypes.data, k * PAGE)
    elif k:
        out = np.frombuffer(memoryview((ctypes.c_char * (k * PAGE)).from_address(dst)).cast("B"),
                            dtype=np.uint8).reshape(k, PAGE)
        np.take(rows.view(np.uint8), idx, axis=0, out=out, mode="clip")


def _pack_chunk(src: int, n: int, buf: ctypes.Array[ctypes.c_char]) -> np.ndarray:
    """The ``n`` bytes at ``src`` (a chunk's pages) into ``buf``: its non-zero pages only, in
    order, from the start; returns which pages those are.  One read of the chunk for the scan
    and one copy of its data, where a whole-chunk copy would write all of it and the saver
    would read it again for its own scan; most of a guest's first-written chunks are mostly zero
    (huge pages the guest wrote a little of)."""
    rows = _page_rows(src, n)
    nz = pages_nonzero(rows)
    _copy_rows(rows, np.flatnonzero(nz), ctypes.addressof(buf))
    return nz


class _ScanAhead:
    """A second zero-page scan for the saver, from the end of RAM back towards it, on a thread
    that runs only when a CPU would otherwise be idle (``SCHED_IDLE``; else nice 19; else none).

    A paced guest leaves most of a CPU idle, and the saver alone scans one CPU's worth: on two
    CPUs a blocking save (guest stopped) scans with both, and so would end sooner.  The
    scheduler gives this thread no CPU time the guest's vCPU or the fault thread want, but the
    interpreter lock knows no priorities: preempted while holding it (in its few lines of
    Python between numpy scans), it holds up every other thread of the process until it runs
    again, which on a host busy with other work can take long.  So a save starts it only when
    the host's CPU pressure is low (:func:`scan_ahead_wanted`).  It scans only chunks still
    unsaved (still protected: the stop instant's bytes); a chunk written since was copied by
    its fault, and the saver then uses that copy, never this scan.  The saver never waits for
    it: a chunk not scanned yet when the saver comes to it is scanned there."""

    def __init__(self, save: CowSave, skip: np.ndarray) -> None:
        self.save = save
        self.skip = skip  # known zero (zero-page mapped): nothing to scan
        self.nz = np.zeros(save.ram.size // PAGE, dtype=bool)
        self.done = np.zeros(save.nchunks, dtype=bool)
        self.reached = 0  # the saver's next chunk: this thread stays a span beyond it
        self.used = 0
        self.policy = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cow-scan-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.policy = idle_priority()
        if not self.policy:
            return
        save, per = self.save, CHUNK // PAGE
        hi = save.nchunks  # a span at a time, from the end: one scan per stretch of chunks to read
        while not self._stop.is_set():
            lo = max(hi - SPAN, self.reached + 2 * SPAN)  # (never the span the saver is on, nor the next)
            if lo >= hi:
                return
            todo = ~self.skip[lo:hi] & (save.state[lo:hi] == UNSAVED)  # (a hint, read unlocked: see above)
            for a, b in true_runs(todo):
                c, e = lo + a, lo + b
                end = min(e * CHUNK, save.ram.size)
                # (present, as for the saver: a missing page read here would wait for the fault thread)
                save.ram.make_present(c * CHUNK, end - c * CHUNK)
                pages_nonzero(_page_rows(save.ram.addr + c * CHUNK, end - c * CHUNK),
                              out=self.nz[c * per:end // PAGE])
                self.done[c:e] = True
            hi = lo

    def result(self, c: int, e: int) -> np.ndarray:
        """Chunks [c, e)'s non-zero pages, which this thread scanned (``done``; the saver
        claimed them unsaved, so they are still the stop instant's)."""
        self.used += e - c
        per = CHUNK // PAGE
        return self.nz[c * per:min(e * CHUNK, self.save.ram.size) // PAGE]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


AHEAD_MAX_PRESSURE = 10.0  # % (PSI "some avg10"): above it, no scan-ahead thread


def latency_priority() -> str:
    """Make the calling thread run as soon as it is woken: ``SCHED_FIFO`` at the lowest
    real-time priority, else nice -20; returns which, or "" where the host allows neither
    (both need CAP_SYS_NICE or an RLIMIT that grants them).

    For the fault-service thread, whose every wake-up is a guest vCPU blocked on a fault.
    Measured with ``perf sched`` on a 2-vCPU host: right after a copy-on-write save's RESUME,
    with both CPUs running other threads of the save (the job thread freezing the disks,
    starting the saver), a fault's wake-up left this thread runnable for 2.5 ms before it got
    a CPU, while the other CPU was idle part of that time (the scheduler keeps a thread that
    ran a moment ago on its CPU), and the guest stood still all along.  At real-time priority
    it preempts those threads at once: the guest's first progress after RESUME came 1.5-2.8 ms
    after it instead of 2.5-6.8 ms (notebook 7's guest, 8 MiB working set, 12 saves each way).
    The thread only copies chunks and blocks in poll() between faults, so it cannot starve the
    others (and the kernel's real-time throttling would stop it if it did)."""
    return _thread_priority("SCHED_FIFO", 1, -20)


def cpu_pressure() -> float | None:
    """The host's CPU pressure: the share of the last 10 s in which some runnable task waited
    for a CPU (``/proc/pressure/cpu``, "some avg10", in %); None where the kernel has no PSI."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some "):
                    return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return None


def scan_ahead_wanted() -> tuple[bool, str]:
    """Whether a save should start a :class:`_ScanAhead`, and why: only with a second CPU and
    the host's CPU pressure under :data:`AHEAD_MAX_PRESSURE` (an idle CPU to use; and on a busy
    host the thread could be preempted holding the interpreter lock)."""
    if len(os.sched_getaffinity(0)) < 2:
        return False, "off (one CPU)"
    p = cpu_pressure()
    if p is not None and p >= AHEAD_MAX_PRESSURE:
        return False, f"off (CPU pressure {p:.0f}%)"
    return True, ""


def idle_priority() -> str:
    """Make the calling thread run only on an otherwise idle CPU: ``SCHED_IDLE`` (Linux applies
    it to the thread), else nice 19; returns which, or "" if the host allowed neither."""
    return _thread_priority("SCHED_IDLE", 0, 19)


def _thread_priority(policy: str, priority: int, nice: int) -> str:
    """The calling thread (Linux applies both calls to it alone) under ``policy`` (an ``os``
    attribute's name) at ``priority``, else at ``nice``; returns which was set ("SCHED_...",
    "nice N"), or "" if the host allowed neither."""
    try:
        os.sched_setscheduler(0, getattr(os, policy), os.sched_param(priority))
        return policy
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        return f"nice {nice}"
    except OSError:
        return ""


class _Gatherer:
    """The saver's output: non-zero pages gathered in page order into warm 32 MiB buffers,
    which writer threads write while the saver fills the next.  Into a qcow2 VM-state area:
    whole clusters, around the page cache where the file allows, by :data:`SAVE_WRITERS`
    threads (a disk serves two requests faster than one, as for the blocking save's writers).
    Into a sequential stream (``migrate``): each stretch of pages as a record, by one thread
    that keeps the stream's order.  Either way the saver only copies: a claimed chunk is held
    for a copy in memory, never for a write to a disk or a pipe."""

    def __init__(self, save: CowSave) -> None:
        self.save = save
        self.pos = save.sparse.data_offset if save.sparse is not None else 0
        self.fill = 0
        self.cluster = save.out.img.cluster_size if save.sink is None and save.out is not None else PAGE
        self._bufs: queue.Queue[np.ndarray | None] = queue.Queue()
        # (stream position, buffer, bytes, records): records, written for a stream only, are
        # (first page, first row in the buffer, pages)
        self._todo: queue.Queue[tuple[int, np.ndarray, int, list[tuple[int, int, int]]] | None] = queue.Queue()
        self._records: list[tuple[int, int, int]] = []
        self._held = contextlib.ExitStack()
        self._unflushed = 0  # (under _count_lock)
        self._count_lock = threading.Lock()
        self._writers: list[threading.Event] = []
        self.buf: np.ndarray | None = None
        writers = SAVE_WRITERS if save.sink is None else 1
        try:
            for _ in range(writers + 1):
                self._bufs.put(self._held.enter_context(WARM_PAGES.take(GATHER // PAGE)))
            self.buf = self._bufs.get()
            for _ in range(writers):
                self._writers.append(spawn(self._write_loop))
        except BaseException:
            self.close()  # the writers started are stopped, the buffers taken given back
            raise

    def chunks(self, c: int, e: int, nz: np.ndarray | None = None) -> None:
        """Chunks [c, e)'s stop-instant bytes (in guest RAM) into the stream; ``nz``, their
        non-zero pages if already known (:class:`_ScanAhead`), else they are found here, in
        one scan for the stretch."""
        save = self.save
        off = c * CHUNK
        n = min(e * CHUNK, save.ram.size) - off
        src = save.ram.addr + off
        pages = n // PAGE
        rows = _page_rows(src, n)
        if nz is None:
            nz = pages_nonzero(rows)
        save.nonzero[off // PAGE:off // PAGE + pages] = nz
        idx = np.flatnonzero(nz)
        if not len(idx):
            return  # no data at all: nothing in the stream
        if save.sink is not None:  # a record per chunk, from its first to its last non-zero page
            per = CHUNK // PAGE
            for k in range(0, pages, per):
                sub = np.flatnonzero(nz[k:k + per])
                if len(sub):
                    lo, hi = k + int(sub[0]), k + int(sub[-1]) + 1  # zero pages inside go as zeros
                    self._record(off // PAGE + lo, src + lo * PAGE, hi - lo)
                    save.stats.bytes_written += (hi - lo) * PAGE
            return
        assert self.buf is not None
        self.make_room(len(idx))
        assert self.fill + len(idx) <= len(self.buf)  # (a stretch is at most SPAN chunks: it fits)
        _copy_rows(rows, idx, self.buf[self.fill].ctypes.data)
        self.fill += len(idx)
        save.stats.bytes_written += len(idx) * PAGE

    def packed(self, c: int, buf: ctypes.Array[ctypes.c_char], nz: np.ndarray) -> None:
        """Chunk ``c`` from a fault's packed copy: its non-zero pages, in order, at the start
        of ``buf``; ``nz`` says which pages they are (found when the fault copied them)."""
        save = self.save
        first = c * CHUNK // PAGE
        save.nonzero[first:first + len(nz)] = nz
        idx = np.flatnonzero(nz)
        k = len(idx)
        if not k:
            return
        src = ctypes.addressof(buf)
        if save.sink is not None:  # each run of consecutive non-zero pages as one record
            ends = np.flatnonzero(np.diff(idx) != 1) + 1
            for lo, hi in zip(np.concatenate(([0], ends)).tolist(), np.concatenate((ends, [k])).tolist(), strict=True):
                self._record(first + int(idx[lo]), src + lo * PAGE, hi - lo)
            save.stats.bytes_written += k * PAGE
            return
        assert self.buf is not None
        self.make_room(k)
        assert self.fill + k <= len(self.buf)
        ctypes.memmove(self.buf[self.fill].ctypes.data, src, k * PAGE)
        self.fill += k
        save.stats.bytes_written += k * PAGE

    def _record(self, first_page: int, addr: int, pages: int) -> None:
        """``pages`` pages at ``addr`` (guest page ``first_page`` on) as one record of the stream."""
        self.make_room(pages)
        assert self.buf is not None and self.fill + pages <= len(self.buf)
        ctypes.memmove(self.buf[self.fill].ctypes.data, addr, pages * PAGE)
        self._records.append((first_page, self.fill, pages))
        self.fill += pages

    def make_room(self, pages: int) -> None:
        """Hand the buffer to the writers now if ``pages`` more pages might not fit in it.
        The saver calls this before it claims a span too, with the span's most, so that its
        wait for a free buffer (a disk or pipe write, ~20 ms) holds no chunk, and so no guest
        write."""
        if self.fill and (self.fill + pages) * PAGE > GATHER:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Hand the filled buffer to the writers: whole clusters, or all of it at the end; the
        part of a cluster left over moves to the front of the next buffer."""
        assert self.buf is not None
        nbytes = self.fill * PAGE
        whole = nbytes if final else nbytes // self.cluster * self.cluster
        nxt = None if final else self._next_buffer()
        if nxt is not None and whole < nbytes:
            nxt.reshape(-1)[:nbytes - whole] = self.buf.reshape(-1)[whole:nbytes]
        if whole:
            self._todo.put((self.pos, self.buf, whole, self._records))
        else:
            self._bufs.put(self.buf)
        self._records = []
        self.pos += whole
        self.fill = (nbytes - whole) // PAGE
        self.buf = nxt

    def _next_buffer(self) -> np.ndarray:
        b = self._bufs.get()
        if b is None:  # a writer failed
            self._bufs.put(None)
            assert self.save.error is not None
            raise self.save.error
        return b

    def _write_loop(self) -> None:
        save = self.save
        try:
            while (item := self._todo.get()) is not None:
                pos, buf, n, records = item
                if save.error is not None:  # another writer failed: the save is over
                    self._bufs.put(buf)
                    continue
                data = memoryview(buf.reshape(-1).data).cast("B")
                if save.sink is not None:
                    for first, row, pages in records:
                        save.sink.pages(first, data[row * PAGE:(row + pages) * PAGE])
                    self._bufs.put(buf)
                    continue
                assert save.out is not None
                save.out.write_bulk(pos, data[:n])
                with self._count_lock:
                    self._unflushed += n
                    kick = self._unflushed >= WRITEBACK_STEP
                    if kick:
                        self._unflushed = 0
                if kick:
                    # Start writeback as we go (what O_DIRECT leaves dirty: metadata, or
                    # everything on a file system without it): the flush at the end then
                    # waits for the tail only.
                    start = getattr(save.out.img.file, "start_writeback", None)
                    if start is not None:
                        start()
                self._bufs.put(buf)
        except BaseException as err:
            save.fail(err)
            self._bufs.put(None)

    def finish(self) -> None:
        """The last pages out, and wait until the writers have written everything."""
        if self.fill:
            self._flush(final=True)
        self._join()
        if self.save.error is not None:
            raise self.save.error

    def _join(self) -> None:
        writers, self._writers = self._writers, []
        for _ in writers:
            self._todo.put(None)
        for w in writers:
            w.wait()

    def close(self) -> None:
        """Writers stopped, gather buffers back to the process's pool (after any failure too)."""
        self._join()
        self._held.close()
