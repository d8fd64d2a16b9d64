"""snapshot-save / -load / -delete and HMP savevm/loadvm/delvm: QEMU 7.2's texts and event sequences
(docs/reference/qemu-7.2-qmp.md, section 6), and the deliberate differences of docs/deviations.md."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest

from emulator.guest import WorkloadSpec
from emulator.qmp.client import QMPClient

A = {"job-id": "j0", "tag": "snapx", "vmstate": "disk0", "devices": ["disk0"]}


def snaps(q: QMPClient, node: str) -> list[str]:
    for n in q.execute("query-named-block-nodes"):
        if n["node-name"] == node:
            return [s["name"] for s in n["image"].get("snapshots", [])]
    raise AssertionError(node)


def run_job(q: QMPClient, cmd: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Run a snapshot job to its end; returns its query-jobs entry and the event sequence."""
    q.events()
    assert q.execute(cmd, args) == {}
    info = q.wait_job(args["job-id"], 60)
    q.execute("job-dismiss", {"id": args["job-id"]})
    seq = []
    for e in q.events():
        if e.event == "JOB_STATUS_CHANGE":
            seq.append(e.data["status"])
        elif e.event in ("STOP", "RESUME"):
            seq.append(e.event)
    # wait_job took "concluded" from the queue: put it back where it belongs (before null)
    seq.insert(len(seq) - 1, "concluded")
    return info, seq


OK = ["created", "running", "STOP", "RESUME", "waiting", "pending", "concluded", "null"]
OK_PAUSED = ["created", "running", "waiting", "pending", "concluded", "null"]
FAIL = ["created", "running", "aborting", "concluded", "null"]
LOAD_FAIL = ["created", "running", "STOP", "aborting", "concluded", "null"]


def test_save_cases_like_qemu(make_vm) -> None:  # type: ignore[no-untyped-def]
    q = make_vm().qmp()
    for args, err in [
        ({**A, "job-id": "s1", "tag": "snap1"}, None),
        ({**A, "job-id": "s2", "tag": "snap2", "devices": ["disk0", "disk1"]}, None),
        ({**A, "job-id": "s3", "tag": "snap3", "vmstate": "disk1", "devices": ["disk0", "disk1"]}, None),
        ({**A, "job-id": "dup", "tag": "snap1"}, "Snapshot 'snap1' already exists in one or more devices"),
        ({**A, "job-id": "s4", "tag": "s4", "devices": ["disk1"]}, "vmstate block device 'disk0' does not exist"),
        ({**A, "job-id": "s5", "tag": "s5", "vmstate": "fw-vars"}, "vmstate block device 'fw-vars' does not exist"),
        ({**A, "job-id": "s5b", "tag": "s5", "vmstate": "fw-vars", "devices": ["fw-vars"]},
         "Device 'fw-vars' is writable but does not support snapshots"),
        ({**A, "job-id": "s6", "tag": "s6", "devices": ["disk0", "fw-vars"]},
         "Device 'fw-vars' is writable but does not support snapshots"),
        ({**A, "job-id": "s7b", "tag": "s7b", "devices": ["disk0", "disk0-file"]},
         "Device 'disk0-file' is writable but does not support snapshots"),
        ({**A, "job-id": "s8", "tag": "s8", "devices": ["disk0", "nope"]}, "No block device node 'nope'"),
        ({**A, "job-id": "s9", "tag": "s9", "vmstate": "nope"}, "vmstate block device 'nope' does not exist"),
        ({**A, "job-id": "s10", "tag": "s10", "devices": []}, "At least one device is required for snapshot"),
        ({**A, "job-id": "s11", "tag": "s11", "vmstate": ""}, "vmstate block device '' does not exist"),
        ({**A, "job-id": "s12", "tag": ""}, None),
        ({**A, "job-id": "s14", "tag": "s14", "devices": ["disk0-dev"]}, "No block device node 'disk0-dev'"),
    ]:
        info, seq = run_job(q, "snapshot-save", args)
        assert info.get("error") == err, args
        assert seq == (OK if err is None else FAIL), args
        assert (info["current-progress"], info["total-progress"]) == (1, 1)
        assert q.execute("query-status")["status"] == "running"
    # Immediate (QAPI and job-id) errors.
    for args, text in [
        ({k: v for k, v in A.items() if k != "job-id"}, "Parameter 'job-id' is missing"),
        ({**A, "tag": 123}, "Invalid parameter type for 'tag', expected: string"),
        ({**A, "devices": [1]}, "Invalid parameter type for 'devices[0]', expected: string"),
        ({**A, "foo": 1}, "Parameter 'foo' is unexpected"),
        ({**A, "job-id": "1bad"}, "Invalid job ID '1bad'"),
        ({**A, "job-id": "a b"}, "Invalid job ID 'a b'"),
    ]:
        with pytest.raises(Exception, match=re.escape(text)):
            q.execute("snapshot-save", args)
    with pytest.raises(Exception, match="Parameter 'vmstate' is unexpected"):
        q.execute("snapshot-delete", A)
    with pytest.raises(Exception, match="Parameter 'overwrite' is unexpected"):
        q.execute("snapshot-load", {**A, "overwrite": True})
    # Job ids stay taken until dismissed.
    q.execute("snapshot-save", {**A, "job-id": "keep", "tag": "keep"})
    q.wait_job("keep")
    with pytest.raises(Exception, match="Job ID 'keep' already in use"):
        q.execute("snapshot-delete", {"job-id": "keep", "tag": "x", "devices": ["disk0"]})
    q.execute("job-dismiss", {"id": "keep"})


