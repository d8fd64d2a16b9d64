"""The blocking load: QEMU's ``loadvm``.

Stop the guest, check the request and the VM state (the stream's framing and every device's
payload, decoded), revert every disk, reset, load the devices and every RAM page, resume
(migration/savevm.c ``load_snapshot()``).  RAM pages are read around the page cache
(O_DIRECT where the file allows; see docs/deviations.md).  A load that fails leaves the guest stopped, as
QEMU's does; one that fails a check leaves it otherwise untouched.
"""

from __future__ import annotations

import ctypes
import time
from typing import ClassVar

import numpy as np

from emulator.migration import group
from emulator.migration.engine import LoadEngine, LoadRequest, LoadSteps, SnapshotMetrics
from emulator.migration.vmstate import PAGE, WARM_PAGES, RamLayout
from emulator.migration.vmstate_io import VMStateStream
from emulator.runstate import RunState

BOUNCE = 8 << 20  # the most one grouped read of the VM state brings in
GAP = 256 << 10  # bytes between two runs in the stream that a grouped read reads through


class BlockingLoad(LoadEngine):
    name: ClassVar[str] = "blocking"
    title: ClassVar[str] = "blocking (QEMU's loadvm)"

    def load_steps(self, req: LoadRequest, orig: RunState) -> LoadSteps:
        ctx = self.ctx
        t0 = time.perf_counter()
        WARM_PAGES.warm(BOUNCE // PAGE)  # the bounce buffer touched before the stop, not in it
        if req.stop_first:
            ctx.vm.vm_stop(RunState.RESTORE_VM)
        src = ctx.load_checks(req)
        layout = ctx.check_ram_size(src.parsed.layout)
        # Every device payload decoded before the disks are reverted: a damaged VM state fails
        # here and leaves the guest as the stop left it (QEMU reverts the disks first).
        apply_devices = ctx.facts.prepared_state(src.img, src.sn, src.parsed)
        group.goto_all(req.name, src.nodes)
        ctx.vm.reset_for_load()
        apply_devices()
        self.load_ram(VMStateStream(src.img, src.sn.id_str, direct=True), layout)
        ctx.vm.set_vclock_ns(src.sn.vm_clock_nsec)
        t1 = time.perf_counter()
        ctx.vm.vm_resume(orig)
        m = SnapshotMetrics(f"{self.name}-load", time.perf_counter() - t0, time.perf_counter() - t0)
        m.extra.update({"load_s": t1 - t0, "faults": 0, "resident_s": 0.0,  # all of RAM is in at RESUME
                        "bytes_read": int(layout.nonzero.sum()) * PAGE})
        ctx.saved(m)
        return m
        yield  # a generator that never yields: the whole load runs before the job's first step ends

    def load_ram(self, stream: VMStateStream, layout: RamLayout) -> None:
        """ram_load(): every non-zero page read into place.  Runs of pages that follow each
        other in the stream, or nearly (GAP), are read together, up to BOUNCE bytes, with one
        read into a warm bounce buffer and copied into place (a blocking save writes the
        non-zero pages in order, so scattered pages of RAM lie side by side in its stream); a
        run of BOUNCE or more is read straight into RAM.  The reads go around the page cache, so one large read costs what
        the disk needs and many small ones would each pay a request."""
        ctx = self.ctx
        ctx.check_ram_size(layout)
        # Zero runs: MADV_DONTNEED is cheapest, but once a background engine was used RAM
        # stays populated (write protection holds only on present pages, and a missing page
        # would make a copy-on-write save's arm slow), so then they are cleared with memset.
        populated = ctx.wp is not None
        if not populated:
            ctx.ram.discard()
        nz = layout.nonzero
        edges = np.flatnonzero(np.diff(np.concatenate(([False], nz, [False])).astype(np.int8)))
        starts, ends = edges[0::2], edges[1::2]
        offs = layout.page_offset[starts].astype(np.int64)  # computed once: O(pages), not per run
        lens = (ends - starts).astype(np.int64) * PAGE
        # A new group where a run does not follow the previous one in the stream within GAP
        # bytes (a copy-on-write save's stream is indexed by page: zero pages lie between).
        gap = np.zeros(len(starts), dtype=np.int64)
        gap[1:] = offs[1:] - (offs[:-1] + lens[:-1])
        follows = (gap >= 0) & (gap <= GAP)
        with WARM_PAGES.take(BOUNCE // PAGE) as pages:
            self._read_runs(stream, starts, ends, offs, lens, follows, pages.reshape(-1), populated)
        if len(starts) and int(ends[-1]) < layout.pages and populated:
            ctx.ram.fill(int(ends[-1]) * PAGE, 0, (layout.pages - int(ends[-1])) * PAGE)
        elif not len(starts) and populated:
            ctx.ram.fill(0, 0, layout.pages * PAGE)

    def _read_runs(self, stream: VMStateStream, starts: np.ndarray, ends: np.ndarray, offs: np.ndarray,
                   lens: np.ndarray, follows: np.ndarray, bounce: np.ndarray, populated: bool) -> None:
        """load_ram's reads: one per group of runs (see there), zero gaps cleared if populated."""
        ctx = self.ctx
        view = ctx.ram.load_view()
        pos, i, n = 0, 0, len(starts)
        s_l, e_l, o_l, n_l, f_l = starts.tolist(), ends.tolist(), offs.tolist(), lens.tolist(), follows.tolist()
        while i < n:
            j, end = i + 1, o_l[i] + n_l[i]
            while j < n and f_l[j] and o_l[j] + n_l[j] - o_l[i] <= BOUNCE:
                end = o_l[j] + n_l[j]
                j += 1
            if j - i == 1:
                if s_l[i] > pos and populated:
                    ctx.ram.fill(pos * PAGE, 0, (s_l[i] - pos) * PAGE)
                stream.readinto(o_l[i], view[s_l[i] * PAGE:e_l[i] * PAGE])
                pos = e_l[i]
                i = j
                continue
            stream.readinto(o_l[i], memoryview(bounce.data)[:end - o_l[i]])
            base = bounce.ctypes.data - o_l[i]
            for k in range(i, j):
                if s_l[k] > pos and populated:
                    ctx.ram.fill(pos * PAGE, 0, (s_l[k] - pos) * PAGE)
                ctypes.memmove(ctx.ram.addr + s_l[k] * PAGE, base + o_l[k], n_l[k])  # releases the GIL
                pos = e_l[k]
            i = j
