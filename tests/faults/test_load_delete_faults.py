"""Disk full and I/O errors during a load (every load engine of the registry) and a delete.

A failed load ends as QEMU's does: GenericError, ``Could not load snapshot 'base' on 'diskN':
Failed to load snapshot: <strerror>`` when a disk cannot be reverted, ``Error -5 while loading
VM state: ...`` when the VM state cannot be read (a lazy engine whose RAM fill fails after the
resume says so, docs/deviations.md 40); the VM stopped (``restore-vm``, or ``internal-error``
for that lazy fill).  A failed delete ends with ``Could not delete snapshot 'x' on 'diskN':
Failed to remove snapshot from snapshot list: <strerror>`` and the guest keeps running.
Afterwards: the snapshot table as it was (a delete that failed on the second node has, as in
QEMU, already deleted the first node's entry), no leaked cluster, ``qemu-img check`` clean,
and ``base`` loads with its saved content.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from emulator.guest import WorkloadSpec
from emulator.machine import Machine
from emulator.migration.engine import LoadEngine
from emulator.migration.engines import LOAD_ENGINES
from tests.faults.conftest import (
    DISKS,
    assert_runs,
    blkdebug,
    disk_files,
    fails,
    fingerprint,
    image,
    names,
    no_leaks,
    progress,
    used,
    wait_until,
)

DIRTY = WorkloadSpec("dirty", seed=9, working_set=4 << 20, batch_pages=16)
IO = "Input/output error"


def load_failed(node: str, strerror: str) -> str:
    return (rf"Could not load snapshot 'base' on '{node}': Failed to load snapshot: {strerror}"
            rf"|Error -5 while loading VM state: {IO}"
            rf"|lazy restore could not read the snapshot's RAM: .*{IO}")


def reload_base(m: Machine, engine: str, base: dict[str, str]) -> None:
    """The fault gone: the VM as a failed load leaves it is loaded again, with base's content."""
    q = m.qmp()
    if m.state.needs_reset:
        q.execute("system_reset")
    if m.state.value == "running":
        q.execute("stop")
    m.snapshots.load_snapshot("base", "disk0", list(DISKS), engine=engine)
    assert fingerprint(m) == base, engine
    assert all(image(m, d).io_error is None for d in DISKS)


@pytest.mark.parametrize("engine", LOAD_ENGINES, ids=lambda e: e.name)
def test_a_failed_load_stops_the_vm_and_changes_no_snapshot(engine: type[LoadEngine], make_vm, qemu_img,  # type: ignore[no-untyped-def]
                                                            tmp_path: Path) -> None:
    m = make_vm(workload=DIRTY, ram=16 << 20)
    q = m.qmp()
    files = disk_files(tmp_path)
    wait_until(lambda: progress(m) > 2000, "the guest to dirty its working set")
    q.execute("stop")
    m.snapshots.save_snapshot("base", False, "disk0", list(DISKS))
    base = fingerprint(m)
    f = {d: blkdebug(m, d) for d in DISKS}
    w1 = f["disk1"].counts["pwrite"]
    m.snapshots.load_snapshot("base", "disk0", list(DISKS), engine=engine.name)  # the probe
    w1 = f["disk1"].counts["pwrite"] - w1
    assert w1 >= 3, w1
    # base's VM state past its first cluster (RAM pages): reads of it fail.
    hosts, _ = image(m, "disk0").snapshot_vmstate_map("base")
    hosts = hosts[hosts > 0]
    assert len(hosts) > 8, hosts
    ram = (int(hosts[1:].min()), int(hosts.max()) + image(m, "disk0").cluster_size)
    listed = names(m)
    in_use = used(m)
    cases = [("disk0", errno.ENOSPC, "pwrite", None), ("disk1", errno.EIO, "pwrite", None),
             ("disk0", errno.EIO, "pread", ram)]
    for node, err, kind, span in cases:
        q.execute("cont")
        f[node].fail_nth(1, err, (kind,), times=None, span=span)
        fired = f[node].failures
        fails(lambda: m.snapshots.load_snapshot("base", "disk0", list(DISKS), engine=engine.name),
              load_failed(node, os.strerror(err)))
        f[node].clear()
        assert f[node].failures > fired, (node, kind)
        assert m.state.value in ("restore-vm", "internal-error"), (node, kind, m.state)
        assert names(m) == listed
        assert used(m) == in_use, (node, kind)
        no_leaks(m, qemu_img, files)
        reload_base(m, engine.name, base)
    no_leaks(m, qemu_img, files)


def test_a_failed_delete_keeps_the_snapshot(make_vm, qemu_img, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = make_vm(workload=DIRTY, ram=16 << 20)
    q = m.qmp()
    files = disk_files(tmp_path)
    q.execute("stop")
    m.snapshots.save_snapshot("base", False, "disk0", list(DISKS))
    base = fingerprint(m)
    q.execute("cont")
    m.snapshots.save_snapshot("victim", False, "disk0", list(DISKS))
    f = {d: blkdebug(m, d) for d in DISKS}
    m.snapshots.save_snapshot("probe", False, "disk0", list(DISKS))
    # The delete's writes, counted to its last header write (the switch to the new state);
    # after it come only the best-effort writes that keep spare clusters for the next commit.
    offsets: list[int] = []
    real = f["disk0"].pwrite
    f["disk0"].pwrite = lambda off, data, *a, **kw: (offsets.append(off), real(off, data, *a, **kw))[1]  # type: ignore[method-assign]
    try:
        m.snapshots.delete_snapshot("probe", list(DISKS))
    finally:
        del f["disk0"].pwrite
    w0 = max(i for i, off in enumerate(offsets, 1) if off < 512)
    assert w0 >= 3, offsets
    listed = names(m)
    in_use = used(m)
    delete = lambda: m.snapshots.delete_snapshot("victim", list(DISKS))  # noqa: E731
    for nth, err in ((1, errno.ENOSPC), (w0 // 2, errno.EIO), (w0, errno.EIO)):
        f["disk0"].fail_nth(nth, err, ("pwrite",))
        fails(delete, rf"Could not delete snapshot 'victim' on 'disk0': "
                      rf"Failed to remove snapshot from snapshot list: {os.strerror(err)}")
        f["disk0"].clear()
        assert names(m) == listed, nth
        assert used(m) == in_use, nth
        assert_runs(m)
        q.execute("stop")
        no_leaks(m, qemu_img, files)
        q.execute("cont")
    # The second node fails: the first one's entry is gone already (bdrv_all_delete_snapshot
    # stops at the first error), the second keeps its own; deleting again finishes the job.
    f["disk1"].fail_nth(1, errno.EIO, ("pwrite",))
    fails(delete, rf"Could not delete snapshot 'victim' on 'disk1': "
                  rf"Failed to remove snapshot from snapshot list: {IO}")
    assert "victim" not in names(m)["disk0"] and "victim" in names(m)["disk1"]
    assert_runs(m)
    delete()
    assert names(m) == {d: ["base"] for d in DISKS}
    # A file system with no room left: a delete and a load reuse clusters the image holds.
    m.snapshots.save_snapshot("late", False, "disk0", list(DISKS))
    f["disk0"].fill(0)
    m.snapshots.delete_snapshot("late", list(DISKS))
    q.execute("stop")
    no_leaks(m, qemu_img, files)
    m.snapshots.load_snapshot("base", "disk0", list(DISKS))
    assert fingerprint(m) == base
