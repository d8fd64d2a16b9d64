"""The snapshot engine interface, and the steps every engine shares.

Mirrors the skeleton of QEMU's migration/savevm.c ``save_snapshot()`` / ``load_snapshot()``:
checks, ``vm_stop``, capture, ``vm_resume``, the group commit on every qcow2 node
(``bdrv_all_create_snapshot``), events and the figures a job reports.  QEMU has one way to do
each; snaplab has several *engines* (blocking, copy-on-write, pre-copy save; blocking and lazy
load).  Each engine is one module in ``emulator/migration/engines/`` and supplies only what
differs; everything they share is written once here, on :class:`EngineContext`, and is public
so that ``migrate``'s background snapshot (migrate.py) uses the same steps.

Owns: :class:`SaveEngine` / :class:`LoadEngine` (what an engine is), the requests they get,
:class:`SnapshotMetrics` (what they report) and :class:`EngineContext` (the VM's narrow
collaborators plus the shared steps).  Must not import the engines, the registry, the QMP
layer or the machine.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from emulator import workers
from emulator.block.node import BlockGraph, BlockNode
from emulator.block.qcow2 import Qcow2Image
from emulator.block.snapshot import PendingSnapshot, QCowSnapshot
from emulator.errors import LoadVMError, SnaplabError, UffdUnavailable
from emulator.gc_control import gc_paused
from emulator.memory import GuestRAM
from emulator.migration import group
from emulator.migration.cow import (
    GATHER,
    PROT_RWX,
    PROT_RX,
    WARM_BUFFERS,
    WP_BACKENDS,
    Protector,
    TlbProtector,
    UffdProtector,
    WriteProtector,
    fault_buffers,
)
from emulator.migration.facts import SnapshotFacts
from emulator.migration.savefail import create_error, delete_quietly
from emulator.migration.vmstate import (
    PAGE,
    SAVE_WRITERS,
    WARM_PAGES,
    ParsedState,
    RamLayout,
    SaveHandler,
    capture_sections,
    encode_sections,
)
from emulator.runstate import RunState


class VMOps(Protocol):
    """Run-state control the snapshot code needs (vm_stop / vm_resume / qemu_system_reset)."""

    @property
    def state(self) -> RunState: ...

    def vm_stop(self, state: RunState) -> bool: ...

    def vm_resume(self, state: RunState | None = None) -> None: ...

    def release_hold(self) -> None: ...

    def reset_for_load(self) -> None: ...

    def vclock_ns(self) -> int: ...

    def set_vclock_ns(self, ns: int) -> None: ...

    def enable_write_tracking(self, perms_for: Callable[[int, bool], int]) -> None: ...

    def disable_write_tracking(self) -> None: ...

    def held_events(self) -> contextlib.AbstractContextManager[None]: ...

    def run_on_cpu(self, fn: Callable[[], None]) -> None: ...

    def with_vcpu_out(self, fn: Callable[[], None]) -> None: ...

    def hold_block_io(self) -> Callable[[], None]: ...

    def stop_on_host_error(self, cause: str) -> None: ...

    def first_entry_ns(self, timeout: float) -> int: ...


FIRST_ENTRY_WAIT_S = 1.0  # how long a load waits to see the guest's first instruction after RESUME


@contextlib.contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    """CPython's GIL switch interval lowered to ``seconds`` (never raised) for a while."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


@contextlib.contextmanager
def short_downtime(vm: VMOps) -> Iterator[None]:
    """Around a background engine's vm_stop ... vm_resume: the thread running it is not kept
    waiting.  No garbage collection (a full pass can take milliseconds); the GIL changes hands
    within 50 us instead of CPython's 5 ms, so a busy thread cannot hold it for long; and the
    STOP/RESUME events raised inside are delivered after it (with the times they were raised),
    so no monitor thread wakes up to compete.  The blocking engine does not use it: its STOP
    must reach clients while it works."""
    with quiet_window(vm), switch_interval(5e-5):
        yield


