"""Lazy restore: the guest resumes before RAM is loaded and never sees a page that is not the
snapshot's; its run is the same as after a blocking load."""

from __future__ import annotations

import ctypes
import hashlib
import threading
import time
from pathlib import Path

import pytest

from emulator.block import Qcow2Image
from emulator.block.node import BlockGraph
from emulator.errors import BlockIOError, UffdUnavailable
from emulator.guest import WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig
from emulator.qmp.client import QMPClient
from emulator.uffd import UserFaultFD
from tests.migration.conftest import progresses, vmflags, wait_until

RAM = 128 << 20


@pytest.fixture(autouse=True)
def _uffd() -> None:
    try:
        UserFaultFD().close()
    except UffdUnavailable as err:
        pytest.skip(f"the kernel refuses userfaultfd here: {err}")


def vm(tmp_path: Path, spec: WorkloadSpec) -> tuple[Machine, BlockGraph]:
    Qcow2Image.create(tmp_path / "d.qcow2", 256 << 20).close()
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(tmp_path / "d.qcow2"), "node-name": "f"})
    g.add({"driver": "qcow2", "file": "f", "node-name": "disk0"})
    return Machine(MachineConfig(ram_size=RAM, workload=spec, disks=[DiskSpec("disk0")]), g), g


def test_lazy_load_is_exact_and_runs_like_a_blocking_load(tmp_path: Path) -> None:
    spec = WorkloadSpec("mixed", seed=21, working_set=64 << 20, pattern="random", batch_pages=32)
    m, g = vm(tmp_path, spec)
    try:
        assert m.run_instructions(2_000_000) is None
        saved = hashlib.sha256(m.ram.read(0, RAM)).hexdigest()
        m.snapshots.save_snapshot("t", False, "disk0", ["disk0"])
        runs = {}
        for engine in ("blocking", "background", "background"):
            m.run_instructions(1_000_000)  # move away from the snapshot
            met = m.snapshots.load_snapshot("t", "disk0", ["disk0"], engine=engine)
            assert hashlib.sha256(m.ram.read(0, RAM)).hexdigest() == saved, engine
            if engine == "background":  # how soon it resumes is a figure of bench/timing.py
                assert 0 < met.extra["time_to_resume_s"] <= met.total_s
            assert m.run_instructions(2_000_000) is None
            runs[engine] = (hashlib.sha256(m.ram.read(0, RAM)).hexdigest(), m.cpu.get_state(), m.lab.last.iterations,
                            hashlib.sha256(m.disk_nodes[0].format_image.read(0, 256 << 20)).hexdigest())
        assert runs["blocking"] == runs["background"]
    finally:
        m.close()
        g.close()


def test_running_guest_faults_pages_in(tmp_path: Path) -> None:
    spec = WorkloadSpec("mixed", seed=5, working_set=96 << 20, pattern="random")
    m, g = vm(tmp_path, spec)
    try:
        q = _running_with_snapshot(m)
        time.sleep(0.1)
        q.events()
        threads: dict[str, str] = {}

        def traced(step: str):  # type: ignore[no-untyped-def]
            f = getattr(m, step)

            def call(*a):  # type: ignore[no-untyped-def]
                threads[step] = threading.current_thread().name
                return f(*a)
            return call

        for step in ("vm_stop", "vm_resume", "with_vcpu_out"):
            setattr(m, step, traced(step))
        q.execute("snapshot-load", {"job-id": "l", "tag": "t", "vmstate": "disk0", "devices": ["disk0"],
                                    "__org.snaplab_engine": "background"})
        info = q.wait_job("l", 60)
        assert "error" not in info
        # up to RESUME on the thread that dispatched the command (the job's bottom half): the
        # in-process client dispatches a job-starting command on the caller's thread; the stop
        # and resume themselves on one thread, the vCPU's if it was running guest code, else
        # this one (with_vcpu_out: no thread hand-off between)
        assert threads["with_vcpu_out"] == threading.current_thread().name
        assert threads["vm_stop"] == threads["vm_resume"] in ("vcpu", threading.current_thread().name)
        evs = [e.event for e in q.events() if e.event in ("STOP", "RESUME")]
        assert evs == ["STOP", "RESUME"]
        stats = q.execute("__org.snaplab_query-snapshot-stats", {"id": "l"})
        assert stats["engine"] == "background-load" and stats["faults"] > 0  # the guest ran during the fill
        assert stats["fault-chunks"] + stats["bg-chunks"] == RAM // (2 << 20)
        # the old RAM's own pages were read into and moved back (UFFDIO_MOVE, Linux 6.8):
        # nothing freed, nothing allocated; without the feature every chunk is copied; a chunk
        # with no non-zero page is neither (left to the huge zero page)
        assert 0 < stats["zero-chunks"] < RAM // (2 << 20)
        moved = RAM // (2 << 20) - stats["zero-chunks"] if m.snapshots.write_protector().can_move else 0
        assert stats["moved-chunks"] == moved
        # every page in: RAM is no longer registered (the next load moves it by whole tables)
        assert not {"um", "uw"} & vmflags(m.ram.addr)
        progresses(m)
        assert m.lab.last.errors == 0  # disk verify passes too
    finally:
        m.close()
        g.close()


