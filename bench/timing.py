"""Durations the tests used to assert (issue #20 item 5), measured and checked here instead.

A loaded CI machine stretches any duration, so tests/ now asserts behaviour only (the guest
stopped, resumed, ran on; RAM kept its huge pages) and waits on conditions with generous
timeouts.  The figures moved here, each with the bound its test used to assert:

====================================  =========================  ===============================
figure                                bound (as the test had it)  was in
====================================  =========================  ===============================
stop latency, median of 20 stops      < 20 ms                     tests/machine/test_machine.py
vCPU kicks for one 50 ms run_on_cpu   <= 3 (one every 2 ms       tests/machine/test_machine.py
                                      until the vCPU takes it)
copy-on-write save downtime, 3 saves  < 250 ms each               tests/migration/test_cow.py
lazy load time to resume              < 100 ms                    tests/migration/test_lazy.py
copy-on-write arm after loads         < max(10 x the first arm,   tests/migration/test_cow.py
                                      1 ms) (64 huge pages ~25 us,
                                      32k small pages ~1.6 ms)
lab experiment at 64 MiB, 2 saves     every cow downtime below    tests/lab/test_lab.py
each engine: cow downtime / blocking  every blocking one (< 1);
downtime; blocking progress during    blocking progress < 0.85
its save (saves stopped over half     (a rate-paced guest catches
the job); cow progress                up after RESUME); cow > 0.5
====================================  =========================  ===============================

Usage: ``python bench/timing.py`` prints each figure and whether it is within its bound
(exit status 1 if one is not).  Run it on a quiet host; it is not part of the test suite.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from emulator.block import BlockGraph, Qcow2Image
from emulator.guest import DATA_BASE, WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig

RAM = 32 << 20


def _machine(tmp: Path, spec: WorkloadSpec, ram: int = RAM) -> tuple[Machine, BlockGraph]:
    Qcow2Image.create(tmp / "d0.qcow2", 256 << 20).close()
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(tmp / "d0.qcow2"), "node-name": "d0f"})
    g.add({"driver": "qcow2", "file": "d0f", "node-name": "disk0"})
    return Machine(MachineConfig(ram_size=ram, workload=spec, disks=[DiskSpec("disk0", "disk0-dev")]), g), g


def stop_latency_s() -> float:
    with Machine(MachineConfig(ram_size=RAM, workload=WorkloadSpec("dirty", seed=1))) as m:
        m.start()
        lat = []
        for _ in range(20):
            time.sleep(0.01)
            t0 = time.perf_counter()
            m.stop()
            lat.append(time.perf_counter() - t0)
            m.cont()
        return statistics.median(lat)


def run_on_cpu_kicks() -> float:
    with Machine(MachineConfig(ram_size=RAM, workload=WorkloadSpec("dirty", seed=5))) as m:
        m.start()
        time.sleep(0.05)
        kicks = 0
        kick = m.cpu.stop

        def counted() -> None:
            nonlocal kicks
            kicks += 1
            kick()

        m.cpu.stop = counted  # type: ignore[method-assign]
        m.run_on_cpu(lambda: time.sleep(0.05))
        m.cpu.stop = kick  # type: ignore[method-assign]
        return kicks


def cow_downtime_s(tmp: Path) -> float:
    spec = WorkloadSpec("dirty", seed=9, working_set=RAM - DATA_BASE - (1 << 20), pattern="random", batch_pages=64)
    m, g = _machine(tmp, spec)
    try:
        m.start()
        time.sleep(0.2)
        worst = 0.0
        for i in range(3):
            met = m.snapshots.save_snapshot(f"c{i}", False, "disk0", ["disk0"], "cow")
            worst = max(worst, met.downtime_s)
        return worst
    finally:
        m.close()
        g.close()


def lazy_time_to_resume_s(tmp: Path) -> float:
    spec = WorkloadSpec("mixed", seed=21, working_set=16 << 20, pattern="random", batch_pages=32)
    m, g = _machine(tmp, spec)
    try:
        m.run_instructions(2_000_000)
        m.snapshots.save_snapshot("t", False, "disk0", ["disk0"])
        worst = 0.0
        for _ in range(2):
            m.run_instructions(1_000_000)
            met = m.snapshots.load_snapshot("t", "disk0", ["disk0"], engine="lazy")
            worst = max(worst, met.extra["time_to_resume_s"])
        return worst
    finally:
        m.close()
        g.close()


def cow_arm_ratio(tmp: Path) -> float:
    """The worst arm after a load, over max(10 x the first arm, 1 ms): at most 1 is within."""
    ram = 2 * RAM
    spec = WorkloadSpec("dirty", seed=6, working_set=ram // 2, pattern="random", batch_pages=64)
    m, g = _machine(tmp, spec, ram)
    try:
        m.start()
        time.sleep(0.1)
        q = m.qmp()
        base = "__org.snaplab_engine"
        q.execute("snapshot-save", {"job-id": "c0", "tag": "c0", "vmstate": "disk0", "devices": ["disk0"], base: "cow"})
        q.wait_job("c0", 60)
        first = q.execute("__org.snaplab_query-snapshot-stats", {"id": "c0"})["arm-s"]
        worst = 0.0
        for i, engine in enumerate(("lazy", "blocking", "lazy")):
            q.execute("snapshot-load", {"job-id": f"l{i}", "tag": "c0", "vmstate": "disk0", "devices": ["disk0"],
                                        base: engine})
            q.wait_job(f"l{i}", 60)
            job = f"c{i + 1}"
            q.execute("snapshot-save", {"job-id": job, "tag": job, "vmstate": "disk0", "devices": ["disk0"], base: "cow"})
            q.wait_job(job, 60)
            arm = q.execute("__org.snaplab_query-snapshot-stats", {"id": job})["arm-s"]
            worst = max(worst, arm / max(10 * first, 1e-3))
        return worst
    finally:
        m.close()
        g.close()


def lab_experiment_figures() -> tuple[float, float, float]:
    """lab.run.run_experiment at 64 MiB, 2 saves per engine: the worst copy-on-write downtime
    over the best blocking one, the worst blocking progress during a save that was stopped over
    half its job, the worst copy-on-write progress."""
    from lab.run import run_experiment
    from lab.spec import ExperimentSpec

    rows = []
    for eng in ("blocking", "cow"):
        rows += run_experiment(ExperimentSpec(ram_mib=64, engine=eng, repetitions=2, warmup_s=0.3, gap_s=0.05))
    cow = [r for r in rows if r["engine"] == "cow"]
    blk = [r for r in rows if r["engine"] == "blocking"]
    ratio = max(r["downtime_ms"] for r in cow) / min(r["downtime_ms"] for r in blk)
    stopped = [r["progress_during_save"] for r in blk if r["downtime_ms"] / 1e3 > 0.5 * r["details"]["job_s"]]
    return ratio, max(stopped, default=0.0), min(r["progress_during_save"] for r in cow)


def main() -> int:
    """Each figure against its bound: below it, or (``above``) over it."""
    checks: list[tuple[str, Callable[[Path], float], float, str, bool]] = [
        ("stop latency (median)", lambda t: stop_latency_s(), 0.02, "s", False),
        ("run_on_cpu kicks (50 ms)", lambda t: run_on_cpu_kicks(), 3.001, "", False),
        ("cow downtime (worst of 3)", cow_downtime_s, 0.25, "s", False),
        ("lazy time to resume (worst of 2)", lazy_time_to_resume_s, 0.1, "s", False),
        ("cow arm after loads / bound", cow_arm_ratio, 1.0, "", False),
    ]
    lab: list[float] = []

    def lab_first(t: Path) -> float:
        lab.extend(lab_experiment_figures())
        return lab[0]

    checks += [
        ("lab: cow / blocking downtime, worst", lab_first, 1.0, "", False),
        ("lab: blocking progress while stopped", lambda t: lab[1], 0.85, "", False),
        ("lab: cow progress during save, worst", lambda t: lab[2], 0.5, "", True),
    ]
    bad = 0
    for name, fn, bound, unit, above in checks:
        with tempfile.TemporaryDirectory() as d:
            got = fn(Path(d))
        ok = got > bound if above else got < bound
        bad += not ok
        print(f"{name:<38} {got:10.4g}{unit:<2} {'over' if above else 'under'} {bound:g}{unit}  {'ok' if ok else 'NOT MET'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
