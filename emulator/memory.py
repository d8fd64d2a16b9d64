"""Guest RAM: one anonymous host mapping that we own, handed to Unicorn with mem_map_ptr.

The mapping is 2 MiB-aligned and advised ``MADV_HUGEPAGE`` so that transparent huge pages
back it: arming userfaultfd write protection is then O(2 MiB PMDs), not O(4 KiB pages)
(docs/reference/unicorn-notes.md, addendum).  Populating is left to the first touch unless
asked for; :meth:`GuestRAM.populate` does it in one ``MADV_POPULATE_WRITE`` and reports the
time it took.

Host code must write guest RAM only through :meth:`GuestRAM.write` / :meth:`fill`, which
use ctypes calls that release the GIL: a numpy or memoryview store into write-protected
memory made with the GIL held deadlocks against the userfaultfd handler thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import time
from collections.abc import Callable

import numpy as np

from emulator.errors import GuestMemoryError, SnaplabError

HUGE = 2 << 20
GIB = 1 << 30
PAGE = 4096
PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x02, 0x20, 0x4000
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_COLLAPSE = 25
COLLAPSE_TRIES = 5  # MADV_COLLAPSE attempts of a run of chunks while it answers EAGAIN
MIN_RAM = 16 << 20
MAX_RAM = 64 << 30

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
MAP_FIXED_NOREPLACE = 0x100000
PROT_NONE = 0
MAP_FAILED = ctypes.c_void_p(-1).value
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _map_aligned(span: int, align: int, prot: int) -> int | None:
    """An anonymous private mapping of ``span`` bytes at an ``align``-aligned address."""
    raw = _libc.mmap(None, span + align, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if raw in (None, MAP_FAILED):
        return None
    addr = (raw + align - 1) & ~(align - 1)
    if addr > raw:
        _libc.munmap(raw, addr - raw)
    if raw + span + align > addr + span:
        _libc.munmap(addr + span, raw + span + align - (addr + span))
    return int(addr)


def map_populated(span: int) -> int:
    """A private anonymous mapping of ``span`` bytes (a multiple of 2 MiB), 2 MiB-aligned,
    advised MADV_HUGEPAGE and faulted in now: host-side buffers that must never cost a first
    touch later (copy-on-write fault buffers).  Raises SnaplabError when the host refuses."""
    addr = _map_aligned(span, HUGE, PROT_READ | PROT_WRITE)
    if addr is None:
        raise SnaplabError(f"cannot map {span} bytes of host buffers: {ctypes.get_errno()}")
    _libc.madvise(addr, span, MADV_HUGEPAGE)
    if _libc.madvise(addr, span, MADV_POPULATE_WRITE) != 0:
        ctypes.memset(addr, 0, span)  # older kernels: one GIL-free memset
    return addr


def check_ram_size(size: int) -> None:
    """SnaplabError unless ``size`` is a RAM size snaplab's guest can have."""
    if size % PAGE or not MIN_RAM <= size <= MAX_RAM:
        raise SnaplabError(f"RAM size {size} must be a multiple of 4 KiB between 16 MiB and 64 GiB")