def test_disk_revert_failing_after_resume_stops_the_guest_and_fences_the_disk(tmp_path: Path) -> None:
    """The lazy load reverts the disks after the guest resumed (drained, so no request gets in
    before).  If that revert fails, the guest must never touch the half-reverted disk: the VM
    stops as a failed load leaves it, the job reports the error, guest requests fail with an
    I/O error, and the next successful load clears it."""
    spec = WorkloadSpec("mixed", seed=9, working_set=32 << 20, pattern="random")
    m, g = vm(tmp_path, spec)
    try:
        q = _running_with_snapshot(m)
        img = m.disk_nodes[0].format_image
        real_goto = img.snapshot_goto

        def broken(name: str) -> object:
            raise BlockIOError("injected write failure")

        img.snapshot_goto = broken  # type: ignore[method-assign]
        q.execute("snapshot-load", {"job-id": "l", "tag": "t", "vmstate": "disk0", "devices": ["disk0"],
                                    "__org.snaplab_engine": "background"})
        info = q.wait_job("l", 60)
        assert "injected write failure" in info["error"]
        assert q.execute("query-status")["status"] == "restore-vm"
        with pytest.raises(BlockIOError, match="was not loaded"):
            img.read(0, 512)
        img.snapshot_goto = real_goto  # type: ignore[method-assign]
        q.execute("snapshot-load", {"job-id": "l2", "tag": "t", "vmstate": "disk0", "devices": ["disk0"]})
        assert "error" not in q.wait_job("l2", 60)
        assert img.io_error is None
        assert q.execute("query-status")["status"] == "restore-vm"  # QEMU: a load keeps a stopped VM stopped
        q.execute("cont")
        it = m.lab.last.iterations
        wait_until(lambda: m.lab.last.iterations > it, "the guest to run on")
        assert m.lab.last.errors == 0
    finally:
        m.close()
        g.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_unreadable_chunk_stops_the_guest_before_it_runs_on_wrong_pages(tmp_path: Path) -> None:
    """A chunk of the VM state that cannot be read while the guest runs (an I/O error): the
    guest is stopped in internal-error before the chunk's pages are installed (zeros, only so
    that a vCPU blocked on it can reach its stop), the job reports the error, nothing hangs,
    and the machine takes a reset and a new load."""
    from emulator.migration.postcopy import LazyLoad

    spec = WorkloadSpec("mixed", seed=9, working_set=96 << 20, pattern="random")
    m, g = vm(tmp_path, spec)
    real_hosts = LazyLoad._hosts
    calls = [0]

    def failing(self: LazyLoad, first: int, n: int) -> object:
        calls[0] += 1
        if calls[0] > 8:
            raise OSError(5, "Input/output error")
        return real_hosts(self, first, n)

    try:
        q = _running_with_snapshot(m)
        q.events()
        LazyLoad._hosts = failing  # type: ignore[method-assign]
        q.execute("snapshot-load", {"job-id": "l", "tag": "t", "vmstate": "disk0", "devices": ["disk0"],
                                    "__org.snaplab_engine": "background"})
        info = q.wait_job("l", 60)
        LazyLoad._hosts = real_hosts  # type: ignore[method-assign]
        assert "lazy restore could not read the snapshot's RAM: [Errno 5] Input/output error" in info["error"]
        assert q.execute("query-status")["status"] == "internal-error"
        assert m.fault is not None and "could not read the snapshot's RAM" in m.fault.cause
        assert [e.event for e in q.events() if e.event in ("STOP", "RESUME")] == ["STOP", "RESUME", "STOP"]
        it = m.lab.last.iterations
        time.sleep(0.1)
        assert m.lab.last.iterations == it  # really stopped
        assert not {"um", "uw"} & vmflags(m.ram.addr)
        q.execute("system_reset")
        q.execute("snapshot-load", {"job-id": "l2", "tag": "t", "vmstate": "disk0", "devices": ["disk0"],
                                    "__org.snaplab_engine": "background"})
        assert "error" not in q.wait_job("l2", 60)
        q.execute("cont")
        it = m.lab.last.iterations
        wait_until(lambda: m.lab.last.iterations > it, "the guest to run on")
        assert m.lab.last.errors == 0
    finally:
        LazyLoad._hosts = real_hosts  # type: ignore[method-assign]
        m.close()
        g.close()


