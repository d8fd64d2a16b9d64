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

from emulator.migration import group
from emulator.migration.engine import LoadEngine, LoadRequest, LoadSteps, SnapshotMetrics
from emulator.migration.vmstate import PAGE, RamLayout
from emulator.migration.vmstate_io import VMStateStream
from emulator.runstate import RunState


class BlockingLoad(LoadEngine):
    name: ClassVar[str] = "blocking"
    title: ClassVar[str] = "blocking (QEMU's loadvm)"

    def load_steps(self, req: LoadRequest, orig: RunState) -> LoadSteps:
        ctx = self.ctx
        t0 = time.perf_counter()
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
        """ram_load(): every non-zero page read into place with one read per run of pages."""
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
        pos = 0
        view = ctx.ram.load_view()
        offsets = layout.page_offset[starts].tolist()  # computed once: O(pages), not per run
        for a, b, off in zip(starts.tolist(), ends.tolist(), offsets, strict=True):
            if a > pos and populated:
                ctx.ram.fill(pos * PAGE, 0, (a - pos) * PAGE)
            stream.readinto(int(off), view[a * PAGE:b * PAGE])
            pos = b
        if pos < layout.pages and populated:
            ctx.ram.fill(pos * PAGE, 0, (layout.pages - pos) * PAGE)