@contextlib.contextmanager
def quiet_window(vm: VMOps) -> Iterator[None]:
    """:func:`short_downtime` without the short switch interval, for work before the stop
    while the guest still runs: there a 50 us interval would hand the GIL to the vCPU thread's
    device callbacks (the lab port's, up to 100,000 a second) every 50 us and slow the work
    down (a lazy load's checks; measured ~0.05 ms less from command to RESUME without it)."""
    with gc_paused(), vm.held_events():
        yield


@dataclass
class SnapshotMetrics:
    """What one snapshot operation cost (reported by jobs and the lab)."""

    engine: str  # the engine's name (a load's: NAME-load)
    downtime_s: float = 0.0  # vm stopped (STOP..RESUME) as the VM saw it
    total_s: float = 0.0
    vmstate_bytes: int = 0
    ram_pages_written: int = 0
    zero_pages: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SaveRequest:
    """What ``snapshot-save`` / ``savevm`` asked for (``name`` None: QEMU's vm-DATE default)."""

    name: str | None
    overwrite: bool
    vmstate: str | None
    devices: list[str] | None
    wp_backend: str = "auto"


@dataclass(frozen=True)
class LoadRequest:
    """What ``snapshot-load`` / ``loadvm`` asked for."""

    name: str
    vmstate: str | None
    devices: list[str] | None
    stop_first: bool = True


@dataclass(frozen=True)
class Instant:
    """When a snapshot was taken: its name, wall clock and VM clock (QEMUSnapshotInfo's dates)."""

    name: str
    wall_ns: int
    vm_clock_ns: int


@dataclass(frozen=True)
class SaveTarget:
    """The nodes a save writes a snapshot to, and ``bs``, the one that holds the VM state."""

    nodes: list[BlockNode]
    bs: BlockNode

    @property
    def images(self) -> list[Qcow2Image]:
        return [group.image(n) for n in self.nodes]

    @property
    def vmstate_image(self) -> Qcow2Image:
        return group.image(self.bs)


@dataclass(frozen=True)
class LoadSource:
    """A load's checked inputs: the nodes, the VM-state image, its snapshot and parsed state."""

    nodes: list[BlockNode]
    img: Qcow2Image
    sn: QCowSnapshot
    parsed: ParsedState

    @property
    def images(self) -> list[Qcow2Image]:
        return [group.image(n) for n in self.nodes]


class SaveEngine:
    """A way to save an internal snapshot.  Subclasses set the class attributes and
    implement :meth:`save`; one instance per VM, made on first use."""

    name: ClassVar[str]  # the QMP enum value of ``__org.snaplab_engine``
    title: ClassVar[str]  # a few words for plots, widgets and docs
    guest_runs: ClassVar[bool]  # the guest runs during most of the save (a background engine)
    write_protects: ClassVar[bool] = False  # uses a write-protect backend (``wp-backend``)

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    def save(self, req: SaveRequest) -> SnapshotMetrics:
        raise NotImplementedError

    def close(self) -> None:
        """Machine teardown: give back what the engine keeps between operations."""


class Completable(Protocol):
    """What a load yields when its job becomes *ready* (QEMU's job_transition_to_ready(), as
    a mirror job in sync): ``job-complete`` calls :meth:`complete`."""

    def complete(self) -> None: ...


LoadSteps = Generator[Completable | None, None, SnapshotMetrics]


