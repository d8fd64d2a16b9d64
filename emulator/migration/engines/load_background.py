"""The lazy load: resume first, fill RAM after (postcopy.py does the filling).

Everything that can be is done before the stop: the checks and the parse (a bad request fails
without a STOP; QEMU's blocking load stops first), the disks' revert checked, the VM-state
cluster map, the address space RAM is moved to.  Stopped, on the vCPU thread (``run_on_cpu``):
the guest's block accesses held, devices loaded, RAM emptied and armed for missing-page
faults.  Resumed: the disks are drained and reverted (a guest disk request waits for it, so the
guest never sees the old disks), and the pages follow, on a worker.  QEMU has this only for
live migration (``postcopy-ram``), not for ``loadvm``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator
from typing import ClassVar

from emulator.block.node import BlockNode
from emulator.block.qcow2 import Qcow2Image
from emulator.errors import SnaplabError
from emulator.migration import group
from emulator.migration.cow import WriteProtector
from emulator.migration.engine import LoadEngine, LoadRequest, SnapshotMetrics, short_downtime
from emulator.migration.postcopy import LazyLoad
from emulator.runstate import RunState


class LazyLoadEngine(LoadEngine):
    name: ClassVar[str] = "lazy"
    title: ClassVar[str] = "lazy (resume first, fill after)"
    resumes_early: ClassVar[bool] = True

    _ready: LazyLoad | None = None  # the next load's, made ahead

    def on_write_protector(self, wp: WriteProtector) -> None:
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

    def load_steps(self, req: LoadRequest, orig: RunState) -> Generator[None, None, SnapshotMetrics]:
        ctx = self.ctx
        wp = ctx.write_protector()  # set up once (populate, register), never in a downtime
        times: list[float] = []
        release_io: list[Callable[[], None]] = []
        with short_downtime(ctx.vm):
            src = ctx.load_checks(req)
            layout = ctx.check_ram_size(src.parsed.layout)
            ctx.facts.goto_checked(req.name, src.nodes)
            cmap, base = ctx.facts.vmstate_map(src.img, src.sn)
            apply_devices = ctx.facts.prepared_state(src.img, src.sn, src.parsed)  # decoded: the stop only applies
            lazy = self._take_ready(wp).bind(src.img.file, cmap, src.img.cluster_size, base, layout,
                                             ctx.vm.stop_on_host_error)
            lazy.reserve()

            def downtime() -> None:
                # On the vCPU thread (run_on_cpu): it left the guest for this and goes back in
                # at RESUME, so no thread is woken between the stop and the resume.
                times.append(time.perf_counter())
                if req.stop_first:
                    ctx.vm.vm_stop(RunState.RESTORE_VM)
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
                ctx.vm.run_on_cpu(downtime)
            except BaseException:
                if not lazy.armed:
                    self._ready = lazy  # untouched: the next load's
                raise
            finally:
                lazy.release()
        t0, t_resume = times
        lazy.free_old()
        images = src.images
        failed = self._revert_disks(req.name, src.nodes, images, release_io[0])
        # The guest runs and the disks are reverted (the drained section, whose locks belong
        # to this thread, is over): the pages may follow on another thread.
        yield
        if failed is not None:
            ctx.vm.vm_stop(RunState.RESTORE_VM)  # as a failed QEMU load leaves it
            lazy.fill_all()
            raise failed
        ctx.flush(images)  # the reverted disks' metadata becomes durable after the guest resumed
        try:
            lazy.fill_all()
        except SnaplabError:
            # The fill asked the vCPU to stop (stop_on_host_error); the job ends once it has.
            ctx.vm.run_on_cpu(lambda: None)
            raise
        self._ready = LazyLoad(wp)  # the next load's, made off its path
        st = lazy.stats
        m = SnapshotMetrics(f"{self.name}-load", t_resume - t0, time.perf_counter() - t0)
        m.extra.update({"time_to_resume_s": t_resume - t0, "fill_s": st.fill_s, "faults": st.faults,
                        "fault_chunks": st.fault_chunks, "bg_chunks": st.bg_chunks,
                        "moved_chunks": st.moved_chunks,
                        "fault_latency_s": list(st.handler_s)})
        ctx.saved(m)
        return m

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
