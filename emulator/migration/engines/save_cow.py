"""The copy-on-write save: the guest runs while its RAM is saved (the seed thread's ask).

Inside the stop: the instant, the CPU context (one copy), the device sections, the disks
drained, RAM write-protected; nothing else.  The disks are frozen (pending snapshots) right
after the guest resumed, while still drained, so no guest request lands between the stop and
the freeze; then cow.py's threads save RAM as it was at the stop while the guest writes.
QEMU 7.2 has the same idea only for ``migrate`` with ``background-snapshot``
(migration/ram.c ``ram_write_tracking_start``), which :func:`arm_in_window` serves too.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from emulator.block.qcow2 import Qcow2Image
from emulator.block.snapshot import PendingSnapshot
from emulator.migration.cow import CHUNK, CowSave
from emulator.migration.engine import (
    EngineContext,
    Instant,
    SaveEngine,
    SaveRequest,
    SnapshotMetrics,
    short_downtime,
    switch_interval,
)
from emulator.migration.savefail import flush_or_undo, writing_vmstate
from emulator.migration.vmstate import SaveHandler, capture_sections, encode_sections
from emulator.runstate import RunState


@dataclass(frozen=True)
class Window:
    """What the copy-on-write stop took: the instant, the device sections, when it began and ended."""

    at: Instant
    sections: list[tuple[SaveHandler, bytes]]
    t_stop: float
    t_resume: float


def arm_in_window(ctx: EngineContext, saver: CowSave, stop_state: RunState,
                  images: list[Qcow2Image], stack: contextlib.ExitStack, name: str | None = None) -> Window:
    """The copy-on-write stop, shared by the engine and ``migrate``'s background snapshot:
    vm_stop, the instant, the device sections captured, ``images`` drained (until ``stack``
    closes), RAM write-protected, vm_resume (to where the stop found the VM).  RAM is
    write-protected just before the stop, with the guest running (:meth:`CowSave.pre_arm`), so
    the stop protects again only the chunks the guest wrote in between.  If arming fails the
    saver is abandoned (its chunk buffers go back to the pool either way)."""
    armed = False
    try:
        saver.pre_arm()
        with short_downtime(ctx.vm):
            t_stop = ctx.stop_for_save(images, stack, stop_state)
            try:
                at = ctx.save_instant(name)
                captured = capture_sections(ctx.handlers())
                for im in images:
                    stack.enter_context(im.drained())
                saver.arm()
                armed = True
            finally:
                t_resume = ctx.resume()
    except BaseException:
        if armed or saver.pre_armed:
            saver.abandon()
        else:
            saver.give_back_buffers()
        raise
    return Window(at, encode_sections(captured), t_stop, t_resume)


class CowSaveEngine(SaveEngine):
    name: ClassVar[str] = "cow"
    title: ClassVar[str] = "copy-on-write (write protection)"
    guest_runs: ClassVar[bool] = True
    write_protects: ClassVar[bool] = True

    def save(self, req: SaveRequest) -> SnapshotMetrics:
        ctx = self.ctx
        t0 = time.perf_counter()
        target = ctx.save_checks(req)
        populate_before = ctx.ram.populate_seconds
        protector, note = ctx.protector(req.wp_backend)
        saver = CowSave(protector, ctx.ram, None, None, ctx.machine_name, [])  # allocations outside the downtime
        saver.prepare()
        pendings: dict[str, PendingSnapshot] = {}
        w: Window | None = None
        try:
            with contextlib.ExitStack() as stack:  # flushes deferred, disks drained until frozen
                w = arm_in_window(ctx, saver, RunState.SAVE_VM, target.images, stack, req.name)
                pendings = ctx.freeze(target, w.at.name)
            saver.attach(target.vmstate_image, pendings[target.bs.node_name], w.sections)
            t_frozen = time.perf_counter()
        except BaseException:
            if w is not None:
                saver.abandon()
            saver.give_back_buffers()  # (once: abandon may have)
            protector.disarm()
            ctx.abort(target, pendings)
            raise
        try:
            try:
                # A guest write to an unsaved chunk waits for the fault-service thread, which
                # needs the GIL: the saver threads hand it over within 0.1 ms, not 5 ms.
                with switch_interval(1e-4), writing_vmstate():
                    size = saver.run()
            finally:
                protector.disarm()
        except BaseException:
            ctx.abort(target, pendings)
            raise
        t_run = time.perf_counter()
        ctx.finish(target, pendings, w.at, size)
        t_flush = time.perf_counter()
        flush_or_undo(target.nodes, w.at.name)
        t_end = time.perf_counter()
        st = saver.stats
        written = int(saver.nonzero.sum())
        lat = np.array(st.handler_s) if st.handler_s else np.zeros(0)
        m = SnapshotMetrics(self.name, w.t_resume - w.t_stop, time.perf_counter() - t0, size, written,
                            ctx.ram_pages() - written)
        m.extra.update({
            "backend": protector.name, "backend_note": note,
            # the fault-service thread's scheduling (cow.latency_priority; "" for the TLB backend)
            "fault_thread": getattr(getattr(protector, "wp", None), "priority", ""),
            "arm_s": st.arm_s, "pre_arm_s": st.pre_arm_s, "rearmed_chunks": st.rearmed_chunks, "faults": st.faults, "fault_chunks": st.fault_chunks, "bg_chunks": st.bg_chunks,
            "zero_chunks": st.zero_chunks, "zero_map_s": st.zero_map_s,
            "ahead_chunks": st.ahead_chunks, "ahead_policy": st.ahead_policy,
            "woken": st.woken, "bytes_written": st.bytes_written, "peak_extra_bytes": st.peak_buffers * CHUNK,
            "fault_buffer_bytes": saver.max_buffers * CHUNK,  # held warm for the process's life
            "fault_latency_s": lat.tolist(),
            "fault_wait_s": list(st.wait_s), "fault_copy_s": list(st.copy_s),  # of each fault's time
            "fault_at_s": list(st.fault_at_s), "fault_chunk": list(st.fault_chunk),
            "sweep": [list(p) for p in st.sweep], "chunks": saver.nchunks,
            # the vCPU's first entry into the guest after RESUME, seconds after the arm (same clock)
            "first_entry_s": (first_ns / 1e9 - saver.armed_at) if (first_ns := ctx.vm.first_entry_ns(0)) else float("nan"),
            "populate_s": ctx.ram.populate_seconds if populate_before is None else 0.0,
            # where the total went: before the stop, stop to disks frozen, RAM saved, commit, flush
            "prepare_s": w.t_stop - t0, "freeze_s": t_frozen - w.t_stop, "run_s": t_run - t_frozen,
            "commit_s": t_flush - t_run, "flush_s": t_end - t_flush,
        })
        return ctx.saved(m, target, w.at.name)