def test_load_and_delete_cases_like_qemu(make_vm) -> None:  # type: ignore[no-untyped-def]
    q = make_vm().qmp()
    run_job(q, "snapshot-save", {**A, "job-id": "s1", "tag": "snap1"})
    run_job(q, "snapshot-save", {**A, "job-id": "s2", "tag": "snap2", "devices": ["disk0", "disk1"]})
    for args, err in [
        ({**A, "job-id": "l1", "tag": "snap1"}, None),
        ({**A, "job-id": "l2", "tag": "snap2", "devices": ["disk0", "disk1"]}, None),
        ({**A, "job-id": "l3", "tag": "nope"}, "Snapshot 'nope' does not exist in one or more devices"),
        ({**A, "job-id": "l4", "tag": "snap1", "devices": ["disk0", "disk1"]},
         "Snapshot 'snap1' does not exist in one or more devices"),
        ({**A, "job-id": "l5", "tag": "snap2", "vmstate": "disk1", "devices": ["disk0", "disk1"]},
         "This is a disk-only snapshot. Revert to it  offline using qemu-img"),
        ({**A, "job-id": "l7", "tag": "snap2", "devices": ["disk1"]}, "vmstate block device 'disk0' does not exist"),
        ({**A, "job-id": "l8", "tag": "snap1", "devices": ["disk0", "fw-vars"]},
         "Device 'fw-vars' is writable but does not support snapshots"),
        ({**A, "job-id": "l9", "tag": "snap1", "devices": ["nope"]}, "No block device node 'nope'"),
        ({**A, "job-id": "l10", "tag": "1"}, "Snapshot '1' does not exist in one or more devices"),
    ]:
        info, seq = run_job(q, "snapshot-load", args)
        assert info.get("error") == err, args
        if err is None:
            assert seq == OK
        else:
            assert seq == LOAD_FAIL, args
            assert q.execute("query-status") == {"status": "restore-vm", "singlestep": False, "running": False}
            q.execute("cont")
    q.execute("stop")
    info, seq = run_job(q, "snapshot-save", {**A, "job-id": "p", "tag": "snapP"})
    assert "error" not in info and seq == OK_PAUSED and q.execute("query-status")["status"] == "paused"
    info, seq = run_job(q, "snapshot-load", {**A, "job-id": "lp", "tag": "snapP"})
    assert "error" not in info and seq == OK_PAUSED and q.execute("query-status")["status"] == "paused"
    q.execute("cont")
    for args, err in [
        ({"job-id": "d1", "tag": "snap2", "devices": ["disk0", "disk1"]}, None),
        ({"job-id": "d2", "tag": "nope", "devices": ["disk0"]}, None),
        ({"job-id": "d4", "tag": "snap1", "devices": ["disk0", "fw-vars"]},
         "Device 'fw-vars' is writable but does not support snapshots"),
        ({"job-id": "d5", "tag": "snap1", "devices": ["nope"]}, "No block device node 'nope'"),
        ({"job-id": "d6", "tag": "snap1", "devices": []}, "At least one device is required for snapshot"),
    ]:
        info, seq = run_job(q, "snapshot-delete", args)
        assert info.get("error") == err
        assert seq == (["created", "running", "waiting", "pending", "concluded", "null"] if err is None else FAIL)
    assert "snap2" not in snaps(q, "disk0") + snaps(q, "disk1") and "snap1" in snaps(q, "disk0")


