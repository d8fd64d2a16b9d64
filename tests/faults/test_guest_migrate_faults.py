"""Disk full and I/O errors under the guest's own disk writes, and ``migrate`` to a full file.

Guest writes: the ``disk`` workload writes and reads back sectors of disk0; with
``werror=report``, when the file system is full (or the file fails) its requests complete with
an error status, the guest sees the mismatch (its error counter) and keeps running (the
default, ``werror=enospc``, pauses it: test_werror.py), every cluster a failed write took is given back, and the
snapshot saved before still loads, on the still-full disk.  Once the disk works again the
guest's writes succeed again.

``migrate`` to ``file:/dev/full`` (every write: ENOSPC), with and without background-snapshot:
the migration fails with QEMU's ``Unable to write to file: No space left on device``, the guest
runs on, and the next migration (and a copy-on-write save) works.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from emulator.guest import WorkloadSpec
from emulator.machine import Machine
from emulator.migration.engines import SAVE_ENGINES
from tests.faults.conftest import (
    DISKS,
    assert_runs,
    blkdebug,
    disk_files,
    fingerprint,
    names,
    no_leaks,
    wait_until,
)

DISK = WorkloadSpec("disk", seed=3)


def disk_ops(m: Machine) -> int:
    return int(m.ram.read_u64(0x7010))


def guest_errors(m: Machine) -> int:
    return int(m.ram.read_u64(0x7018))


def test_guest_disk_writes_fail_cleanly(make_vm, qemu_img, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = make_vm(workload=DISK, werror="report")  # the default (enospc) pauses: test_werror.py
    q = m.qmp()
    files = disk_files(tmp_path)
    wait_until(lambda: disk_ops(m) > 20, "the guest to write its disk")
    q.execute("stop")
    m.snapshots.save_snapshot("base", False, "disk0", list(DISKS))
    base = fingerprint(m)
    listed = names(m)
    q.execute("cont")
    f = blkdebug(m, "disk0")
    for rule in ("full", "eio"):
        errors = guest_errors(m)
        if rule == "full":
            f.fill(0)
            wait_until(lambda: f.failures >= 5 and guest_errors(m) > errors, "guest writes to fail")  # noqa: B023
        else:  # five writes fail, one at a time (a disk that fails every write cannot free either)
            for _ in range(5):
                fired = f.failures
                f.fail_nth(1, errno.EIO, ("pwrite",))
                wait_until(lambda: f.failures > fired, "a guest write to fail")  # noqa: B023
            wait_until(lambda: guest_errors(m) > errors, "the guest to see it")  # noqa: B023
        assert_runs(m)
        q.execute("stop")
        no_leaks(m, qemu_img, files)  # what the failed writes took is given back
        assert names(m) == listed
        m.snapshots.load_snapshot("base", "disk0", list(DISKS))  # still failing: reuses clusters it holds
        assert fingerprint(m) == base
        no_leaks(m, qemu_img, files)
        f.clear()
        q.execute("cont")
        ops, errors = disk_ops(m), guest_errors(m)
        wait_until(lambda: disk_ops(m) > ops + 20, "guest writes to succeed again")  # noqa: B023
        assert guest_errors(m) == errors


def migrate(m: Machine, uri: str) -> dict[str, Any]:
    q = m.qmp()
    q.execute("migrate", {"uri": uri})
    wait_until(lambda: q.execute("query-migrate")["status"] in ("completed", "failed", "cancelled"),
               "the migration to end")
    info: dict[str, Any] = q.execute("query-migrate")
    return info


@pytest.mark.parametrize("background", [False, True], ids=["stop-and-copy", "background-snapshot"])
def test_migrate_to_a_full_file(background: bool, make_vm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = make_vm(workload=WorkloadSpec("dirty", seed=5, working_set=8 << 20, batch_pages=16))
    q = m.qmp()
    q.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True}, {"capability": "background-snapshot", "state": background}]})
    info = migrate(m, "file:/dev/full")
    assert info["status"] == "failed", info
    assert info["error-desc"] == "Unable to write to file: No space left on device"
    assert_runs(m)  # QEMU resumes a guest that was running when the migration fails
    if background:  # the write-protect machinery is left as it was: a copy-on-write save works
        cow = next(e for e in SAVE_ENGINES if e.write_protects)
        m.snapshots.save_snapshot("after", False, "disk0", ["disk0"], cow.name)
        assert_runs(m)
    out = tmp_path / "stream"
    info = migrate(m, f"file:{out}")
    assert info["status"] == "completed", info
    assert out.stat().st_size > 0
    assert m.state.value == ("running" if background else "postmigrate")
