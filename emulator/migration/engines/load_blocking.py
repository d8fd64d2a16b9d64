"""The blocking load: QEMU's ``loadvm``.

Stop the guest, check the request and the VM state (the stream's framing and every device's
payload, decoded), revert every disk, reset, load the devices and every RAM page, resume
(migration/savevm.c ``load_snapshot()``).  RAM pages are read around the page cache
(O_DIRECT where the file allows; see docs/deviations.md).  A load that fails leaves the guest stopped, as
QEMU's does; one that fails a check leaves it otherwise untouched.
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np

from emulator.memory import HUGE, GuestRAM
from emulator.migration import group
from emulator.migration.engine import (
    FIRST_ENTRY_WAIT_S,
    LoadEngine,
    LoadRequest,
    LoadSteps,
    SnapshotMetrics,
)
from emulator.migration.vmstate import PAGE, WARM_PAGES, RamLayout, read_grouped
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
        if req.stop_first:  # where to go back to, read under the stop's hold (no verb slips in)
            orig = RunState.RUNNING if ctx.vm.vm_stop(RunState.RESTORE_VM) else ctx.vm.state
        # The downtime starts once the guest is stopped, as the STOP event (vm_stop returns
        # after the vCPU left the guest; the warm-up and that wait are the total's only)
        t_stop = time.perf_counter()
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
        t_resume = time.perf_counter()
        m = SnapshotMetrics(f"{self.name}-load", t_resume - t_stop, t_resume - t0)
        m.extra.update({"load_s": t1 - t_stop, "faults": 0, "resident_s": 0.0,  # all of RAM is in at RESUME
                        "bytes_read": int(layout.nonzero.sum()) * PAGE,
                        "first_instruction_ns": ctx.vm.first_entry_ns(FIRST_ENTRY_WAIT_S if orig == RunState.RUNNING else 0)})
        ctx.saved(m)
        return m
        yield  # a generator that never yields: the whole load runs before the job's first step ends

    def load_ram(self, stream: VMStateStream, layout: RamLayout) -> None:
        """ram_load(): every non-zero page read into place, around the page cache, with the
        runs grouped into reads of up to BOUNCE bytes (``vmstate.read_grouped``: a blocking
        save writes the non-zero pages in order, so scattered pages of RAM lie side by side in
        its stream; GAP bytes between two runs are read through)."""
        ctx = self.ctx
        ctx.check_ram_size(layout)
        # Zero runs: MADV_DONTNEED is cheapest, but once a background engine was used RAM
        # stays populated (write protection holds only on present pages, and a missing page
        # would make a copy-on-write save's arm slow): then their whole 2 MiB chunks are mapped
        # to the shared zero page (GuestRAM.zero_range: no memory, and the next save's zero-page
        # scan reads from cache) and only their ragged ends are cleared with memset.
        populated = ctx.wp is not None
        if not populated:
            ctx.ram.discard()
        nz = layout.nonzero
        edges = np.flatnonzero(np.diff(np.concatenate(([False], nz, [False])).astype(np.int8)))
        starts, ends = edges[0::2], edges[1::2]
        if populated:  # the zero runs between the non-zero ones, cleared
            z0 = np.concatenate(([0], ends)).tolist()
            z1 = np.concatenate((starts, [layout.pages])).tolist()
            for a, b in zip(z0, z1, strict=True):
                if b > a:
                    clear_zero_run(ctx.ram, a * PAGE, b * PAGE)
        offs = layout.page_offset[starts].astype(np.int64)  # computed once: O(pages), not per run
        lens = (ends - starts).astype(np.int64) * PAGE
        with WARM_PAGES.take(BOUNCE // PAGE) as bounce:
            read_grouped(stream.readinto, ctx.ram.load_view(), ctx.ram.addr, starts.astype(np.int64) * PAGE,
                         offs, lens, bounce, GAP)


def clear_zero_run(ram: GuestRAM, lo: int, hi: int) -> None:
    """RAM [lo, hi) reads as zeros: whole 2 MiB chunks mapped to the zero page, the ends memset."""
    a, b = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
    if b - a < HUGE:
        ram.fill(lo, 0, hi - lo)
        return
    if a > lo:
        ram.fill(lo, 0, a - lo)
    ram.zero_range(a, b - a)
    if hi > b:
        ram.fill(b, 0, hi - b)