def test_hmp_with_raw_and_qcow2_varstore(make_vm) -> None:  # type: ignore[no-untyped-def]
    q = make_vm().qmp()
    q.events()
    err = "Error: Device 'fw-vars' is writable but does not support snapshots\r\n"
    for cmd in ("savevm snap1", "loadvm snap1", "delvm snap1", "savevm"):
        assert q.hmp(cmd) == err
    assert q.hmp("info snapshots") == "There is no snapshot available.\r\n"
    # The failed loadvm stopped the VM (STOP, no RESUME), as in QEMU 7.2.
    assert [e.event for e in q.events()] == ["STOP"]
    assert q.execute("query-status")["status"] == "restore-vm"

    q2 = make_vm(vars_format="qcow2", sub="q2").qmp()
    q2.events()
    assert q2.hmp("savevm snap1") == ""
    assert [e.event for e in q2.events()] == ["STOP", "RESUME"]
    out = q2.hmp("info snapshots")
    assert out.startswith("List of snapshots present on all disks:\r\nID        TAG               VM SIZE")
    assert "\r\n--        snap1    " in out
    assert q2.hmp("savevm snap1") == ""  # HMP overwrites
    assert q2.hmp("info snapshots").count("snap1") == 1
    assert q2.hmp("loadvm snap1") == ""
    assert q2.hmp("loadvm nope") == "Error: Snapshot 'nope' does not exist in one or more devices\r\n"
    assert q2.execute("query-status")["status"] == "restore-vm"
    assert q2.hmp("delvm nope") == ""
    assert q2.hmp("delvm snap1") == ""
    assert q2.hmp("info snapshots") == "There is no snapshot available.\r\n"
    q2.events()
    assert q2.hmp("savevm") == ""  # still stopped: no events, an automatic name
    assert q2.events() == []
    assert re.search(r"--        vm-\d{14} ", q2.hmp("info snapshots"))


def test_second_snapshot_operation_while_one_runs(make_vm) -> None:  # type: ignore[no-untyped-def]
    m = make_vm()
    q = m.qmp()
    ctl = m.snapshots.ctx  # the engines read the save handlers from here
    gate = threading.Event()
    orig = ctl.handlers

    def slow_handlers():  # type: ignore[no-untyped-def]
        gate.wait(120)
        return orig()

    ctl.handlers = slow_handlers
    q.execute("snapshot-save", {**A, "job-id": "first", "tag": "a"})
    end = time.monotonic() + 60  # the monitor answers meanwhile; the job waits at the gate
    while q.execute("query-jobs")[0]["status"] != "running":
        assert time.monotonic() < end
        time.sleep(0.005)
    q.execute("snapshot-save", {**A, "job-id": "second", "tag": "b", "vmstate": "disk1", "devices": ["disk1"]})
    info = q.wait_job("second", 10)
    assert "Another snapshot operation is in progress" in info["error"]
    gate.set()
    assert "error" not in q.wait_job("first", 30)
    assert snaps(q, "disk0") == ["a"]
    assert snaps(q, "disk1") == []  # nothing half-written on disk1


def test_background_snapshot_capability_leaves_the_internal_snapshot_alone(make_vm) -> None:  # type: ignore[no-untyped-def]
    """docs/deviations.md 58: QEMU 7.2's savevm with background-snapshot on sends pages twice
    (twice the VM state on a first snapshot); snaplab's snapshot-save stores each page once."""
    q = make_vm(workload=WorkloadSpec("idle", seed=3), ram=64 << 20).qmp()

    def state_size(tag: str) -> int:
        for n in q.execute("query-named-block-nodes"):
            if n["node-name"] == "disk0":
                return next(s["vm-state-size"] for s in n["image"]["snapshots"] if s["name"] == tag)
        raise AssertionError("disk0")

    def save(tag: str, engine: str) -> int:
        info, _ = run_job(q, "snapshot-save", {**A, "job-id": tag, "tag": tag, "__org.snaplab_engine": engine})
        assert info["status"] == "concluded" and "error" not in info, info
        return state_size(tag)

    for engine in ("blocking", "cow"):
        off = save(f"off-{engine}", engine)
        assert off > 100 << 10  # the firmware's and the guest program's pages at least
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "background-snapshot", "state": True}]})
        on = save(f"on-{engine}", engine)
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "background-snapshot", "state": False}]})
        assert abs(on - off) <= 16 << 10, (engine, on, off)  # the idle guest's pages, once
