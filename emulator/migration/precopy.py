"""The dirty-logging pre-copy engine (Proxmox savevm-async style): the state is the end instant.

With the guest running, RAM is written to the snapshot's VM-state area and dirty tracking
(WP_ASYNC + PAGEMAP_SCAN, no faults reach user space) tells which pages changed meanwhile;
those are written again, round after round, until the dirty set is small.  Then the guest
stops, the last dirty pages, the CPU and devices are written and the snapshot is created at
that instant (the disks too), and the guest resumes.  Downtime is the last round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from emulator.block.qcow2 import Qcow2Image
from emulator.memory import HUGE, GuestRAM
from emulator.migration.vmstate import (
    PAGE,
    SaveHandler,
    SparseRam,
    StreamWriter,
    begin_sparse_stream,
    pages_nonzero,
)
from emulator.uffd import DirtyScanner
from emulator.workers import prestart, spawn

HEADER_ROOM = 1 << 20  # the device sections are rewritten at the end; they must fit
MAX_ROUNDS = 10  # rounds after the first full copy, at most
THRESHOLD = 8 << 20  # a dirty set this small is left for the stop
GAP_PAGES = 16  # clean pages written through between two dirty ones (one write instead of two)
# pwrites in flight at once for a round's runs: a disk serves several small writes faster than
# one at a time (notebook 8's 100 MiB/s guest on this VM, ~250 runs in the stop's round: 31-38 ms
# one at a time, 12-22 ms four at a time; the downtime 37-44 ms -> 17-27 ms)
WRITE_THREADS = 4


@dataclass
class PrecopyStats:
    rounds: list[int] = field(default_factory=list)  # dirty bytes each round saved (round 0: all of RAM)
    written: list[int] = field(default_factory=list)  # bytes each round wrote (clean gaps written through)
    round_s: list[float] = field(default_factory=list)  # how long each round's writing took
    writes: list[int] = field(default_factory=list)  # the separate writes each round made (one per run of pages)
    dirty_final: int = 0
    scan_s: list[float] = field(default_factory=list)


def _write_runs(write: Callable[[int, memoryview], None], mv: memoryview, runs: list[tuple[int, int, int]],
                parallel: bool = True) -> None:
    """Each run of pages [first, end) of RAM at its host offset, up to :data:`WRITE_THREADS`
    writes in flight where ``parallel`` (the file takes writes from several threads at once;
    runs dealt out in turn, so neighbours go to different threads; the first written here
    before any thread starts, so a file opens its direct descriptor once).  The first failure
    is raised once every thread has stopped; the others stop at their next run."""
    if not runs:
        return
    a, b, h = runs[0]
    write(h, mv[a * PAGE:b * PAGE])
    rest = runs[1:]
    threads = min(WRITE_THREADS, len(rest) // 4 + 1) if parallel else 1  # (a handful of runs: not worth a thread)
    failed: list[BaseException] = []

    def part(k: int) -> None:
        try:
            for a, b, h in rest[k::threads]:
                if failed:
                    return
                write(h, mv[a * PAGE:b * PAGE])
        except BaseException as err:  # raised below, on the round's thread
            failed.append(err)

    done: list[threading.Event] = []
    try:
        for k in range(1, threads):
            done.append(spawn(part, k))
    except BaseException as err:  # (no thread to start): the ones started stop, then this raises
        failed.append(err)
    if not failed:
        part(0)
    for d in done:
        d.wait()  # never return, or raise, with a write of this round still going
    if failed:
        raise failed[0]


class Precopy:
    def __init__(self, ram: GuestRAM, out: StreamWriter, machine: str, ram_sections: list[tuple[SaveHandler, bytes]],
                 img: Qcow2Image | None = None) -> None:
        self.ram = ram
        self.out = out
        self.img = img
        self.host: np.ndarray | None = None  # host offset per cluster of the VM-state area, after round 0
        self.machine = machine
        self.nonzero = np.zeros(ram.size // PAGE, dtype=bool)
        room = HEADER_ROOM + -(-(ram.size // PAGE // 8) // PAGE) * PAGE
        self.sparse: SparseRam = begin_sparse_stream(out, machine, ram_sections, ram.size, min_data_offset=room)
        self.stats = PrecopyStats()
        self._pending = np.zeros((0, 2), dtype=np.int64)  # a small last dirty set, left for the stop
        self._writes = 0  # the current round's write calls
        self.scanner = DirtyScanner(ram.addr, ram.span)

    def nonzero_chunks(self) -> np.ndarray:
        """One bool per 2 MiB of RAM: whether any of its pages was saved as non-zero."""
        per = HUGE // PAGE
        nz = self.nonzero
        padded = np.concatenate((nz, np.zeros(-len(nz) % per, dtype=bool)))
        return np.asarray(padded.reshape(-1, per).any(axis=1))

    def _write_all(self) -> int:
        """Round 0: every page, zero or not, so the whole area is allocated; then map it."""
        view = np.frombuffer(self.ram.view(), dtype=np.uint8)
        mv = self.ram.view()
        step = 32 << 20
        for a in range(0, self.ram.size, step):
            b = min(a + step, self.ram.size)
            pages = view[a:b].view(np.uint64).reshape(-1, PAGE // 8)
            pages_nonzero(pages, out=self.nonzero[a // PAGE:b // PAGE])
            self.out.write(self.sparse.data_offset + a, mv[a:b])
            self._writes += 1
        if self.img is not None:
            m = self.img.vmstate_host_map(self.sparse.end)
            if (m > 0).all() and self._pages_contiguous(m):
                self.host = m
        return self.ram.size

    def _pages_contiguous(self, host: np.ndarray) -> bool:
        """Whether every RAM page lies in one run of host-contiguous clusters, as the direct
        path's writes assume: with clusters smaller than a page (or pages not aligned on
        clusters), a page can straddle two clusters the file put apart (data is allocated
        first fit over the file's holes)."""
        assert self.img is not None
        cs = self.img.cluster_size
        if len(host) < 2:
            return True
        starts = (np.flatnonzero(host[1:] != host[:-1] + cs) + 1) * cs  # stream offsets starting a new run
        past = starts - self.sparse.data_offset
        past = past[past > 0]  # a break inside the header, before the first page, splits no page
        return not (past % PAGE).any()

    def _dirty_pages(self, ranges: np.ndarray) -> np.ndarray:
        """The sorted page indices the (offset, length) rows cover, within RAM (numpy, no loop)."""
        if not len(ranges):
            return np.zeros(0, dtype=np.int64)
        first = ranges[:, 0] // PAGE
        count = -(-ranges[:, 1] // PAGE)
        keep = (count > 0) & (first < self.ram.size // PAGE)
        first, count = first[keep], count[keep]
        if not len(first):
            return np.zeros(0, dtype=np.int64)
        starts = np.repeat(first - np.concatenate(([0], np.cumsum(count)[:-1])), count)
        pages = starts + np.arange(int(count.sum()), dtype=np.int64)
        return np.unique(pages[pages < self.ram.size // PAGE])

    def _write_direct(self, ranges: np.ndarray) -> int:
        """Later rounds: plain pwrites at known host offsets (no allocation, no image lock).
        Dirty pages are grouped into runs in numpy; up to GAP_PAGES clean pages between two
        dirty ones are written through (their bytes are unchanged since the last round), so a
        round is a few large writes rather than one per page."""
        assert self.img is not None and self.host is not None
        pages = self._dirty_pages(ranges)
        if not len(pages):
            return 0
        cs = self.img.cluster_size
        whole = np.frombuffer(self.ram.view(), dtype=np.uint64)[: self.ram.size // 8].reshape(-1, PAGE // 8)
        self.nonzero[pages] = pages_nonzero(whole[pages])
        spos = self.sparse.data_offset + pages * PAGE
        cl = spos // cs
        host = self.host[cl] + spos % cs
        # clusters that do not follow the previous one in the file break a run
        breaks = np.concatenate(([0], np.cumsum(self.host[1:] != self.host[:-1] + cs)))
        cut = (np.diff(pages) > GAP_PAGES + 1) | (breaks[cl[1:]] != breaks[cl[:-1]])
        at = np.flatnonzero(cut) + 1
        run_first = pages[np.concatenate(([0], at))]
        run_end = pages[np.concatenate((at - 1, [len(pages) - 1]))] + 1
        run_host = host[np.concatenate(([0], at))]
        write = getattr(self.img.file, "pwrite_direct", self.img.file.pwrite)  # around the page cache (deviation 57)
        runs = list(zip(run_first.tolist(), run_end.tolist(), run_host.tolist(), strict=True))
        _write_runs(write, self.ram.view(), runs, parallel=getattr(self.img.file, "concurrent_writes", False))
        self._writes += len(runs)
        return int((run_end - run_first).sum()) * PAGE

    def _write_ranges(self, ranges: np.ndarray) -> int:
        """Write pages of RAM (offset, length ranges), zero pages as flags only; returns bytes."""
        if self.host is not None:
            return self._write_direct(ranges)
        total = 0
        view = np.frombuffer(self.ram.view(), dtype=np.uint8)
        mv = self.ram.view()
        step = 32 << 20
        for off, length in ranges.tolist():
            end = min(off + length, self.ram.size)
            for a in range(off, end, step):
                b = min(a + step, end)
                pages = view[a:b].view(np.uint64).reshape(-1, PAGE // 8)
                nz = pages_nonzero(pages)
                first = a // PAGE
                self.nonzero[first:first + len(nz)] = nz
                idx = np.flatnonzero(nz)
                if not len(idx):
                    continue
                brk = np.flatnonzero(np.diff(idx) != 1) + 1
                for s0, s1 in zip(np.concatenate(([0], brk)).tolist(), np.concatenate((brk, [len(idx)])).tolist(),
                                  strict=True):
                    p0 = a + int(idx[s0]) * PAGE
                    p1 = a + (int(idx[s1 - 1]) + 1) * PAGE
                    self.out.write(self.sparse.data_offset + p0, mv[p0:p1])
                    total += p1 - p0
                    self._writes += 1
        return total

    def iterate(self, max_rounds: int = MAX_ROUNDS, threshold: int = THRESHOLD) -> None:
        """Arm tracking, copy everything, then copy what was dirtied until it is small."""
        prestart(WRITE_THREADS - 1)  # the rounds' writers, and the stop's: never a thread started inside it
        self.scanner.arm()
        self._round(self.ram.size, None, time.perf_counter())
        for _ in range(max_rounds):
            t0 = time.perf_counter()
            dirty = self.scanner.scan()
            t1 = time.perf_counter()
            self.stats.scan_s.append(t1 - t0)
            size = int(dirty[:, 1].sum())
            if size <= threshold:
                self._pending = dirty
                return
            self._round(size, dirty, t1)
        self._pending = np.zeros((0, 2), dtype=np.int64)

    def final(self) -> None:
        """With the guest stopped: the last dirty pages."""
        dirty = np.concatenate((self.scanner.scan(), self._pending))
        self.stats.dirty_final = int(dirty[:, 1].sum())
        self._round(self.stats.dirty_final, dirty, time.perf_counter())

    def _round(self, dirty: int, ranges: np.ndarray | None, t0: float) -> None:
        """One round: ``ranges`` written (None: round 0, all of RAM), and its dirty bytes, the
        bytes and write calls it made, and its time since ``t0`` recorded."""
        self._writes = 0
        self.stats.written.append(self._write_all() if ranges is None else self._write_ranges(ranges))
        self.stats.rounds.append(dirty)
        self.stats.round_s.append(time.perf_counter() - t0)
        self.stats.writes.append(self._writes)

    def close(self) -> None:
        self.scanner.close()
