"""The group commit of a save over two disks (engine.EngineContext: commit, freeze, finish,
abort) when one disk fails in the middle, and the give-back fails too.

QEMU's bdrv_all_create_snapshot() reports the node that failed ("Could not create snapshot
'x' on 'disk1': <strerror>") and save_snapshot() deletes the entries the other nodes got.
Here the second disk refuses, and then the first refuses the give-back: the error reported
must still be the second disk's (not the give-back's), no entry of the failed snapshot may
stay on either disk, and the only damage allowed is the leak the image reported.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emulator.block import Qcow2Image
from tests.faults.conftest import (
    DISKS,
    assert_runs,
    blkdebug,
    disk_files,
    fails,
    image,
    names,
    no_leaks,
)


def refuse_then(img: Qcow2Image, method: str, before: Callable[[], None]) -> None:
    """``img.<method>`` runs ``before`` (which arms the faults), then the real method."""
    real = getattr(img, method)

    def wrapped(*args: Any, **kw: Any) -> Any:
        before()
        return real(*args, **kw)

    setattr(img, method, wrapped)


@pytest.mark.parametrize("stage", ["freeze", "finish"])
def test_the_second_disk_fails_and_its_error_is_the_one_reported(stage: str, make_vm, qemu_img,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    m = make_vm(ram=16 << 20)
    q = m.qmp()
    m.snapshots.save_snapshot("base", False, "disk0", list(DISKS), "cow")
    listed = names(m)
    f0, f1 = blkdebug(m, "disk0"), blkdebug(m, "disk1")

    def arm() -> None:
        # From now on disk1 is full; at the freeze, disk0 also fails every write, so giving
        # back what its freeze took fails too (at the finish, disk0's entry is already written
        # and must be deleted again: that write has to work).
        f1.fail_nth(1, errno.ENOSPC, times=None)
        if stage == "freeze":
            f0.fail_nth(1, errno.EIO, times=None)

    refuse_then(image(m, "disk1"), "snapshot_prepare" if stage == "freeze" else "snapshot_finish", arm)
    fails(lambda: m.snapshots.save_snapshot("bad", False, "disk0", list(DISKS), "cow"),
          r"Could not create snapshot 'bad' on 'disk1': No space left on device")
    f0.clear()
    f1.clear()
    assert names(m) == listed
    assert_runs(m)
    q.execute("stop")
    no_leaks(m, qemu_img, disk_files(tmp_path))
    m.snapshots.load_snapshot("base", "disk0", list(DISKS))
    assert m.state.value == "paused"


def test_a_refused_table_entry_names_the_node_and_the_cause(make_vm) -> None:  # type: ignore[no-untyped-def]
    """The blocking save's commit: the second disk's entry refused -> its strerror, not the block
    layer's "Could not write at offset ..."; the first disk's entry deleted again."""
    m = make_vm(ram=16 << 20)
    listed = names(m)
    img1 = image(m, "disk1")
    f1 = blkdebug(m, "disk1")
    refuse_then(img1, "snapshot_create", lambda: f1.fail_nth(1, errno.EIO, times=None))
    fails(lambda: m.snapshots.save_snapshot("bad", False, "disk0", list(DISKS), "blocking"),
          r"Could not create snapshot 'bad' on 'disk1': Input/output error")
    f1.clear()
    assert names(m) == listed
    assert_runs(m)