def _running_with_snapshot(m: Machine) -> QMPClient:
    """Start the guest, let it run a little, save snapshot "t" (blocking); the QMP client."""
    m.start()
    time.sleep(0.2)
    q = m.qmp()
    q.execute("snapshot-save", {"job-id": "s", "tag": "t", "vmstate": "disk0", "devices": ["disk0"]})
    assert "error" not in q.wait_job("s")
    return q


def _read(ram, off: int, n: int) -> bytes:  # type: ignore[no-untyped-def]
    """Read registered RAM without holding the GIL (ctypes.memmove releases it), so the
    fault-service thread can answer missing-page faults meanwhile."""
    buf = (ctypes.c_char * n)()
    ctypes.memmove(buf, ram.addr + off, n)
    return bytes(buf)


def test_emptying_ram_swaps_the_mapping_and_registers_it_for_the_window() -> None:
    from emulator.memory import GuestRAM
    from emulator.migration.cow import WriteProtector
    from emulator.uffd import UFFDIO_REGISTER_MODE_MISSING

    ram = GuestRAM(64 << 20)
    ram.array[:] = 0x5A  # populated before registration: no faults from this thread
    wp = WriteProtector(ram)
    try:
        addr = ram.addr
        assert not {"um", "uw"} & vmflags(addr)  # registered only for an engine's window
        wp.register()  # a copy-on-write save's
        assert {"um", "uw"} <= vmflags(addr)
        wp.unregister()
        assert not {"um", "uw"} & vmflags(addr)
        import emulator.memory as memory

        libc_mmap, mmaps = memory._libc.mmap, []
        memory._libc.mmap = lambda *a: mmaps.append(a) or libc_mmap(*a)
        try:
            free_old = ram.discard_later()
        finally:
            memory._libc.mmap = libc_mmap
        assert free_old is not None and ram.addr == addr
        assert not [a for a in mmaps if a[0] == addr]  # MREMAP_DONTUNMAP (Linux 5.7): RAM stayed mapped
        assert "hg" in vmflags(addr)  # with its huge-page advice
        assert not {"um", "uw"} & vmflags(addr)  # registration is the caller's job
        free_old()
        # A kernel without MREMAP_DONTUNMAP (an unknown flag: EINVAL): a fresh mapping instead.
        ram.array[:1 << 20] = 0x5A
        dontunmap, memory.MREMAP_DONTUNMAP = memory.MREMAP_DONTUNMAP, 1 << 30
        memory._libc.mmap = lambda *a: mmaps.append(a) or libc_mmap(*a)
        try:
            free_old = ram.discard_later()
        finally:
            memory._libc.mmap, memory.MREMAP_DONTUNMAP = libc_mmap, dontunmap
        assert free_old is not None and ram.addr == addr and [a for a in mmaps if a[0] == addr]
        assert "hg" in vmflags(addr) and not ram.array[:1 << 20].any()
        wp.register(UFFDIO_REGISTER_MODE_MISSING)  # a lazy load's
        free_old()
        assert "um" in vmflags(addr) and "uw" not in vmflags(addr)
        # every page is missing and reads as zero (served by the missing-page handler)
        assert _read(ram, 0, 1 << 20) == bytes(1 << 20) and _read(ram, (64 << 20) - 4096, 4096) == bytes(4096)
        ctypes.memset(ram.addr + (8 << 20), 3, 4096)
        assert _read(ram, 8 << 20, 4097) == b"\x03" * 4096 + b"\x00"
        free_old = wp.discard_ram()  # the same through the write protector (freeing is the caller's)
        assert free_old is not None and ram.addr == addr and "um" in vmflags(addr)
        free_old()
        assert _read(ram, 8 << 20, 4096) == bytes(4096)
        # Freeing the old pages reserves the next aside (off a load's path); it is handed out
        # once, as reserved address space only (no access), and close() gives it back.
        aside = ram.reserve_aside()
        assert aside is not None
        free_old = ram.discard_later(aside)
        assert free_old is not None
        free_old()
        spare = ram._spare
        assert spare is not None and spare != addr
        assert not {"rd", "wr"} & vmflags(spare)
        assert ram.reserve_aside() == spare and ram._spare is None
        ram.release_aside(spare)
        assert ram._spare == spare
        wp.unregister()
        assert not {"um", "uw"} & vmflags(addr)
    finally:
        wp.close()
        ram.close()
    assert ram._spare is None and not Path("/proc/self/maps").read_text().count(f"{spare:x}-")


