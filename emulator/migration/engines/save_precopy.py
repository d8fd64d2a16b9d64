"""The pre-copy save: dirty-logging rounds while the guest runs, then a short stop.

RAM is written in rounds while the guest runs (each round rewrites what the last one saw
dirtied, precopy.py); when a round is small enough, or after the last round, the guest is
stopped for the remaining dirty pages, the device sections and the snapshot table entries.
QEMU's live migration (migration/ram.c ``ram_save_iterate``) applied to an internal snapshot.
"""

from __future__ import annotations

import contextlib
import time
from typing import ClassVar

from emulator.errors import SnaplabError
from emulator.migration.engine import SaveEngine, SaveRequest, SnapshotMetrics, short_downtime
from emulator.migration.precopy import MAX_ROUNDS, THRESHOLD, Precopy
from emulator.migration.savefail import (
    flush_or_undo,
    give_back_vmstate,
    writing_vmstate,
)
from emulator.migration.vmstate import begin_sparse_stream, finish_sparse_stream
from emulator.migration.vmstate_io import VMStateStream


class PrecopySave(SaveEngine):
    name: ClassVar[str] = "precopy"
    title: ClassVar[str] = "pre-copy (dirty logging)"
    guest_runs: ClassVar[bool] = True

    def save(self, req: SaveRequest) -> SnapshotMetrics:
        ctx = self.ctx
        t0 = time.perf_counter()
        target = ctx.save_checks(req)
        # Every page present before the rounds, mapped by reading: never-written RAM stays the
        # shared zero page, as for copy-on-write (a write-populate here left 4 GiB of real
        # zeroed pages for the next blocking save to scan); ~0.2 ms at 4 GiB once present
        ctx.ram.populate(write=False)
        if ctx.wp is not None:
            ctx.wp.unregister()  # a range belongs to one userfaultfd at a time (it is not ours now)
        stream = VMStateStream(target.vmstate_image, direct=True)  # around the page cache (deviation 57)
        with writing_vmstate():
            try:
                pre = Precopy(ctx.ram, stream, ctx.machine_name, ctx.capture(), target.vmstate_image)
            except BaseException:
                give_back_vmstate(target.vmstate_image)
                raise
        try:
            with writing_vmstate():
                pre.iterate()
            images = target.images
            with contextlib.ExitStack() as stack, short_downtime(ctx.vm):
                t_stop = ctx.stop_for_save(images, stack)
                try:
                    at = ctx.save_instant(req.name)
                    with writing_vmstate():
                        pre.final()
                        head = begin_sparse_stream(stream, ctx.machine_name, ctx.capture(), ctx.ram.size,
                                                   min_data_offset=pre.sparse.data_offset)
                        if head.data_offset != pre.sparse.data_offset:
                            raise SnaplabError("device state outgrew the room reserved for it in the VM state")
                        # The device sections may have changed length since the rounds began:
                        # the bitmap and the RAM section's records go where this header puts them.
                        size = finish_sparse_stream(stream, head, pre.nonzero)
                    ctx.commit(target, at, size)
                finally:
                    t_resume = ctx.resume()
            flush_or_undo(target.nodes, at.name)
        except BaseException:
            give_back_vmstate(target.vmstate_image)  # (nothing left there once committed)
            raise
        finally:
            pre.close()
            # huge pages rebuilt where RAM holds data (dirty tracking split them); a chunk all
            # zero keeps its zero-page mappings (a collapse would make it real memory)
            ctx.ram.collapse_chunks(pre.nonzero_chunks())
        st = pre.stats
        written = int(pre.nonzero.sum())
        m = SnapshotMetrics(self.name, t_resume - t_stop, time.perf_counter() - t0, size, written,
                            ctx.ram_pages() - written)
        m.extra.update({"iterations": len(st.rounds), "bytes_per_round": st.rounds,
                        "written_per_round": st.written,
                        "bytes_written": sum(st.written), "dirty_final_bytes": st.dirty_final,
                        "round_s": st.round_s, "writes_per_round": st.writes, "scan_s": st.scan_s, "max_rounds": MAX_ROUNDS,
                        "threshold_bytes": THRESHOLD})
        return ctx.saved(m, target, at.name)