class LoadEngine:
    """A way to load an internal snapshot.  :meth:`load_steps` is a generator: an engine that
    resumes the guest before it has finished (``resumes_early``) yields None once, right after
    the resume, and the job runs the rest on a worker; others do not yield.  An engine that
    waits to be told to finish yields a :class:`Completable` after that (the job is then
    ``ready`` until ``job-complete``)."""

    name: ClassVar[str]
    title: ClassVar[str]
    resumes_early: ClassVar[bool] = False
    waits_for_complete: ClassVar[bool] = False  # ready after RESUME until job-complete

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    def load_steps(self, req: LoadRequest, orig: RunState) -> LoadSteps:
        raise NotImplementedError

    def hurry(self) -> None:
        """Finish the running load as soon as possible (the machine shuts down)."""

    def on_write_protector(self, wp: WriteProtector) -> None:
        """The VM's userfaultfd was set up: prepare ahead whatever a load would otherwise make."""

    def close(self) -> None:
        """Machine teardown: give back what the engine keeps between operations."""


class EngineContext:
    """One VM's collaborators (block graph, attachments, run-state control, save handlers,
    RAM) and the steps every engine shares.  Never the machine itself."""

    def __init__(self, graph: BlockGraph, attached: Callable[[], list[str]], vm: VMOps,
                 handlers: Callable[[], list[SaveHandler]], ram: GuestRAM, machine_name: str,
                 wp_backend: str = "auto") -> None:
        self.graph = graph
        self.attached = attached
        self.vm = vm
        self.handlers = handlers
        self.ram = ram
        self.machine_name = machine_name
        self.wp_backend = wp_backend  # "auto", or force one of WP_BACKENDS
        self.facts = SnapshotFacts()
        self.wp: WriteProtector | None = None
        self.on_write_protector: list[Callable[[WriteProtector], None]] = []
        self.last: SnapshotMetrics | None = None

    # -- checks ---------------------------------------------------------------------------------
    def save_checks(self, req: SaveRequest) -> SaveTarget:
        """save_snapshot()'s checks in QEMU's order; an existing snapshot of the name is
        deleted first when ``overwrite`` (HMP savevm)."""
        nodes = group.devices(self.graph, self.attached(), req.devices)
        group.can_snapshot(nodes)
        if req.name is not None:
            if req.overwrite:
                group.delete_all(req.name, nodes)
            elif group.any_has(req.name, nodes):
                raise SnaplabError(f"Snapshot '{req.name}' already exists in one or more devices")
        return SaveTarget(nodes, group.find_vmstate_bs(req.vmstate, nodes))

    def load_checks(self, req: LoadRequest) -> LoadSource:
        """load_snapshot()'s checks in QEMU's order, then the whole VM state parsed and checked
        against this machine, before anything changes."""
        nodes = group.devices(self.graph, self.attached(), req.devices)
        group.can_snapshot(nodes)
        if not group.has_snapshot(req.name, nodes):
            raise SnaplabError(f"Snapshot '{req.name}' does not exist in one or more devices")
        img = group.image(group.find_vmstate_bs(req.vmstate, nodes))
        sn = group.named(img, req.name)
        if sn is None:
            raise SnaplabError("Snapshot can not be found")
        if sn.vm_state_size == 0:
            raise SnaplabError("This is a disk-only snapshot. Revert to it  offline using qemu-img")
        return LoadSource(nodes, img, sn, self.facts.parsed_state(img, sn, self.handlers(), self.machine_name))

    def check_ram_size(self, layout: RamLayout | None) -> RamLayout:
        """ram_load()'s check of the RAM block length, in QEMU's words."""
        if layout is None:
            raise LoadVMError("the stream has no RAM section")
        if layout.ram_size != self.ram.size:
            raise LoadVMError(f"Length mismatch: pc.ram: {layout.ram_size:#x} in != {self.ram.size:#x}: "
                              "Invalid argument")
        return layout

    # -- stop, capture, resume ------------------------------------------------------------------
    def stop_for_save(self, images: list[Qcow2Image], stack: contextlib.ExitStack,
                      state: RunState = RunState.SAVE_VM) -> float:
        """vm_stop(state) with every image's flushes deferred until ``stack`` closes; returns
        the time the guest stopped."""
        for im in images:
            stack.enter_context(im.deferred_flush())
        self.vm.vm_stop(state)
        return time.perf_counter()

    def save_instant(self, name: str | None) -> Instant:
        """The snapshot's name (QEMU's vm-%Y%m%d%H%M%S default), wall clock ns and vm clock ns."""
        now = time.time_ns()
        if name is None:
            name = time.strftime("vm-%Y%m%d%H%M%S", time.localtime(now // 1_000_000_000))
        return Instant(name, now, self.vm.vclock_ns())

    def capture(self) -> list[tuple[SaveHandler, bytes]]:
        """Every device section, encoded (qemu_savevm_state_complete_precopy's non-RAM part)."""
        return [(h, h.save()) for h in self.handlers()]

    def resume(self, state: RunState | None = None) -> float:
        """vm_resume(state), by default to where the operation's stop found the VM (read under
        its hold: a user's stop or cont just before the stop is kept); returns the time the
        guest was let go."""
        t = time.perf_counter()
        self.vm.vm_resume(state)
        return t

    # -- the qcow2 group commit (bdrv_all_create_snapshot) --------------------------------------
    # A failure on one node leaves no entry of the new snapshot on any node (save_snapshot()
    # deletes the ones made), gives back what the failed save took (quietly: if the disk refuses
    # that too, the clusters leak, and ``qemu-img check`` calls them leaks), and is reported as
    # bdrv_all_create_snapshot()'s "Could not create snapshot 'x' on 'node': <cause>", the
    # cause of a refused write being its strerror.

    def commit(self, target: SaveTarget, at: Instant, vm_state_size: int) -> None:
        """A snapshot table entry on every node (the VM state's size on ``bs`` only)."""
        created: list[BlockNode] = []
        for n in target.nodes:
            try:
                group.image(n).snapshot_create(at.name, vm_state_size=vm_state_size if n is target.bs else 0,
                                               date_sec=at.wall_ns // 1_000_000_000,
                                               date_nsec=at.wall_ns % 1_000_000_000,
                                               vm_clock_nsec=at.vm_clock_ns, icount=-1)
            except SnaplabError as err:
                delete_quietly(created, at.name)
                raise create_error(at.name, n, err) from err
            created.append(n)

    def freeze(self, target: SaveTarget, name: str) -> dict[str, PendingSnapshot]:
        """Every node's disk frozen as it is now (a pending snapshot: later guest writes go
        elsewhere); the entries are written by :meth:`finish`."""
        pendings: dict[str, PendingSnapshot] = {}
        for n in target.nodes:
            try:
                pendings[n.node_name] = group.image(n).snapshot_prepare()
            except BaseException as err:
                self.abort(target, pendings)
                if isinstance(err, SnaplabError):
                    raise create_error(name, n, err) from err
                raise
        return pendings

    def finish(self, target: SaveTarget, pendings: dict[str, PendingSnapshot], at: Instant,
               vm_state_size: int) -> None:
        """The frozen disks' snapshot table entries."""
        done: list[BlockNode] = []
        for n in target.nodes:
            try:
                group.image(n).snapshot_finish(pendings[n.node_name], at.name,
                                               vm_state_size=vm_state_size if n is target.bs else 0,
                                               date_sec=at.wall_ns // 1_000_000_000,
                                               date_nsec=at.wall_ns % 1_000_000_000,
                                               vm_clock_nsec=at.vm_clock_ns)
            except BaseException as err:
                delete_quietly(done, at.name)
                self.abort(target, {k: p for k, p in pendings.items()
                                    if k not in {d.node_name for d in done}})
                if isinstance(err, SnaplabError):
                    raise create_error(at.name, n, err) from err
                raise
            done.append(n)

    def abort(self, target: SaveTarget, pendings: dict[str, PendingSnapshot]) -> None:
        """Give back what :meth:`freeze` took, for a save that failed before :meth:`finish`;
        never raises a block error (a refused give-back leaks, the save's own error counts)."""
        for n in target.nodes:
            if n.node_name in pendings:
                with contextlib.suppress(SnaplabError):
                    group.image(n).snapshot_abort(pendings[n.node_name])

    @staticmethod
    def flush(images: list[Qcow2Image]) -> None:
        """Durable before the job reports success (after the guest resumed)."""
        for im in images:
            im.flush()

    def saved(self, m: SnapshotMetrics, target: SaveTarget | None = None, name: str | None = None) -> SnapshotMetrics:
        """A save or load is done: its figures become ``last``; after a save, with the guest
        running, the new snapshot's VM state is read once so a load of it starts from a
        checked, parsed state (a failure here only means no head start)."""
        if target is not None and name is not None:
            img = target.vmstate_image
            sn = group.named(img, name)
            if sn is not None and sn.vm_state_size:
                with contextlib.suppress(SnaplabError):
                    parsed = self.facts.parsed_state(img, sn, self.handlers(), self.machine_name)
                    self.facts.prepared_state(img, sn, parsed)
                    self.facts.vmstate_map(img, sn)
        self.last = m
        return m

    def ram_pages(self) -> int:
        return self.ram.size // PAGE

    # -- write protection -----------------------------------------------------------------------
    def write_protector(self) -> WriteProtector:
        """userfaultfd on guest RAM, set up once (RAM populated first, outside any downtime)."""
        if self.wp is None:
            wp = WriteProtector(self.ram)
            try:
                workers.prestart(4)  # jobs, savers and page freeing start on warm threads
                for hook in self.on_write_protector:  # (the lazy loads made ahead take their buffers)
                    hook(wp)
                # then a save's own, free: a fault's copy never lands in fresh memory, and the
                # first copy-on-write save makes no buffer (6 made there took 37 ms)
                WARM_BUFFERS.reserve_free(fault_buffers(self.ram.size))
                WARM_PAGES.warm(GATHER // PAGE, count=SAVE_WRITERS + 1)  # the saver's gather buffers, likewise
                # Last, after the GiBs touched above: what a downtime runs, once, so that the
                # first save's downtime is not a cold one.
                warm_code_paths()
                encode_sections(capture_sections(self.handlers()))
                self.save_instant(None)
                wp.warm()
            except BaseException:
                wp.close()
                raise
            self.wp = wp
        return self.wp

    def protector(self, backend: str | None = None) -> tuple[Protector, str]:
        """The write-protect backend: userfaultfd, or the Unicorn TLB fallback (and why)."""
        backend = backend or self.wp_backend
        if backend not in WP_BACKENDS:
            raise SnaplabError(f"Parameter 'wp-backend' does not accept value '{backend}'")
        if backend != "unicorn-tlb":
            try:
                return UffdProtector(self.write_protector()), ""
            except UffdUnavailable as err:
                if backend == "userfaultfd":
                    raise
                note = f"userfaultfd unavailable ({err}); using Unicorn-level write tracking for the window"
        else:
            note = "Unicorn-level write tracking forced"
        return TlbProtector(self.ram, self.vm.enable_write_tracking, self.vm.disable_write_tracking,
                            PROT_RX, PROT_RWX), note

    def close(self) -> None:
        if self.wp is not None:
            self.wp.close()
            self.wp = None


_warmed = False


def warm_code_paths() -> None:
    """Run the metadata paths of a background snapshot once on a scratch image, so that
    first-use costs (lazy imports inside numpy, first compilations) never land in a downtime."""
    global _warmed
    if _warmed:
        return
    img = Qcow2Image.in_memory(4 << 20)
    img.write(0, b"x" * 70000)
    with img.deferred_flush():
        p = img.snapshot_prepare()
    img.pending_save_vmstate(p, 0, b"y" * 5000)
    img.snapshot_finish(p, "warm", vm_state_size=5000, date_sec=0, date_nsec=0, vm_clock_nsec=0)
    _warmed = True
