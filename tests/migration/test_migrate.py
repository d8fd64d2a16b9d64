"""QEMU's external interface: migrate (+ background-snapshot) to exec:/file:, query-migrate,
MIGRATION events, migrate_cancel, and loading with -incoming / migrate-incoming."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from emulator.guest import DATA_BASE, WorkloadSpec, expected_generations
from emulator.machine import Machine, MachineConfig
from emulator.qmp.client import QMPError
from emulator.runstate import RunState
from tests.migration.conftest import wait_until

RAM = 64 << 20
SPEC = WorkloadSpec("dirty", seed=31, working_set=32 << 20, pattern="random", batch_pages=64)


def run_migration(q, args: dict) -> list[str]:  # type: ignore[no-untyped-def]
    q.events()
    q.execute("migrate", args)
    q.wait_event("MIGRATION", 60, {"status": "completed"})
    seq = []
    for e in q.events():
        if e.event == "MIGRATION":
            seq.append(e.data["status"])
        elif e.event in ("STOP", "RESUME"):
            seq.append(e.event)
    return seq + ["completed"]  # wait_event took it from the queue


def test_background_snapshot_to_a_file_and_back(tmp_path: Path) -> None:
    out = tmp_path / "bg.bin"
    with Machine(MachineConfig(ram_size=RAM, workload=SPEC)) as m:
        m.start()
        time.sleep(0.2)
        q = m.qmp()
        with pytest.raises(QMPError, match="Background-snapshot is not compatible with xbzrle"):
            q.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "background-snapshot", "state": True}, {"capability": "xbzrle", "state": True}]})
        q.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "background-snapshot", "state": True}, {"capability": "events", "state": True}]})
        assert {c["capability"]: c["state"] for c in q.execute("query-migrate-capabilities")}["background-snapshot"]
        with pytest.raises(QMPError, match="Parameter 'uri' expects a valid migration protocol"):
            q.execute("migrate", {"uri": "bogus:xyz"})
        seq = run_migration(q, {"uri": f"file:{out}"})
        # the completed event may arrive before or after RESUME's; the order QEMU shows:
        assert seq[:3] == ["setup", "STOP", "RESUME"] and seq[-1] == "completed" and "active" in seq
        info = q.execute("query-migrate")
        assert info["status"] == "completed" and info["ram"]["total"] == RAM and info["ram"]["transferred"] > 0
        assert q.execute("query-status")["status"] == "running"  # a background snapshot keeps the guest running
    # Load it into a fresh machine, as "-incoming defer" + migrate-incoming.
    with Machine(MachineConfig(ram_size=RAM, workload=SPEC)) as m2:
        m2.state = RunState.INMIGRATE
        m2.start(paused=True)
        m2.migration.incoming_uri = "defer"
        m2.migration.autostart = False
        q2 = m2.qmp()
        q2.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        q2.execute("migrate-incoming", {"uri": f"file:{out}"})
        q2.wait_event("MIGRATION", 60, {"status": "completed"})
        with pytest.raises(QMPError, match="The incoming migration has already been started"):
            q2.execute("migrate-incoming", {"uri": f"file:{out}"})
        assert q2.execute("query-status")["status"] == "paused"
        r13 = m2.cpu.get_state()["R13"]
        n = SPEC.pages(RAM)
        stamps = np.frombuffer(m2.ram.read(DATA_BASE, n * 4096), np.uint64).reshape(n, 512)[:, 0]
        diff = np.flatnonzero(stamps != expected_generations(SPEC, RAM, r13))
        assert r13 > 0 and len(diff) <= 1 and all(stamps[d] == r13 + 1 for d in diff)
        q2.execute("cont")
        wait_until(lambda: m2.lab.last.iterations > r13, "the loaded guest to run on")


def test_plain_migrate_through_exec_leaves_the_source_in_postmigrate(tmp_path: Path) -> None:
    out = tmp_path / "m.bin"
    with Machine(MachineConfig(ram_size=RAM, workload=SPEC)) as m:
        m.start()
        time.sleep(0.1)
        q = m.qmp()
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        seq = run_migration(q, {"uri": f"exec:cat > {out}"})
        assert seq[0] == "setup" and "STOP" in seq and "RESUME" not in seq and seq[-1] == "completed"
        assert q.execute("query-status")["status"] == "postmigrate"
        assert out.stat().st_size > 0
        ram_src = m.ram.read(0, RAM)
    with Machine(MachineConfig(ram_size=RAM, workload=SPEC)) as m2:
        m2.state = RunState.INMIGRATE
        m2.start(paused=True)
        m2.migration.incoming_uri = "defer"
        m2.migration.autostart = False
        m2.migration.incoming(f"exec:cat {out}")
        m2.migration.wait(60)
        assert m2.migration.status == "completed"
        assert m2.ram.read(0, RAM) == ram_src


def test_cancel_and_errors(tmp_path: Path) -> None:
    with Machine(MachineConfig(ram_size=256 << 20, workload=SPEC)) as m:
        m.start()
        q = m.qmp()
        with pytest.raises(QMPError, match="'-incoming' was not specified on the command line"):
            q.execute("migrate-incoming", {"uri": "file:/nonexistent"})
        q.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "background-snapshot", "state": True}, {"capability": "events", "state": True}]})
        q.execute("migrate", {"uri": "exec:sleep 1; cat > /dev/null"})
        with pytest.raises(QMPError, match="There's a migration process in progress"):
            q.execute("migrate", {"uri": "exec:cat > /dev/null"})
        with pytest.raises(QMPError, match="There's a migration process in progress"):
            q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": False}]})
        q.execute("migrate_cancel")
        q.wait_event("MIGRATION", 60, {"status": "cancelled"})
        assert q.execute("query-migrate")["status"] == "cancelled"
        assert q.execute("query-status")["status"] == "running"
        with pytest.raises(QMPError, match="not been found"):
            q.execute("migrate-cancel")  # 7.2's name is migrate_cancel


def test_closing_during_a_background_migrations_setup_gives_the_chunk_buffers_back(tmp_path: Path) -> None:
    """A background migration cancelled before its stream began (the machine closed at once)
    used to keep its 2 MiB chunk buffers: a RAM's worth of memory per cancelled migration."""
    from emulator.migration.cow import WARM_BUFFERS
    from tests.stress.cycles import stress_machine

    totals = []
    for i in range(4):
        (tmp_path / f"m{i}").mkdir()
        m, g = stress_machine(tmp_path / f"m{i}", i)
        m.start()
        q = m.qmp()
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "background-snapshot", "state": True}]})
        q.execute("migrate", {"uri": f"file:{tmp_path / f'm{i}' / 'mig.bin'}"})
        m.close()
        g.close()
        totals.append(WARM_BUFFERS.total)
    assert totals[-1] == totals[1], totals