class GuestRAM:
    """Guest-physical RAM at address 0 of the guest."""

    def __init__(self, size: int, *, hugepages: bool = True) -> None:
        check_ram_size(size)
        self.size = size
        span = -(-size // HUGE) * HUGE
        # 1 GiB-aligned from 1 GiB on: a mapping move (discard_later) then carries whole
        # page-directory (PUD) entries, ~20 us per GiB instead of ~0.3 ms.
        self.align = GIB if span >= GIB else HUGE
        addr = _map_aligned(span, self.align, PROT_READ | PROT_WRITE)
        if addr is None:
            raise SnaplabError(f"cannot map {size} bytes of guest RAM: {ctypes.get_errno()}")
        self.addr: int = addr
        self.span = span
        self.hugepages = hugepages and _libc.madvise(addr, span, MADV_HUGEPAGE) == 0
        self.populate_seconds: float | None = None
        self._spare: int | None = None  # a reserved aside (reserve_aside)
        # Called before any host-side write (the software write-tracking fallback saves first).
        self.before_write: Callable[[int, int], None] | None = None
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(addr))

    def populate(self, write: bool = True) -> float:
        """Fault in every page now; returns the seconds it took.  ``write``: private pages
        (MADV_POPULATE_WRITE); else read-mapped (MADV_POPULATE_READ): a page never written
        maps the kernel's shared zero page (a huge zero page under THP), which is present, so
        userfaultfd can write-protect it, costs no memory, and reads from cache; QEMU's
        background snapshot populates the same way (migration/ram.c ram_block_populate_read)."""
        t0 = time.perf_counter()
        if _libc.madvise(self.addr, self.span, MADV_POPULATE_WRITE if write else MADV_POPULATE_READ) != 0:
            # Older kernels: touch one byte per page with a GIL-free memset (or read) per huge page.
            buf = (ctypes.c_char * 1)()
            for off in range(0, self.span, HUGE):
                if write:
                    ctypes.memset(self.addr + off, 0, 1)
                else:
                    ctypes.memmove(buf, self.addr + off, 1)
        self.populate_seconds = time.perf_counter() - t0
        return self.populate_seconds

    def make_present(self, off: int, n: int) -> None:
        """Fault in [off, off+n) for reading (MADV_POPULATE_READ, one syscall without the GIL).

        Afterwards the range may be read with the GIL held (numpy): a page that is not
        present would otherwise raise a missing-page fault that only the userfaultfd thread
        can serve, and that thread needs the GIL (a deadlock).
        """
        if _libc.madvise(self.addr + off, n, MADV_POPULATE_READ) != 0:
            buf = (ctypes.c_char * PAGE)()
            for p in range(off, off + n, PAGE):  # older kernels: one GIL-free read per page
                ctypes.memmove(buf, self.addr + p, 1)

    def huge_bytes(self) -> int:
        """AnonHugePages of this mapping, from /proc/self/smaps (0 if unknown)."""
        try:
            with open("/proc/self/smaps") as f:
                inside = False
                for line in f:
                    if "-" in line.split()[0] and not line[0].isupper():
                        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                        inside = lo <= self.addr < hi
                    elif inside and line.startswith("AnonHugePages:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def check(self, addr: int, n: int) -> None:
        if addr < 0 or n < 0 or addr + n > self.size:
            raise GuestMemoryError(f"guest access [{addr:#x}, +{n:#x}) outside RAM ({self.size:#x} bytes)")

    def contains(self, addr: int, n: int) -> bool:
        return 0 <= addr and 0 <= n and addr + n <= self.size

    def read(self, addr: int, n: int) -> bytes:
        """Copy out of guest RAM with ctypes.memmove, which releases the GIL: during a lazy
        restore a read may fault on a page not loaded yet, and the handler needs the GIL."""
        self.check(addr, n)
        buf = ctypes.create_string_buffer(n)
        ctypes.memmove(buf, self.addr + addr, n)
        return buf.raw

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy into guest RAM with ctypes.memmove (GIL released; safe under write protection)."""
        mv = memoryview(data).cast("B")
        self.check(addr, mv.nbytes)
        if mv.nbytes == 0:
            return
        if self.before_write is not None:
            self.before_write(addr, mv.nbytes)
        if mv.readonly:
            src = ctypes.c_char_p(bytes(mv))
            ctypes.memmove(self.addr + addr, src, mv.nbytes)
        else:
            ctypes.memmove(self.addr + addr, ctypes.addressof(ctypes.c_char.from_buffer(mv)), mv.nbytes)

    def fill(self, addr: int, byte: int, n: int) -> None:
        self.check(addr, n)
        if self.before_write is not None:
            self.before_write(addr, n)
        ctypes.memset(self.addr + addr, byte, n)

    def discard(self) -> None:
        """Give every page back to the kernel: RAM reads as zeros again (MADV_DONTNEED)."""
        _libc.madvise(self.addr, self.span, MADV_DONTNEED)

    def zero_range(self, off: int, n: int) -> None:
        """[off, off+n) (whole pages) reads as zeros and stays present without memory: its
        pages are given back (MADV_DONTNEED) and read-mapped again (MADV_POPULATE_READ), so
        they map the shared zero page (the huge one for whole 2 MiB chunks under THP), which
        write protection holds like any present page.  A memset would make them real pages."""
        self.check(off, n)
        if self.before_write is not None:
            self.before_write(off, n)
        if _libc.madvise(self.addr + off, n, MADV_DONTNEED) != 0:
            ctypes.memset(self.addr + off, 0, n)
            return
        self.make_present(off, n)

    def reserve_aside(self) -> int | None:
        """Address space for :meth:`discard_later` to move the populated pages to (PROT_NONE,
        nothing committed); taken before a downtime, so the downtime does not pay for it.  The
        one made when the previous aside was freed is handed out first (~0.3 ms at 4 GiB with
        cold caches, off the load's path)."""
        spare, self._spare = self._spare, None
        if spare is not None:
            return spare
        return _map_aligned(self.span, self.align, PROT_NONE)

    def release_aside(self, aside: int) -> None:
        """A reservation that was not used: kept for the next one."""
        if self.addr and self._spare is None:
            self._spare = aside
        else:
            _libc.munmap(aside, self.span)

    def _free_aside(self, aside: int) -> None:
        """Unmap the pages moved aside, and reserve the next aside right away."""
        _libc.munmap(aside, self.span)
        if self.addr and self._spare is None:
            self._spare = _map_aligned(self.span, self.align, PROT_NONE)

    def discard_later(self, aside: int | None = None) -> Callable[[], None] | None:
        """Empty RAM now, free the old pages later: the populated pages are moved aside with
        one ``mremap`` (page tables move whole: PUD entries when 1 GiB-aligned, else PMDs).
        ``MREMAP_DONTUNMAP`` (Linux 5.7) leaves RAM's mapping in place, empty, with its flags
        (huge pages advised); where the kernel refuses it, a fresh mapping is made in the hole.
        ``aside`` is a reservation from :meth:`reserve_aside` (else one is made here).  Returns
        the function that unmaps the old pages (run it in any thread, after the guest resumed),
        or None when the kernel would not do it, in which case nothing changed and the caller
        discards in place.  Call it with RAM unregistered from userfaultfd: a registration
        would stay on RAM's range with ``MREMAP_DONTUNMAP`` and be lost with a fresh mapping.
        """
        span = self.span
        if aside is None:
            aside = self.reserve_aside()
            if aside is None:
                return None
        flags = MREMAP_MAYMOVE | MREMAP_FIXED
        if _libc.mremap(self.addr, span, span, flags | MREMAP_DONTUNMAP, aside) == aside:
            return lambda: self._free_aside(aside)
        moved = _libc.mremap(self.addr, span, span, flags, aside)
        if moved != aside:
            _libc.munmap(aside, span)
            return None
        fresh = _libc.mmap(self.addr, span, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0)
        if fresh != self.addr:
            # Something else was mapped into the hole meanwhile: put the old RAM back.
            if fresh not in (None, MAP_FAILED):
                _libc.munmap(fresh, span)
            if _libc.mremap(aside, span, span, flags, self.addr) != self.addr:
                raise SnaplabError("guest RAM could not be moved back into place")
            return None
        if self.hugepages:
            _libc.madvise(self.addr, span, MADV_HUGEPAGE)
        return lambda: self._free_aside(aside)

    def load_view(self) -> memoryview:
        """A writable view for bulk loads (preadv into RAM). Only while no write protection
        or missing-page registration is armed on this mapping (the loader's own rule)."""
        return memoryview(self.array.data).cast("B")

    def _collapse_once(self, off: int, n: int) -> int:
        """One MADV_COLLAPSE of [off, off+n): rebuild transparent huge pages after pages were
        installed one by one; 0, or the errno it failed with.  A 2 MiB range of 4 KiB zero-page
        mappings becomes a real zeroed huge page: leave such ranges out."""
        if not self.hugepages:
            return errno.EOPNOTSUPP
        if _libc.madvise(self.addr + off, -(-n // HUGE) * HUGE, MADV_COLLAPSE) == 0:
            return 0
        return ctypes.get_errno()

    def collapse_chunks(self, data: np.ndarray) -> None:
        """MADV_COLLAPSE over the 2 MiB chunks where ``data`` (one bool per chunk) is True,
        one call per run of them: chunks that hold only zeros keep the shared zero page.  A run
        refused with EAGAIN (a page busy for a moment: just faulted in by the running guest, not
        yet on an LRU list, or locked) is tried again, up to :data:`COLLAPSE_TRIES` times in
        all, 1 ms apart (the chunks already collapsed are skipped then)."""
        edges = np.flatnonzero(np.diff(np.concatenate(([False], data, [False])).astype(np.int8)))
        runs = [(a * HUGE, min(b * HUGE, self.span) - a * HUGE)
                for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True)]
        for attempt in range(COLLAPSE_TRIES):
            if attempt:
                time.sleep(0.001)
            runs = [(off, n) for off, n in runs if self._collapse_once(off, n) == errno.EAGAIN]
            if not runs:
                return

    def view(self) -> memoryview:
        """A read-only view for bulk reads (saving); never write through it."""
        return memoryview(self.array.data).toreadonly()

    def close(self) -> None:
        if self.addr:
            del self.array
            _libc.munmap(self.addr, self.span)
            self.addr = 0
        spare, self._spare = self._spare, None
        if spare is not None:
            _libc.munmap(spare, self.span)
