"""The guest's disk errors under QEMU's ``werror``/``rerror`` policies (blk_get_error_action).

The ``disk`` workload writes 8 sectors of disk0, reads them back and compares.  A request the
disk fails is handled as QEMU 7.2's virtio-blk handles it:

* the default, ``werror=enospc``: a full disk (ENOSPC) pauses the VM in ``io-error``
  (BLOCK_IO_ERROR with ``action: stop``, then STOP; ``query-block`` says ``io-status: nospace``);
  the guest sees no error; the request stays in flight, is part of a snapshot taken meanwhile,
  and is done when the VM is resumed (``cont`` once there is room, or after loading that
  snapshot); any other errno is reported to the guest (``action: report``);
* ``stop`` pauses on every error (``io-status: failed`` for EIO), ``rerror=stop`` on reads;
* ``ignore`` completes the request as done (the guest's read-back then mismatches).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from emulator.block.io import BlkdebugFile
from emulator.guest import WorkloadSpec
from emulator.machine import Machine
from emulator.qmp.client import QMPClient
from tests.faults.conftest import DISKS, assert_runs, blkdebug, disk_files, no_leaks, wait_until
from tests.vcpu_stack import vcpu_waits_at_the_gate

DISK = WorkloadSpec("disk", seed=3)


def disk_ops(m: Machine) -> int:
    return int(m.ram.read_u64(0x7010))


def guest_errors(m: Machine) -> int:
    return int(m.ram.read_u64(0x7018))


def io_status(q: QMPClient) -> dict[str, str]:
    return {b["qdev"].split("/")[3]: b["io-status"] for b in q.execute("query-block") if "io-status" in b}


def error_event(q: QMPClient) -> dict[str, object]:
    """The next BLOCK_IO_ERROR event's data (waited for, on the client that saw it come)."""
    return dict(q.wait_event("BLOCK_IO_ERROR", timeout=30).data)


def running_disk_guest(m: Machine) -> tuple[QMPClient, BlkdebugFile, int]:
    """The guest's disk writes under way; its client (events so far dropped), disk0's fault
    layer, and the guest's error count."""
    q = m.qmp()
    wait_until(lambda: disk_ops(m) > 5, "the guest to use its disk")
    q.events()
    return q, blkdebug(m, "disk0"), guest_errors(m)


def test_a_full_disk_pauses_the_guest_and_the_write_is_done_at_resume(make_vm, qemu_img,  # type: ignore[no-untyped-def]
                                                                      tmp_path: Path) -> None:
    m = make_vm(workload=DISK)
    q, f, errors = running_disk_guest(m)
    f.fill(0)
    assert error_event(q) == {"device": "", "node-name": "disk0", "operation": "write", "action": "stop",
                              "nospace": True, "reason": "No space left on device"}
    q.wait_event("STOP", timeout=30)
    assert q.execute("query-status") == {"status": "io-error", "singlestep": False, "running": False}
    assert io_status(q) == {"disk0-dev": "nospace", "disk1-dev": "ok"}
    assert guest_errors(m) == errors  # the guest saw nothing: its request is still in flight
    ops = disk_ops(m)

    # Room again, but nothing is retried until the VM resumes.  A snapshot taken now holds the
    # request in flight (the VM stays in io-error across it, as QEMU's savevm leaves it).
    f.clear()
    q.execute("snapshot-save", {"job-id": "s", "tag": "inflight", "vmstate": "disk1", "devices": list(DISKS)})
    assert "error" not in q.wait_job("s")
    assert q.execute("query-status")["status"] == "io-error"
    assert disk_ops(m) == ops

    q.execute("cont")  # io-status back to ok, the request done, the guest on
    assert io_status(q) == {"disk0-dev": "ok", "disk1-dev": "ok"}
    wait_until(lambda: disk_ops(m) > ops + 5, "the guest's writes to go on")
    assert guest_errors(m) == errors
    assert_runs(m)

    # Loading the snapshot brings the request back; resumed, it is done and the guest goes on.
    q.execute("stop")
    q.execute("snapshot-load", {"job-id": "l", "tag": "inflight", "vmstate": "disk1", "devices": list(DISKS)})
    assert "error" not in q.wait_job("l")
    assert disk_ops(m) == ops
    q.execute("cont")
    wait_until(lambda: disk_ops(m) > ops + 5, "the loaded guest's writes to go on")
    assert guest_errors(m) == errors
    q.execute("stop")
    no_leaks(m, qemu_img, disk_files(tmp_path))


