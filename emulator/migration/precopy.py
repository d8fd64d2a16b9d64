"""The dirty-logging pre-copy engine (Proxmox savevm-async style): the state is the end instant.

With the guest running, RAM is written to the snapshot's VM-state area and dirty tracking
(WP_ASYNC + PAGEMAP_SCAN, no faults reach user space) tells which pages changed meanwhile;
those are written again, round after round, until the dirty set is small.  Then the guest
stops, the last dirty pages, the CPU and devices are written and the snapshot is created at
that instant (the disks too), and the guest resumes.  Downtime is the last round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from emulator.block.qcow2 import Qcow2Image
from emulator.memory import GuestRAM
from emulator.migration.vmstate import (
    PAGE,
    SaveHandler,
    SparseRam,
    StreamWriter,
    begin_sparse_stream,
)
from emulator.uffd import DirtyScanner

HEADER_ROOM = 1 << 20  # the device sections are rewritten at the end; they must fit


@dataclass
class PrecopyStats:
    rounds: list[int] = field(default_factory=list)  # bytes written per round
    dirty_final: int = 0
    scan_s: list[float] = field(default_factory=list)


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
        self.scanner = DirtyScanner(ram.addr, ram.span)

    def _write_all(self) -> int:
        """Round 0: every page, zero or not, so the whole area is allocated; then map it."""
        view = np.frombuffer(self.ram.view(), dtype=np.uint8)
        mv = self.ram.view()
        step = 32 << 20
        for a in range(0, self.ram.size, step):
            b = min(a + step, self.ram.size)
            pages = view[a:b].view(np.uint64).reshape(-1, PAGE // 8)
            self.nonzero[a // PAGE:b // PAGE] = np.asarray(pages.any(axis=1), dtype=bool)
            self.out.write(self.sparse.data_offset + a, mv[a:b])
        if self.img is not None:
            m = self.img.vmstate_host_map(self.sparse.end)
            if (m > 0).all():
                self.host = m
        return self.ram.size

    def _write_direct(self, ranges: list[tuple[int, int]]) -> int:
        """Later rounds: plain pwrites at known host offsets (no allocation, no image lock)."""
        assert self.img is not None and self.host is not None
        cs = self.img.cluster_size
        view = np.frombuffer(self.ram.view(), dtype=np.uint8)
        mv = self.ram.view()
        total = 0
        for off, length in ranges:
            end = min(off + length, self.ram.size)
            if end <= off:
                continue
            pages = view[off:end].view(np.uint64).reshape(-1, PAGE // 8)
            self.nonzero[off // PAGE:end // PAGE] = np.asarray(pages.any(axis=1), dtype=bool)
            pos = off
            while pos < end:
                spos = self.sparse.data_offset + pos
                c = spos // cs
                n = min(end - pos, (c + 1) * cs - spos)
                # extend while the host clusters are contiguous
                while pos + n < end and self.host[(spos + n) // cs] == self.host[c] + ((spos + n) // cs - c) * cs:
                    n = min(end - pos, n + cs)
                self.img.file.pwrite(int(self.host[c]) + spos % cs, mv[pos:pos + n])
                pos += n
                total += n
        return total

    def _write_ranges(self, ranges: list[tuple[int, int]]) -> int:
        """Write pages of RAM (offset, length ranges), zero pages as flags only; returns bytes."""
        if self.host is not None:
            return self._write_direct(ranges)
        total = 0
        view = np.frombuffer(self.ram.view(), dtype=np.uint8)
        mv = self.ram.view()
        step = 32 << 20
        for off, length in ranges:
            end = min(off + length, self.ram.size)
            for a in range(off, end, step):
                b = min(a + step, end)
                pages = view[a:b].view(np.uint64).reshape(-1, PAGE // 8)
                nz = np.asarray(pages.any(axis=1), dtype=bool)
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
        return total

    def iterate(self, max_rounds: int = 10, threshold: int = 8 << 20) -> None:
        """Arm tracking, copy everything, then copy what was dirtied until it is small."""
        self.scanner.arm()
        self.stats.rounds.append(self._write_all())
        for _ in range(max_rounds):
            t0 = time.perf_counter()
            dirty = self.scanner.scan()
            self.stats.scan_s.append(time.perf_counter() - t0)
            size = sum(n for _, n in dirty)
            if size <= threshold:
                self._pending = dirty
                return
            self.stats.rounds.append(self._write_ranges(dirty))
        self._pending = []

    def final(self) -> None:
        """With the guest stopped: the last dirty pages."""
        dirty = self.scanner.scan() + getattr(self, "_pending", [])
        self.stats.dirty_final = sum(n for _, n in dirty)
        self.stats.rounds.append(self._write_ranges(dirty))

    def close(self) -> None:
        self.scanner.close()
