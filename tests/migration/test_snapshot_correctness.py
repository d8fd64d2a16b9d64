"""Save at T, run on, load T: the guest continues exactly as the run continued from T.

Determinism (stepping by instruction count) makes this exact: registers, every RAM page, every
disk block, the varstore and the serial output after T are equal.  qemu-img sees the snapshots.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from emulator.guest import DATA_BASE, WorkloadSpec, expected_generations
from tests.migration.conftest import wait_until
from tests.migration.test_cow import uffd_or_skip

RAM = 32 << 20


def fingerprint(m) -> dict[str, object]:  # type: ignore[no-untyped-def]
    disks = [hashlib.sha256(n.format_image.read(0, n.format_image.size)).hexdigest() for n in m.disk_nodes]
    vars_node = m.graph["fw-vars"].format_image
    return {
        "ram": hashlib.sha256(m.ram.read(0, RAM)).hexdigest(),
        "regs": m.cpu.get_state(),
        "disks": disks,
        "vars": hashlib.sha256(vars_node.read(0, vars_node.size)).hexdigest(),
        "serial": m.serial.text(),
        "lab": m.lab.last.iterations,
    }


def test_load_continues_exactly_like_the_original_run(make_vm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = make_vm(vars_format="qcow2", start=False,
                workload=WorkloadSpec("mixed", seed=5, working_set=4 << 20, batch_pages=32))
    assert m.run_instructions(3_000) is None  # T: inside the firmware, before it prints BootCount
    serial_at_t = m.serial.text()
    m.snapshots.save_snapshot("T", False, None, None)  # every writable device: vars, disk0, disk1
    assert m.run_instructions(3_000_000) is None
    first = fingerprint(m)
    assert "BootCount: 1" in first["serial"] and first["lab"] > 0  # the run went on and wrote things
    m.snapshots.load_snapshot("T", None, None)
    m.serial.history = bytearray(serial_at_t.encode("latin-1"))
    assert m.run_instructions(3_000_000) is None
    second = fingerprint(m)
    assert second == first


@pytest.mark.parametrize("engine", ["blocking", "background"])
def test_a_load_puts_the_raw_variable_store_file_back_as_qemu_does(make_vm, tmp_path: Path, engine: str) -> None:  # type: ignore[no-untyped-def]
    """QEMU migrates pflash as RAM and writes the restored flash to its file after a load, even
    when ``devices`` left the raw varstore out of the snapshot (docs/deviations.md 60); a lazy
    load too (its devices are applied inside its short stop)."""
    m = make_vm(start=False)
    vars_file = tmp_path / "w" / "vars.fd"
    assert m.run_instructions(3_000_000) is None
    assert "BootCount: 1" in m.serial.text()
    at_save = vars_file.read_bytes()
    m.snapshots.save_snapshot("S", False, "disk0", ["disk0"])  # the raw store cannot hold a snapshot
    m.system_reset()
    assert m.run_instructions(3_000_000) is None
    assert "BootCount: 2" in m.serial.text()
    counted = vars_file.read_bytes()
    assert counted != at_save  # the firmware wrote its count since
    if engine != "blocking":
        uffd_or_skip()
    m.snapshots.load_snapshot("S", "disk0", ["disk0"], engine=engine)
    assert vars_file.read_bytes() == at_save
    m.system_reset()  # the restored variables are what the firmware reads: it counts 2 again
    assert m.run_instructions(3_000_000) is None
    assert m.serial.text().count("BootCount: 2") == 2
    assert vars_file.read_bytes() == counted


def test_generation_stamps_after_load(make_vm) -> None:  # type: ignore[no-untyped-def]
    spec = WorkloadSpec("dirty", seed=77, working_set=8 << 20, pattern="hot-cold", batch_pages=16)
    m = make_vm(start=False, workload=spec)
    while m.lab.last.iterations < 30_000:
        m.run_instructions(500_000)
    m.snapshots.save_snapshot("gen", False, "disk0", ["disk0"])
    saved_iters = m.ram.read_u64(0x7000)
    stamps_at_save = np.frombuffer(m.ram.read(DATA_BASE, spec.pages(RAM) * 4096), np.uint64)[::512].copy()
    m.start()  # the guest keeps overwriting pages
    wait_until(lambda: m.ram.read_u64(0x7000) > saved_iters + 10_000, "the guest to overwrite pages")
    m.stop()
    m.snapshots.load_snapshot("gen", "disk0", ["disk0"])
    n = spec.pages(RAM)
    stamps = np.frombuffer(m.ram.read(DATA_BASE, n * 4096), np.uint64).reshape(n, 512)[:, 0]
    assert (stamps == stamps_at_save).all()
    exp = expected_generations(spec, RAM, saved_iters)
    newer = stamps > saved_iters
    assert (stamps[~newer] == exp[~newer]).all() and newer.sum() <= spec.batch_pages
    assert m.ram.read_u64(0x7000) == saved_iters


def test_qemu_img_sees_the_snapshots(make_vm, tmp_path: Path, qemu_img) -> None:  # type: ignore[no-untyped-def]
    m = make_vm(vars_format="qcow2", sub="img")
    q = m.qmp()
    q.execute("snapshot-save", {"job-id": "a", "tag": "both", "vmstate": "disk1", "devices": ["disk0", "disk1"]})
    assert "error" not in q.wait_job("a")
    assert q.hmp("savevm allofthem") == ""
    q.execute("quit")
    m.close()
    w = tmp_path / "img"
    rows = {}
    for name in ("disk0", "disk1", "vars"):
        path = w / f"{name}.qcow2"
        assert qemu_img("check", str(path)).returncode == 0
        listing = qemu_img("snapshot", "-l", str(path)).stdout.splitlines()[2:]
        rows[name] = {ln.split()[1]: ln.split()[2] + ln.split()[3] for ln in listing}
    assert rows["disk1"]["both"] != "0B" and rows["disk0"]["both"] == "0B"
    assert "both" not in rows["vars"]
    # HMP savevm: every writable device, VM state on the first one (the varstore, as in QEMU).
    assert rows["vars"]["allofthem"] != "0B"
    assert rows["disk0"]["allofthem"] == "0B" and rows["disk1"]["allofthem"] == "0B"


def test_loadvm_on_the_command_line(make_vm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = make_vm(vars_format="qcow2", sub="cl")
    q = m.qmp()
    assert q.hmp("savevm boot") == ""
    q.execute("quit")
    m.close()
    m.graph.close()
    w = tmp_path / "cl"
    argv = ["-m", "32M", "-S", "-loadvm", "boot", "-machine", "q35,pflash1=fw-vars",
            "-blockdev", f"driver=file,filename={w / 'vars.qcow2'},node-name=vf",
            "-blockdev", "driver=qcow2,file=vf,node-name=fw-vars",
            "-blockdev", f"driver=file,filename={w / 'disk0.qcow2'},node-name=d0f",
            "-blockdev", "driver=qcow2,file=d0f,node-name=disk0",
            "-blockdev", f"driver=file,filename={w / 'disk1.qcow2'},node-name=d1f",
            "-blockdev", "driver=qcow2,file=d1f,node-name=disk1",
            "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev", "-device", "virtio-blk-pci,drive=disk1,id=disk1-dev",
            "-snaplab-workload", "mixed,seed=11,ws=4M,batch=64", "-qmp", f"unix:{w / 'q.sock'},server=on,wait=off"]
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-m", "emulator.cli", *argv], stderr=subprocess.PIPE)
    try:
        while not (w / "q.sock").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        from qemu.qmp.legacy import QEMUMonitorProtocol

        mon = QEMUMonitorProtocol(str(w / "q.sock"))
        mon.connect()
        assert mon.cmd("query-status")["status"] == "prelaunch"  # loaded, not started (-S)
        assert "boot" in mon.cmd("human-monitor-command", **{"command-line": "info snapshots"})
        assert mon.cmd("query-status")["status"] == "prelaunch"
        mon.cmd("cont")
        assert mon.cmd("query-status")["status"] == "running"
        mon.close()
        proc.terminate()  # its images' locks go with it (a second machine on them is refused, as QEMU's)
        proc.wait(20)
        bad = subprocess.run([sys.executable, "-m", "emulator.cli", *argv[:4], "nope", *argv[5:-2]],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "Snapshot 'nope' does not exist in one or more devices" in bad.stderr
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_blocking_loads_downtime_starts_at_its_stop(make_vm, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """SnapshotMetrics.downtime_s is STOP..RESUME: the bounce buffer's warm-up before the stop,
    and the wait for the vCPU to leave the guest before STOP, count in the load's total, not in
    its downtime, which begins only once the guest is stopped (an order of instants, no time
    limit)."""
    from emulator.migration.engines import load_blocking

    m = make_vm(start=False)
    assert m.run_instructions(100_000) is None
    m.snapshots.save_snapshot("S", False, "disk0", ["disk0"])
    events: list[tuple[str, int]] = []
    m.add_listener(lambda name, data, ns: events.append((name, ns)))
    warm = load_blocking.WARM_PAGES.warm
    monkeypatch.setattr(load_blocking.WARM_PAGES, "warm", lambda n: (time.sleep(0.3), warm(n))[1])
    stop_vm = m.vm_stop  # (the machine binds its run control's verbs once: patched there)

    stopped_at: list[float] = []

    def slow_stop(*a: object, **k: object) -> bool:  # a vCPU slow to leave the guest
        time.sleep(0.2)
        found = bool(stop_vm(*a, **k))  # type: ignore[arg-type]
        stopped_at.append(time.perf_counter())
        return found

    monkeypatch.setattr(m, "vm_stop", slow_stop)
    m.cont()
    wait_until(lambda: m.running, "the guest to run")
    met = m.snapshots.load_snapshot("S", "disk0", ["disk0"])
    returned_at = time.perf_counter()
    stop = [ns for name, ns in events if name == "STOP"][-1]
    resume = [ns for name, ns in events if name == "RESUME"][-1]
    assert met.total_s - met.downtime_s >= 0.5  # the warm-up and the wait are before the stop
    # the downtime began after the guest was stopped and ended before the load returned
    assert stop < resume and len(stopped_at) == 1 and met.downtime_s <= returned_at - stopped_at[0]
