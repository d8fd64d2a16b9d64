"""The blocking save: QEMU's ``savevm``.

Stop the guest, write the device sections and every non-zero RAM page to the VM-state area,
add a snapshot table entry on every node, resume; the disks are flushed after the resume.
The RAM pages are written around the page cache (O_DIRECT where the file allows; see
docs/deviations.md), as the copy-on-write save writes its chunks.
The guest is stopped for the whole save (migration/savevm.c ``save_snapshot()``).  A save that
fails (a full or failing disk) gives back the VM state it wrote and resumes the guest.
Where QEMU tests every page for zeros (``save_zero_page()``), this save reads only what the
guest may have written: it read-maps RAM before the stop (a page never written then maps the
kernel's shared zero page) and, stopped, asks the page tables which 2 MiB chunks still map
only that page (``PAGEMAP_SCAN``); those are zero without a read (docs/deviations.md 57).
"""

from __future__ import annotations

import contextlib
import time
from typing import ClassVar

import numpy as np

from emulator.memory import HUGE, GuestRAM
from emulator.migration.engine import SaveEngine, SaveRequest, SnapshotMetrics
from emulator.migration.savefail import (
    flush_or_undo,
    give_back_vmstate,
    writing_vmstate,
)
from emulator.migration.vmstate import (
    GATHER_PAGES,
    PAGE,
    SAVE_WRITERS,
    WARM_PAGES,
    nonzero_pages,
    save_state,
    scan_threads,
)
from emulator.migration.vmstate_io import VMStateStream
from emulator.uffd import zero_mapped_units_or_none


class BlockingSave(SaveEngine):
    name: ClassVar[str] = "blocking"
    title: ClassVar[str] = "blocking (QEMU's savevm)"
    guest_runs: ClassVar[bool] = False

    @staticmethod
    def never_written_scan_s(size: int, reps: int = 1) -> float:
        """The seconds this save's zero-page scan takes over ``size`` bytes of RAM never written
        (read-mapped: the kernel's shared zero page, read from cache), in its scan threads (up
        to four), the fastest of ``reps`` scans of one such mapping: what the page-table walk
        spares it where QEMU tests every page (the lab times it; the lab may not reach the
        scanner itself)."""
        ram = GuestRAM(size)
        try:
            ram.populate(write=False)
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                nz = nonzero_pages(ram.array, scan_threads())
                best = min(best, time.perf_counter() - t0)
                assert not nz.any()
            return best
        finally:
            ram.close()

    def save(self, req: SaveRequest) -> SnapshotMetrics:
        ctx = self.ctx
        t0 = time.perf_counter()
        target = ctx.save_checks(req)
        images = target.images
        stack = contextlib.ExitStack()
        try:
            WARM_PAGES.warm(GATHER_PAGES, SAVE_WRITERS + 1)  # gather buffers touched before the stop, not in it
            # RAM never written read-mapped (the shared zero page, as QEMU's background snapshot
            # populates it), before the stop: ~0.1 ms per GiB when it already is
            ctx.ram.make_present(0, ctx.ram.size)
            t_stop = ctx.stop_for_save(images, stack)
            at = ctx.save_instant(req.name)
            t_map = time.perf_counter()
            known_zero = zero_mapped_units_or_none(ctx.ram.addr, ctx.ram.size, HUGE)  # (None: every page read)
            zero_chunks = int(np.count_nonzero(known_zero)) if known_zero is not None else 0
            t_write = time.perf_counter()
            try:
                with writing_vmstate():  # the guest is stopped: the zero-page scan takes up to four CPUs
                    st = save_state(VMStateStream(target.vmstate_image, direct=True), ctx.machine_name, ctx.handlers(),
                                    ctx.ram.array, align=max(PAGE, target.vmstate_image.cluster_size),
                                    threads=scan_threads(), known_zero=known_zero,
                                    known_zero_unit=HUGE // PAGE)
                t_commit = time.perf_counter()
                ctx.commit(target, at, st.size)
            except BaseException:
                give_back_vmstate(target.vmstate_image)  # then the guest resumes, as QEMU's the_end
                raise
        finally:
            t_resume = ctx.resume()  # where the stop found it (nothing if it never stopped)
            stack.close()
        t_flush = time.perf_counter()
        flush_or_undo(target.nodes, at.name)
        m = SnapshotMetrics(self.name, t_resume - t_stop, time.perf_counter() - t0, st.size, st.nonzero,
                            ctx.ram_pages() - st.nonzero)
        m.extra.update({"prepare_s": t_stop - t0,  # before the stop: the checks, and the gather buffers warmed (once a process)
                        "flush_s": time.perf_counter() - t_flush, "zero_scan_s": st.scan_s, "zero_chunks": zero_chunks,
                        "scanned_bytes": st.scanned_pages * PAGE,
                        "zero_map_s": t_write - t_map,
                        "write_s": t_commit - t_write - st.scan_s, "commit_s": t_resume - t_commit})
        return ctx.saved(m, target, at.name)
