"""Disk full and I/O errors during a save, for every save engine of the registry.

A snapshot ``base`` is taken first (guest stopped, its RAM and disks fingerprinted); a probe
save counts each disk's writes; then faults are injected at several points below either
disk (the VM-state node's first write, half-way through its writes, the other node's first,
middle and last write, the last being the flush) and finally the VM-state disk fills up.
Each failed save must fail as QEMU's does (GenericError, ``Error while writing VM state: ...``
or ``Could not create snapshot 'bad' on 'diskN': ...``), leave the guest running, leave the
snapshot table as it was, give back every cluster it took (our check and ``qemu-img check``:
no leak, no corruption) and, on the still-full disk, let ``base`` load with every load engine.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from emulator.guest import WorkloadSpec
from emulator.migration.engine import SaveEngine
from emulator.migration.engines import LOAD_ENGINES, SAVE_ENGINES
from tests.faults.conftest import (
    DISKS,
    assert_runs,
    blkdebug,
    disk_files,
    fails,
    fingerprint,
    names,
    no_leaks,
    progress,
    used,
    wait_until,
)

WRITES = ("pwrite", "truncate", "flush")
DIRTY = WorkloadSpec("dirty", seed=7, working_set=4 << 20, batch_pages=16)  # RAM only: disk writes are the save's


def failed_save(node: str, strerror: str) -> str:
    """The texts a failed save may end with: QEMU's for the VM state or for a table entry."""
    return (rf"(Error while writing VM state|Could not create snapshot 'bad' on '{node}'): {strerror}")


@pytest.mark.parametrize("engine", SAVE_ENGINES, ids=lambda e: e.name)
def test_a_failed_save_changes_nothing(engine: type[SaveEngine], make_vm, qemu_img, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = make_vm(workload=DIRTY, ram=16 << 20)
    q = m.qmp()
    files = disk_files(tmp_path)
    save_bad = lambda: m.snapshots.save_snapshot("bad", False, "disk0", list(DISKS), engine.name)  # noqa: E731
    wait_until(lambda: progress(m) > 2000, "the guest to dirty its working set")  # VM states of MiBs
    q.execute("stop")
    m.snapshots.save_snapshot("base", False, "disk0", list(DISKS))
    base = fingerprint(m)
    q.execute("cont")
    f = {d: blkdebug(m, d) for d in DISKS}
    before = {d: sum(f[d].counts[k] for k in WRITES) for d in DISKS}
    m.snapshots.save_snapshot("probe", False, "disk0", list(DISKS), engine.name)
    writes = {d: sum(f[d].counts[k] for k in WRITES) - before[d] for d in DISKS}
    assert writes["disk0"] > 4 and writes["disk1"] > 2, writes
    listed = names(m)
    in_use = used(m)

    # The VM-state disk's file system is full (the image's free clusters cannot hold the VM
    # state), and stays full.
    f["disk0"].fill(0)
    fails(save_bad, failed_save("disk0", "No space left on device"))
    assert names(m) == listed
    assert used(m) == in_use
    assert_runs(m)
    q.execute("stop")
    no_leaks(m, qemu_img, files)
    for load in LOAD_ENGINES:  # every snapshot saved before loads, on the still-full disk
        m.snapshots.load_snapshot("base", "disk0", list(DISKS), engine=load.name)
        assert m.state.value == "paused", (load.name, m.state)
        assert fingerprint(m) == base, load.name
    assert f["disk0"].room == 0
    f["disk0"].clear()
    q.execute("cont")

    # The VM-state node's writes vary with the guest (pre-copy rounds): its second point is early.
    # The other node (commit writes only): its first, third and first flush (the commit's, or
    # the one after it).
    cases = [("disk0", 1, errno.EIO, WRITES), ("disk0", min(writes["disk0"] // 2, 9), errno.ENOSPC, WRITES),
             ("disk1", 1, errno.ENOSPC, WRITES), ("disk1", 3, errno.EIO, WRITES),
             ("disk1", 1, errno.EIO, ("flush",))]
    for node, nth, err, kinds in cases:
        f[node].fail_nth(nth, err, kinds)
        fired = f[node].failures
        if node == "disk1":
            pattern = rf"Could not create snapshot 'bad' on 'disk1': {os.strerror(err)}"
        else:
            pattern = failed_save(node, os.strerror(err))
        fails(save_bad, pattern)
        assert f[node].failures == fired + 1, (node, nth)
        f[node].clear()
        assert names(m) == listed, (node, nth)
        assert used(m) == in_use, (node, nth)
        assert_runs(m)
        q.execute("stop")
        no_leaks(m, qemu_img, files)
        q.execute("cont")