def test_lazy_load_refuses_small_clusters_before_stopping(tmp_path: Path) -> None:
    """A VM state lazy restore cannot read at random (clusters under 4 KiB) fails the job with
    a clear error before any STOP; the guest keeps running and a blocking load still works."""
    Qcow2Image.create(tmp_path / "d.qcow2", 64 << 20, cluster_size=2048).close()
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(tmp_path / "d.qcow2"), "node-name": "f"})
    g.add({"driver": "qcow2", "file": "f", "node-name": "disk0"})
    m = Machine(MachineConfig(ram_size=64 << 20, workload=WorkloadSpec("dirty", seed=3, working_set=8 << 20),
                              disks=[DiskSpec("disk0")]), g)
    try:
        q = _running_with_snapshot(m)
        q.events()
        q.execute("snapshot-load", {"job-id": "l", "tag": "t", "vmstate": "disk0", "devices": ["disk0"],
                                    "__org.snaplab_engine": "background"})
        info = q.wait_job("l", 60)
        assert info["error"] == "lazy restore needs a cluster size of at least 4 KiB, not 2048"
        assert not [e for e in q.events() if e.event in ("STOP", "RESUME")]
        assert q.execute("query-status")["status"] == "running"
        q.execute("snapshot-load", {"job-id": "b", "tag": "t", "vmstate": "disk0", "devices": ["disk0"]})
        assert "error" not in q.wait_job("b", 60)
    finally:
        m.close()
        g.close()


def test_a_loading_sets_page_offsets_are_found_one_call_per_run_of_chunks() -> None:
    """postcopy.hosts_of: the same offsets as one _hosts call per chunk, with one call per
    run of consecutive chunks; a last chunk that RAM cuts short gets only its pages."""
    from types import SimpleNamespace

    import numpy as np

    from emulator.migration.cow import CHUNK
    from emulator.migration.postcopy import hosts_of
    from emulator.migration.vmstate import PAGE

    per = CHUNK // PAGE
    calls: list[tuple[int, int]] = []

    class Fake:
        ram = SimpleNamespace(size=10 * CHUNK - 8 * PAGE)

        def _hosts(self, first: int, n: int) -> np.ndarray:
            calls.append((first, n))
            return np.arange(first, first + n, dtype=np.int64) * 7 + 1

    got = hosts_of(Fake()._hosts, Fake.ram.size, [5, 3, 4, 9, 0, 9])
    assert sorted(got) == [0, 3, 4, 5, 9]
    for c, hosts in got.items():
        n = per - 8 if c == 9 else per
        assert np.array_equal(hosts, np.arange(c * per, c * per + n) * 7 + 1), c
    assert calls == [(0, per), (3 * per, 3 * per), (9 * per, per - 8)]