def test_other_errors_are_reported_to_the_guest_by_default(make_vm) -> None:  # type: ignore[no-untyped-def]
    m = make_vm(workload=DISK)
    q, f, errors = running_disk_guest(m)
    f.fail_nth(1, errno.EIO, ("pwrite",))
    assert error_event(q) == {"device": "", "node-name": "disk0", "operation": "write", "action": "report",
                              "nospace": False, "reason": "Input/output error"}
    wait_until(lambda: guest_errors(m) > errors, "the guest to see the error")
    assert_runs(m)
    assert io_status(q) == {"disk0-dev": "ok", "disk1-dev": "ok"}
    assert "STOP" not in [e.event for e in q.events()]


@pytest.mark.parametrize(("policy", "kind", "operation"), [("werror", "pwrite", "write"), ("rerror", "pread", "read")])
def test_stop_pauses_on_any_error(policy: str, kind: str, operation: str, make_vm) -> None:  # type: ignore[no-untyped-def]
    m = make_vm(workload=DISK, **{policy: "stop"})
    q, f, errors = running_disk_guest(m)
    f.fail_nth(1, errno.EIO, (kind,), times=None)
    assert error_event(q) == {"device": "", "node-name": "disk0", "operation": operation, "action": "stop",
                              "nospace": False, "reason": "Input/output error"}
    q.wait_event("STOP", timeout=30)
    assert q.execute("query-status")["status"] == "io-error"
    assert io_status(q)["disk0-dev"] == "failed"
    # Resumed while the disk still fails: the retry fails again and the VM pauses again.
    q.execute("cont")
    assert error_event(q)["action"] == "stop"
    wait_until(lambda: q.execute("query-status")["status"] == "io-error", "the VM to pause again")
    f.clear()
    ops = disk_ops(m)
    q.execute("cont")
    wait_until(lambda: disk_ops(m) > ops + 5, "the guest to go on")
    assert guest_errors(m) == errors


def test_ignore_completes_the_failed_request_as_done(make_vm) -> None:  # type: ignore[no-untyped-def]
    m = make_vm(workload=DISK, werror="ignore")
    q, f, _ = running_disk_guest(m)
    f.fill(0)
    assert error_event(q)["action"] == "ignore"
    assert_runs(m)
    assert "STOP" not in [e.event for e in q.events()]
    f.clear()


def test_a_reset_drops_the_request_in_flight(make_vm) -> None:  # type: ignore[no-untyped-def]
    m = make_vm(workload=DISK)
    q, f, _ = running_disk_guest(m)
    f.fill(0)
    wait_until(lambda: q.execute("query-status")["status"] == "io-error", "the VM to pause")
    assert m.disk.pending is not None
    ops = disk_ops(m)
    q.execute("system_reset")
    assert m.disk.pending is None
    assert q.execute("query-status")["status"] == "prelaunch"
    f.clear()
    q.execute("cont")
    wait_until(lambda: disk_ops(m) != ops, "the rebooted guest to write its disk")


def test_a_retry_waits_while_a_snapshot_holds_the_disk(make_vm) -> None:  # type: ignore[no-untyped-def]
    """The request is done again as the guest resumes, but not while the disk is drained
    (hold_block_io, as a snapshot's freeze holds it): it waits like a guest access would."""
    m = make_vm(workload=DISK)
    q, f, errors = running_disk_guest(m)
    f.fill(0)
    wait_until(lambda: q.execute("query-status")["status"] == "io-error", "the VM to pause")
    f.clear()
    ops = disk_ops(m)
    release = m.hold_block_io()
    try:
        q.execute("cont")
        wait_until(vcpu_waits_at_the_gate, "the retry to wait for the drain")
        assert m.disk.pending is not None and disk_ops(m) == ops
    finally:
        release()
    wait_until(lambda: disk_ops(m) > ops + 5, "the guest to go on")
    assert guest_errors(m) == errors
