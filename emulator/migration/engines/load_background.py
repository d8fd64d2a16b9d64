"""The background load (snaplab's lazy load): resume first, faults served first, a filler
reads the rest (postcopy.py does the filling).  The on-demand and prefetch loads subclass it
and change only what the filler does after RESUME (:meth:`BackgroundLoad.fill_plan`).

Everything that can be is done before the stop: the checks and the parse (a bad request fails
without a STOP; QEMU's blocking load stops first), the disks' revert checked, the VM-state
cluster map, the address space RAM is moved to.  Stopped, with the vCPU out of the guest
(``with_vcpu_out``: on its thread if it was running guest code, else on the job's): the guest's
block accesses held, devices loaded, RAM emptied and armed for missing-page
faults.  Resumed: the disks are drained and reverted (a guest disk request waits for it, so the
guest never sees the old disks), and the pages follow, on a worker.  QEMU has this only for
live migration (``postcopy-ram``), not for ``loadvm``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from emulator.block.node import BlockNode
from emulator.block.qcow2 import Qcow2Image
from emulator.errors import SnaplabError
from emulator.migration import group
from emulator.migration.cow import WriteProtector
from emulator.migration.engine import (
    FIRST_ENTRY_WAIT_S,
    LoadEngine,
    LoadRequest,
    LoadSource,
    LoadSteps,
    SnapshotMetrics,
    quiet_window,
    switch_interval,
)
from emulator.migration.loading_set import SOURCE_RESTORE
from emulator.migration.postcopy import LazyLoad
from emulator.runstate import RunState


@dataclass
class FillPlan:
    """What the filler does once the guest runs: serve only faults until ``faults_only_until``
    (seconds after RESUME; None: until job-complete or every chunk was touched), then fill
    ``order`` first, then the rest; ``record`` keeps the chunks touched in the first
    ``record_s`` seconds as the snapshot's loading set.  An engine with ``waits_for_complete``
    makes its job ready after RESUME."""

    faults_only_s: float | None = 0.0
    order: np.ndarray | None = None
    record_s: float = 0.0
    rest_idle: bool = False  # the chunks after ``order`` at SCHED_IDLE (the guest has what it needs)
    rest_duty: float = 1.0  # ... and using only this fraction of a CPU (until job-complete/quit)


class BackgroundLoad(LoadEngine):
    name: ClassVar[str] = "background"
    title: ClassVar[str] = "background (resume, faults first, a filler reads the rest)"
    resumes_early: ClassVar[bool] = True

    _ready: LazyLoad | None = None  # the next load's, made ahead
    _active: LazyLoad | None = None  # the load filling now

    def fill_plan(self, src: LoadSource) -> FillPlan:
        """Background: the filler starts at once, by address."""
        return FillPlan()

    def hurry(self) -> None:
        """Fill the rest now (job-complete, machine shutdown)."""
        active = self._active
        if active is not None:
            active.complete()

    def on_write_protector(self, wp: WriteProtector) -> None:
        self.close()  # one made for an earlier protector (whose set-up failed) gives its buffers back
        self._ready = LazyLoad(wp)

    def close(self) -> None:
        if self._ready is not None:
            self._ready.close()
            self._ready = None

    def _take_ready(self, wp: WriteProtector) -> LazyLoad:
        """The LazyLoad made ahead for this load (a new one if there is none)."""
        lazy, self._ready = self._ready, None
        if lazy is not None and lazy.wp is wp:
            return lazy
        if lazy is not None:
            lazy.close()
        return LazyLoad(wp)

    def load_steps(self, req: LoadRequest, orig: RunState) -> LoadSteps:
        ctx = self.ctx
        wp = ctx.write_protector()  # set up once (populate, register), never in a downtime
        times: list[float] = []
        release_io: list[Callable[[], None]] = []
        with quiet_window(ctx.vm):  # the short switch interval only from the kick on
            src = ctx.load_checks(req)
            layout = ctx.check_ram_size(src.parsed.layout)
            ctx.facts.goto_checked(req.name, src.nodes)
            cmap, base = ctx.facts.vmstate_map(src.img, src.sn)
            apply_devices = ctx.facts.prepared_state(src.img, src.sn, src.parsed)  # decoded: the stop only applies
            lazy = self._take_ready(wp).bind(src.img.file, cmap, src.img.cluster_size, base, layout,
                                             ctx.vm.stop_on_host_error)
            lazy.reserve()

            def downtime() -> None:
                # On the vCPU thread if it was in the guest (it left it for this and goes back
                # in at RESUME), else on this one with the vCPU held out (a halted guest's vCPU
                # is asleep): no thread is woken between the command and the resume.
                nonlocal orig
                times.append(time.perf_counter())
                if req.stop_first:  # where to go back to, read under the stop's hold
                    orig = RunState.RUNNING if ctx.vm.vm_stop(RunState.RESTORE_VM) else ctx.vm.state
                release = ctx.vm.hold_block_io()  # the disks are reverted after RESUME
                try:
                    ctx.vm.reset_for_load()
                    apply_devices()
                    ctx.vm.set_vclock_ns(src.sn.vm_clock_nsec)
                    lazy.arm()
                except BaseException:
                    release()
                    raise
                release_io.append(release)
                times.append(time.perf_counter())
                ctx.vm.vm_resume(orig)

            try:
                with switch_interval(5e-5):
                    ctx.vm.with_vcpu_out(downtime)
            except BaseException:
                if not lazy.armed:
                    self._ready = lazy  # untouched: the next load's
                raise
            finally:
                lazy.release()
        t0, t_resume = times
        plan = self._plan_started(src, lazy)
        lazy.free_old()
        self._active = lazy
        images = src.images
        failed = self._revert_disks(req.name, src.nodes, images, release_io[0])
        # The guest runs and the disks are reverted (the drained section, whose locks belong
        # to this thread, is over): the pages may follow on another thread.
        yield None
        if failed is not None:
            ctx.vm.vm_stop(RunState.RESTORE_VM)  # as a failed QEMU load leaves it
            lazy.fill_all()
            self._active = None
            raise failed
        ctx.flush(images)  # the reverted disks' metadata becomes durable after the guest resumed
        first_ns = ctx.vm.first_entry_ns(FIRST_ENTRY_WAIT_S if orig == RunState.RUNNING else 0)
        if self.waits_for_complete:
            yield lazy  # the job is ready: job-complete (lazy.complete) asks for the rest
        until = None if plan.faults_only_s is None else t_resume + plan.faults_only_s
        try:
            lazy.fill_all(plan.order, until, plan.rest_idle, plan.rest_duty)
        except SnaplabError:
            # The fill asked the vCPU to stop (stop_on_host_error); the job ends once it has.
            ctx.vm.run_on_cpu(lambda: None)
            raise
        finally:
            self._active = None
        self._ready = LazyLoad(wp)  # the next load's, made off its path
        m = self._metrics(lazy, t0, t_resume, plan)
        m.extra["first_instruction_ns"] = first_ns
        m.extra["fault_thread"] = wp.priority  # the fault-service thread's scheduling (cow.latency_priority)
        m.extra["recorded_chunks"] = self._record(src, lazy, t_resume, plan.record_s, m) if plan.record_s > 0 else 0
        ctx.saved(m)
        return m

    def _plan_started(self, src: LoadSource, lazy: LazyLoad) -> FillPlan:
        """The fill plan, right after RESUME; a loading set to read first is started at once
        (the guest runs and faults already; the disks' revert and flush come after)."""
        plan = self.fill_plan(src)
        if plan.order is not None and len(plan.order) and plan.faults_only_s == 0:
            lazy.start_prefetch(plan.order)
        return plan

    def _metrics(self, lazy: LazyLoad, t0: float, t_resume: float, plan: FillPlan) -> SnapshotMetrics:
        st = lazy.stats
        m = SnapshotMetrics(f"{self.name}-load", t_resume - t0, time.perf_counter() - t0)
        m.extra.update({"time_to_resume_s": t_resume - t0, "fill_s": st.fill_s, "faults": st.faults,
                        "fault_chunks": st.fault_chunks, "bg_chunks": st.bg_chunks,
                        "prefetched_chunks": st.prefetched_chunks, "grouped_chunks": st.grouped_chunks,
                        "moved_chunks": st.moved_chunks,
                        "zero_chunks": st.zero_chunks,
                        "zero_touched_chunks": st.zero_touched_chunks, "paced_s": st.paced_s,
                        "bytes_read": st.bytes_read, "resident_s": st.resident_at - t_resume,
                        "prefetch_s": st.prefetch_done_at - t_resume if st.prefetch_done_at else 0.0,
                        # RESUME to the set's readers' start (after the disks' revert and flush)
                        "prefetch_start_s": st.prefetch_start_at - t_resume if st.prefetch_start_at else 0.0,
                        "loading_set_chunks": 0 if plan.order is None else len(plan.order),
                        "loading_set": [] if plan.order is None else plan.order.tolist(),
                        "fault_latency_s": list(st.handler_s),
                        # the memory map: each fault (seconds after RESUME) and its chunk; each
                        # chunk as it came in: [seconds after RESUME, chunk, 0 fault / 1 set / 2 rest,
                        # 1 if all zero (nothing read)]
                        "fault_at_s": [t - t_resume for t in st.fault_at], "fault_chunk": list(st.fault_chunk),
                        "fill_log": [[t - t_resume, c, by, int(z)] for t, c, by, z in st.filled],
                        "chunks": lazy.nchunks})
        return m

    @staticmethod
    def _record(src: LoadSource, lazy: LazyLoad, t_resume: float, window_s: float, m: SnapshotMetrics) -> int:
        """Store the chunks the guest touched in its first ``window_s`` after RESUME as the
        snapshot's loading set, in place (loading_set.py); a snapshot that cannot take it
        (shared clusters, a read-only image, no trailer) keeps none, and the load still
        succeeds."""
        lset = src.parsed.loading_set
        if lset is None or lset.recorded:
            return 0
        chunks = np.array([c for t, c in lazy.touched if t - t_resume <= window_s], dtype=np.uint32)
        if not len(chunks):
            return 0
        lset.chunks, lset.source, lset.window_ms = chunks, SOURCE_RESTORE, int(window_s * 1000)
        m.extra["recorded_set"] = chunks.tolist()
        try:
            src.img.snapshot_vmstate_rewrite(src.sn.id_str, lset.pos, lset.encode())
            src.img.flush()
        except SnaplabError as err:
            lset.chunks = np.zeros(0, dtype=np.uint32)
            m.extra["loading_set_error"] = str(err)
            return 0
        return len(chunks)

    @staticmethod
    def _revert_disks(name: str, nodes: list[BlockNode], images: list[Qcow2Image],
                      release_io: Callable[[], None]) -> BaseException | None:
        """With the guest running: every disk drained, the guest's held requests let go (they
        now wait on the drained images), the disks reverted.  A failure is returned, not
        raised: the guest runs the snapshot's CPU and RAM but not all of its disks, so nothing
        may read them (requests fail until a load succeeds)."""
        with contextlib.ExitStack() as drained:
            for im in images:
                drained.enter_context(im.drained())
            release_io()
            try:
                with contextlib.ExitStack() as stack:
                    for im in images:
                        stack.enter_context(im.deferred_flush())
                    group.goto_all(name, nodes)
            except BaseException as err:
                for im in images:
                    im.io_error = f"snapshot '{name}' was not loaded: {err}"
                return err
        return None
