"""The blocking save: QEMU's ``savevm``.

Stop the guest, write the device sections and every non-zero RAM page to the VM-state area,
add a snapshot table entry on every node, resume; the disks are flushed after the resume.
The RAM pages are written around the page cache (O_DIRECT where the file allows; see
docs/deviations.md), as the copy-on-write save writes its chunks.
The guest is stopped for the whole save (migration/savevm.c ``save_snapshot()``).  A save that
fails (a full or failing disk) gives back the VM state it wrote and resumes the guest.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import ClassVar

import numpy as np

from emulator.memory import GuestRAM
from emulator.migration.cow import CHUNK
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
from emulator.uffd import zero_mapped_units

log = logging.getLogger(__name__)


def zero_mapped_pages(ram: GuestRAM) -> tuple[np.ndarray | None, int]:
    """With the guest stopped: one bool per page of RAM, True in every 2 MiB chunk whose pages
    are all mapped to the shared zero page (never written since RAM was read-mapped), so known
    to hold zeros without a read; and how many chunks that is.  A page-table walk (PAGEMAP_SCAN,
    under a millisecond at 4 GiB) where QEMU reads every page (``buffer_is_zero()``); (None, 0)
    where the kernel has no PAGEMAP_SCAN: every page is read."""
    try:
        zero = zero_mapped_units(ram.addr, ram.size, CHUNK)
    except OSError as err:
        log.debug("zero-page chunks not known (%s): every page is read", err)
        return None, 0
    return np.repeat(zero, CHUNK // PAGE)[:ram.size // PAGE], int(np.count_nonzero(zero))


class BlockingSave(SaveEngine):
    name: ClassVar[str] = "blocking"
    title: ClassVar[str] = "blocking (QEMU's savevm)"
    guest_runs: ClassVar[bool] = False

    @staticmethod
    def never_written_scan_s(size: int) -> float:
        """The seconds this save's zero-page scan takes over ``size`` bytes of RAM never written
        (read-mapped: the kernel's shared zero page, read from cache), in every CPU: what the
        page-table walk spares it, and what QEMU, which tests every page, pays."""
        ram = GuestRAM(size)
        try:
            ram.populate(write=False)
            t0 = time.perf_counter()
            nz = nonzero_pages(ram.array, scan_threads())
            spent = time.perf_counter() - t0
            assert not nz.any()
            return spent
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
            known_zero, zero_chunks = zero_mapped_pages(ctx.ram)
            t_write = time.perf_counter()
            try:
                with writing_vmstate():  # the guest is stopped: the zero-page scan takes every CPU
                    st = save_state(VMStateStream(target.vmstate_image, direct=True), ctx.machine_name, ctx.handlers(),
                                    ctx.ram.array, align=max(PAGE, target.vmstate_image.cluster_size),
                                    threads=scan_threads(), known_zero=known_zero)
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
        m.extra.update({"flush_s": time.perf_counter() - t_flush, "zero_scan_s": st.scan_s, "zero_chunks": zero_chunks,
                        "zero_map_s": t_write - t_map,
                        "write_s": t_commit - t_write - st.scan_s, "commit_s": t_resume - t_commit})
        return ctx.saved(m, target, at.name)
