"""The monitor in process: schema validation, introspection, jobs, run control, HMP, block queries."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator.block import Qcow2Image
from emulator.block.node import BlockGraph
from emulator.guest import DATA_DIR, FIRMWARE_BIN, WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig
from emulator.qmp.client import QMPClient, QMPError
from emulator.qmp.jobs import id_wellformed
from emulator.qmp.schema import Command, Member, default_schema

RAM = 32 << 20


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Machine]:
    """The reference machine: firmware read-only raw, varstore raw writable, disk0 qcow2."""
    shutil.copy(DATA_DIR / "firmware" / "vars-template.fd", tmp_path / "vars.fd")
    Qcow2Image.create(tmp_path / "disk0.qcow2", 64 << 20).close()
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(FIRMWARE_BIN), "node-name": "fw-code-file", "read-only": True})
    g.add({"driver": "raw", "file": "fw-code-file", "node-name": "fw-code", "read-only": True})
    g.add({"driver": "file", "filename": str(tmp_path / "vars.fd"), "node-name": "fw-vars-file"})
    g.add({"driver": "raw", "file": "fw-vars-file", "node-name": "fw-vars"})
    g.add({"driver": "file", "filename": str(tmp_path / "disk0.qcow2"), "node-name": "disk0-file"})
    g.add({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"})
    cfg = MachineConfig(ram_size=RAM, pflash0="fw-code", pflash1="fw-vars", disks=[DiskSpec("disk0", "disk0-dev")],
                        workload=WorkloadSpec("dirty", seed=1, working_set=4 << 20))
    m = Machine(cfg, g)
    m.start()
    yield m
    m.close()
    g.close()


def err(q: QMPClient, cmd: str, args: dict | None = None) -> tuple[str, str]:  # type: ignore[type-arg]
    with pytest.raises(QMPError) as e:
        q.execute(cmd, args)
    return e.value.error_class, str(e.value)


def test_argument_validation_texts_and_order() -> None:
    s = default_schema()
    cmd = Command("snapshot-save", (Member("job-id", "str"), Member("tag", "str"), Member("vmstate", "str"),
                                    Member("devices", "[str]")))
    a = {"job-id": "j0", "tag": "snapx", "vmstate": "disk0", "devices": ["disk0"]}

    def msg(args: dict) -> str:  # type: ignore[type-arg]
        try:
            s.validate(cmd, args)
        except Exception as e:
            return str(e)
        return "ok"

    assert msg(a) == "ok"
    assert msg({}) == "Parameter 'job-id' is missing"
    assert msg({k: v for k, v in a.items() if k not in ("vmstate", "devices")}) == "Parameter 'vmstate' is missing"
    assert msg({**a, "tag": 123}) == "Invalid parameter type for 'tag', expected: string"
    assert msg({**a, "devices": "disk0"}) == "Invalid parameter type for 'devices', expected: array"
    assert msg({**a, "devices": [1]}) == "Invalid parameter type for 'devices[0]', expected: string"
    assert msg({**a, "vmstate": None}) == "Invalid parameter type for 'vmstate', expected: string"
    assert msg({**a, "foo": 1}) == "Parameter 'foo' is unexpected"
    assert msg({**{k: v for k, v in a.items() if k != "tag"}, "foo": 1}) == "Parameter 'tag' is missing"


def test_introspection(vm: Machine) -> None:
    q = vm.qmp()
    names = {c["name"] for c in q.execute("query-commands")}
    assert {"qmp_capabilities", "query-status", "query-qmp-schema", "human-monitor-command", "job-dismiss"} <= names
    schema = q.execute("query-qmp-schema")
    by_name = {e["name"]: e for e in schema}
    for e in schema:
        assert e["meta-type"] in ("command", "event", "object", "enum", "array", "builtin")
    hmc = by_name["human-monitor-command"]
    args = by_name[hmc["arg-type"]]
    assert args["members"] == [{"name": "command-line", "type": "str"},
                               {"name": "cpu-index", "type": "int", "default": None}]
    assert by_name[hmc["ret-type"]] == {"name": "str", "json-type": "string", "meta-type": "builtin"}
    ev = by_name["JOB_STATUS_CHANGE"]
    members = by_name[ev["arg-type"]]["members"]
    status_enum = by_name[members[1]["type"]]
    assert status_enum["meta-type"] == "enum" and "concluded" in status_enum["values"]
    for e in schema:  # every referenced type is defined
        for key in ("arg-type", "ret-type", "element-type"):
            if key in e:
                assert e[key] in by_name, (e, key)
    assert q.execute("query-version") == {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "snaplab 0.1.0"}


def test_run_control_and_events(vm: Machine) -> None:
    q = vm.qmp()
    assert q.execute("query-status") == {"status": "running", "singlestep": False, "running": True}
    q.execute("stop")
    assert q.execute("query-status") == {"status": "paused", "singlestep": False, "running": False}
    q.execute("cont")
    q.execute("system_reset")
    assert [e.event for e in q.events()] == ["STOP", "RESUME", "RESET"]
    q.execute("stop")
    q.execute("system_reset")
    assert q.execute("query-status")["status"] == "prelaunch"
    evs = q.events()
    assert [e.event for e in evs] == ["STOP", "RESET"]
    assert evs[1].data == {"guest": False, "reason": "host-qmp-system-reset"}
    assert abs(evs[0].timestamp - time.time()) < 60
    q.execute("cont")
    assert err(q, "qmp_capabilities") == ("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
    assert err(q, "qmp_capabilities", {"enable": ["x"]}) == ("GenericError", "Parameter 'null' does not accept value 'x'")
    assert err(q, "no-such-command") == ("CommandNotFound", "The command no-such-command has not been found")
    assert err(q, "stop", {"x": 1}) == ("GenericError", "Parameter 'x' is unexpected")
    q.execute("quit")
    ev = q.wait_event("SHUTDOWN", 5)
    assert ev.data == {"guest": False, "reason": "host-qmp-quit"}
    assert q.execute("query-status")["status"] == "shutdown"
    assert err(q, "cont") == ("GenericError", "Resetting the Virtual Machine is required")


def test_block_queries_like_qemu(vm: Machine) -> None:
    q = vm.qmp()
    blocks = q.execute("query-block")
    assert [b["qdev"] for b in blocks] == ["/machine/system.flash0", "/machine/system.flash1",
                                          "/machine/peripheral/disk0-dev/virtio-backend"]
    assert [b["inserted"]["node-name"] for b in blocks] == ["fw-code", "fw-vars", "disk0"]
    assert all(b["device"] == "" and b["type"] == "unknown" for b in blocks)
    assert "io-status" in blocks[2] and "io-status" not in blocks[0]
    disk = blocks[2]["inserted"]
    assert disk["drv"] == "qcow2" and disk["ro"] is False and disk["image"]["format"] == "qcow2"
    assert disk["image"]["format-specific"]["data"]["refcount-bits"] == 16
    nodes = q.execute("query-named-block-nodes", {"flat": True})
    assert [(n["node-name"], n["drv"], n["ro"]) for n in nodes] == [
        ("disk0", "qcow2", False), ("disk0-file", "file", False), ("fw-vars", "raw", False),
        ("fw-vars-file", "file", False), ("fw-code", "raw", True), ("fw-code-file", "file", True)]
    vm.graph["disk0"].format_image.snapshot_create("s1", vm_clock_nsec=2_155_333_615)  # type: ignore[union-attr]
    nodes = q.execute("query-named-block-nodes")
    (sn,) = nodes[0]["image"]["snapshots"]
    assert (sn["name"], sn["vm-clock-sec"], sn["vm-clock-nsec"], sn["vm-state-size"]) == ("s1", 2, 155333615, 0)


def test_jobs_state_machine(vm: Machine) -> None:
    q = vm.qmp()
    mon = vm.monitor
    gate = threading.Event()
    mon.jobs.create("slow", "snapshot-save", lambda job: gate.wait(5))
    assert err(q, "job-dismiss", {"id": "slow"}) == (
        "GenericError", "Job 'slow' in state 'running' cannot accept command verb 'dismiss'")
    assert err(q, "job-complete", {"id": "slow"}) == (
        "GenericError", "Job 'slow' in state 'running' cannot accept command verb 'complete'")
    assert q.execute("query-jobs")[0]["status"] == "running"  # the monitor answers while a job runs
    gate.set()
    info = q.wait_job("slow", 5)
    assert info == {"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "snapshot-save",
                    "id": "slow"}
    with pytest.raises(Exception, match="Job ID 'slow' already in use"):
        mon.jobs.create("slow", "snapshot-save", lambda job: None)
    q.execute("job-dismiss", {"id": "slow"})
    assert err(q, "job-dismiss", {"id": "slow"}) == ("GenericError", "Job not found")
    assert err(q, "job-cancel", {"id": "nope"}) == ("GenericError", "Job not found")
    assert err(q, "job-dismiss", {}) == ("GenericError", "Parameter 'id' is missing")

    def boom(job: object) -> None:
        raise RuntimeError("kaboom")

    mon.jobs.create("bad", "snapshot-load", boom)
    info = q.wait_job("bad", 5)
    assert info["status"] == "concluded" and "kaboom" in info["error"]
    statuses = [e.data["status"] for e in q.events() if e.event == "JOB_STATUS_CHANGE" and e.data["id"] == "bad"]
    assert statuses == ["created", "running", "aborting"]  # wait_job took "concluded"
    q.execute("job-dismiss", {"id": "bad"})
    assert q.execute("query-jobs") == []
    for bad_id in ("1bad", "", "a b"):
        with pytest.raises(Exception, match="Invalid job ID"):
            mon.jobs.create(bad_id, "snapshot-save", lambda job: None)
    assert id_wellformed("a-b.c_d9") and not id_wellformed("é")


def test_hmp(vm: Machine) -> None:
    q = vm.qmp()
    assert q.hmp("info status") == "VM status: running\r\n"
    q.hmp("stop")
    assert q.hmp("info status") == "VM status: paused\r\n"
    q.hmp("c")
    assert q.hmp("nonsense") == "unknown command: 'nonsense'\r\n"
    assert "stop|s -- stop emulation\r\n" in q.hmp("help")
    text = q.hmp("info block")
    assert "disk0: " in text and "Attached to:      /machine/peripheral/disk0-dev/virtio-backend\r\n" in text
    assert "fw-code: " in text and "(raw, read-only)" in text
    assert q.hmp("info snapshots") == "There is no snapshot available.\r\n"
    vm.graph["disk0"].format_image.snapshot_create("a")  # type: ignore[union-attr]
    out = q.hmp("info snapshots")
    # The raw writable varstore cannot hold snapshots, so nothing is "present on all disks".
    assert out.startswith("List of snapshots present on all disks:\r\nNone\r\n\r\n"
                          "List of partial (non-loadable) snapshots on '':\r\nID        TAG")
    assert "\r\n1         a                     0 B " in out
    # cpu-index names a vCPU, as qmp_human_monitor_command's monitor_set_cpu checks it
    assert q.execute("human-monitor-command", {"command-line": "info status", "cpu-index": 0}) == "VM status: running\r\n"
    with pytest.raises(QMPError, match="Parameter 'cpu-index' expects a CPU number") as e:
        q.execute("human-monitor-command", {"command-line": "info status", "cpu-index": 3})
    assert e.value.error_class == "GenericError"


def test_hmp_refuses_a_line_with_too_few_or_too_many_words_as_qemu(vm: Machine) -> None:
    """monitor_parse_arguments(): QEMU 7.2's texts for each, checked against the real QEMU in
    tests/conformance/test_qemu_differential.py; nothing is done, no snapshot is made."""
    q = vm.qmp()
    assert q.hmp("savevm my snap") == ('savevm: extraneous characters at the end of line\r\n'
                                       'Try "help savevm" for more information\r\n')
    assert q.hmp('savevm "a b" c').startswith("savevm: extraneous characters")
    assert q.hmp("loadvm") == 'loadvm: string expected\r\nTry "help loadvm" for more information\r\n'
    assert q.hmp('savevm "unterminated') == 'savevm: string expected\r\nTry "help savevm" for more information\r\n'
    assert q.hmp("delvm x y") == ('delvm: extraneous characters at the end of line\r\n'
                                  'Try "help delvm" for more information\r\n')
    assert q.hmp("s now") == 'stop|s: extraneous characters at the end of line\r\nTry "help s" for more information\r\n'
    assert q.hmp("info status x") == ('status: extraneous characters at the end of line\r\n'
                                      'Try "help info status" for more information\r\n')
    assert q.hmp("info status") == "VM status: running\r\n"  # the refused "s now" did not stop it
    assert q.hmp("info snapshots") == "There is no snapshot available.\r\n"  # nor saved "my"
    assert q.hmp("help savevm x") == ("savevm tag -- save a VM snapshot. If no tag is provided, "
                                      "a new snapshot is created\r\n")


def test_generator_job_first_step_is_the_commands_bottom_half() -> None:
    """A generator job runs up to its first yield where the monitor dispatched the command,
    as the command's bottom half; the rest on a worker.  A failing or cancelled first step
    concludes the job with the error, as any failure does."""
    from emulator.qmp.jobs import Job, JobManager

    events: list[tuple[str, str]] = []
    bottom_halves: list = []  # type: ignore[type-arg]
    jobs = JobManager(lambda name, data: events.append((data["id"], data["status"])), bottom_halves.append)
    where: dict[str, str] = {}

    def steps(job: Job) -> Iterator[None]:
        where["first"] = threading.current_thread().name
        yield
        where["rest"] = threading.current_thread().name

    def fails(job: Job) -> Iterator[None]:
        raise RuntimeError("boom")
        yield

    a = jobs.create("a", "test", steps)
    assert where == {} and a.status.value == "running"  # nothing ran before the bottom half
    bottom_halves.pop()()
    assert where["first"] == threading.current_thread().name
    assert a.done.wait(5) and where["rest"] != where["first"] and a.error is None
    b = jobs.create("b", "test", fails)
    bottom_halves.pop()()
    assert b.done.wait(5) and b.error == "internal error: RuntimeError: boom"
    c = jobs.create("c", "test", steps)
    jobs.cancel("c")
    where.clear()
    bottom_halves.pop()()
    assert c.done.wait(5) and c.error == "Operation canceled" and where == {}
    assert [s for j, s in events if j == "b"][-2:] == ["aborting", "concluded"]
    # cancelled once its first step ran: the rest still runs (it holds what the first step
    # took, e.g. the snapshot lock), then the job reports the cancel
    gate = threading.Event()
    where.clear()

    def gated(job: Job) -> Iterator[None]:
        where["first"] = "ran"
        yield
        gate.wait(5)
        where["rest"] = "ran"

    d = jobs.create("d", "test", gated)
    bottom_halves.pop()()
    jobs.cancel("d")
    gate.set()
    assert d.done.wait(5) and where == {"first": "ran", "rest": "ran"} and d.error == "Operation canceled"


def test_block_job_commands_on_a_snapshot_job_answer_as_qemu(vm: Machine) -> None:
    """QEMU 7.2 (docs/reference/qemu-7.2-qmp.md, "block-job-cancel on snapshot job id"): a
    snapshot job is not a block job, so every block-job-* command answers find_block_job's
    DeviceNotActive "Block job 'X' not found", for a running or concluded job's id and for an
    unknown one; query-block-jobs lists none; the job-* commands still reach the job."""
    q = vm.qmp()
    gate = threading.Event()
    vm.monitor.jobs.create("save1", "snapshot-save", lambda job: gate.wait(5))
    by_device = [("block-job-cancel", {}), ("block-job-cancel", {"force": True}), ("block-job-pause", {}),
                 ("block-job-resume", {}), ("block-job-complete", {}), ("block-job-set-speed", {"speed": 0})]
    by_id = ["block-job-dismiss", "block-job-finalize"]
    for phase in ("running", "concluded"):
        for job_id in ("save1", "nope"):
            for cmd, extra in by_device:
                assert err(q, cmd, {"device": job_id, **extra}) == ("DeviceNotActive", f"Block job '{job_id}' not found")
            for cmd in by_id:
                assert err(q, cmd, {"id": job_id}) == ("DeviceNotActive", f"Block job '{job_id}' not found")
        assert q.execute("query-block-jobs") == []
        assert q.execute("query-jobs")[0]["status"] == phase
        gate.set()
        q.wait_job("save1", 5) if phase == "running" else None
    assert err(q, "block-job-cancel", {}) == ("GenericError", "Parameter 'device' is missing")
    assert err(q, "block-job-set-speed", {"device": "save1"}) == ("GenericError", "Parameter 'speed' is missing")
    q.execute("job-dismiss", {"id": "save1"})
    assert q.execute("query-jobs") == []
