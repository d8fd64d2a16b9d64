"""Running experiments: build the machine, drive it through QMP, collect tidy rows.

Everything a notebook teaches goes through the real interface (the in-process QMP client):
``snapshot-save`` with the engine extension, ``query-jobs``, the job's events, and the
snapshot-stats command.  Only the workload's progress samples are read from the lab port.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from emulator.block import BlockGraph, Qcow2Image
from emulator.errors import UffdUnavailable
from emulator.guest import WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig
from lab.progress import iterations_at, stops_monotonic_ns
from lab.spec import ExperimentSpec, compare_engines, load_engines, write_protects

ENGINE_ARG = "__org.snaplab_engine"


def build_machine(spec: ExperimentSpec, workdir: Path) -> tuple[Machine, BlockGraph]:
    disk = workdir / "disk0.qcow2"
    if not disk.exists():
        Qcow2Image.create(disk, 1 << 30).close()
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(disk), "node-name": "disk0-file"})
    g.add({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"})
    ram = spec.ram_mib << 20
    ws = (spec.working_set_mib << 20) or ram // 2
    w = WorkloadSpec(spec.workload, seed=spec.seed, working_set=ws, rate=spec.dirty_rate_mib_s << 20,
                     pattern=spec.pattern)
    return Machine(MachineConfig(ram_size=ram, workload=w, disks=[DiskSpec("disk0", "disk0-dev")]), g), g


def wait_for_progress(m: Machine, timeout_s: float = 60.0) -> float:
    """Wait until the guest has reported progress on the lab port (its workload runs), at most
    ``timeout_s``; returns the seconds waited.  The warm-up counts from then: on a host where
    fresh memory is slow to touch (docs/deviations.md 57) a 512 MiB guest measured here reported
    nothing for its first two seconds, so a fixed warm-up from boot saved a guest that had not
    started yet."""
    t0 = time.monotonic()
    while not len(m.lab.history_array(1)) and time.monotonic() - t0 < timeout_s:
        time.sleep(0.01)
    return time.monotonic() - t0


def engine_setup(m: Machine, spec: ExperimentSpec) -> float:
    """A write-protecting engine's one-time setup, before the guest's warm-up and outside every
    save's figures: the userfaultfd, guest RAM populated, the process's copy and gather buffers
    made (``EngineContext.write_protector``).  Without it the first copy-on-write save of a
    process pays for it: measured at 256 MiB, 347-959 ms against 40-50 ms for the next ones.
    Returns the seconds it took (0 when the engine needs none, or the kernel refuses
    userfaultfd: the fallback needs no setup)."""
    if not write_protects(spec.engine) or spec.wp_backend == "unicorn-tlb":
        return 0.0
    t0 = time.perf_counter()
    try:
        m.snapshots.write_protector()
    except UffdUnavailable:
        return 0.0
    return time.perf_counter() - t0


def run_experiment(spec: ExperimentSpec, workdir: str | Path | None = None,
                   on_row: Callable[[list[dict[str, Any]]], object] | None = None) -> list[dict[str, Any]]:
    """Take ``repetitions`` snapshots with ``engine`` on a running guest; one row per snapshot.
    A write-protecting engine is set up first (:func:`engine_setup`, ``setup_s`` in each row).
    ``on_row`` is called with the rows so far after each one (to keep them if the run stops)."""
    with tempfile.TemporaryDirectory(prefix="snaplab-") as tmp:
        wd = Path(workdir or tmp)
        wd.mkdir(parents=True, exist_ok=True)
        m, g = build_machine(spec, wd)
        rows: list[dict[str, Any]] = []
        try:
            m.start()
            q = m.qmp()
            setup_s = engine_setup(m, spec)
            wait_for_progress(m)
            time.sleep(spec.warmup_s)
            for rep in range(spec.repetitions):
                q.events()
                job = f"save{rep}"
                args = {"job-id": job, "tag": f"{spec.engine}-{rep}", "vmstate": "disk0", "devices": ["disk0"],
                        ENGINE_ARG: spec.engine}
                if write_protects(spec.engine) and spec.wp_backend != "auto":
                    args["__org.snaplab_wp-backend"] = spec.wp_backend
                t0 = time.time()
                m0 = time.monotonic_ns()
                q.execute("snapshot-save", args)
                info = q.wait_job(job, timeout=600)
                m1 = time.monotonic_ns()
                if "error" in info:
                    raise RuntimeError(f"snapshot-save failed: {info['error']}")
                stats = q.execute("__org.snaplab_query-snapshot-stats", {"id": job})
                q.execute("job-dismiss", {"id": job})
                evs = {e.event: e.timestamp for e in q.events() if e.event in ("STOP", "RESUME")}
                lat = np.array(stats.get("fault-latency-s", []) or [0.0])
                samples = m.lab.history()
                rows.append({
                    **spec.as_dict(), "rep": rep,
                    "downtime_ms": (evs["RESUME"] - evs["STOP"]) * 1e3 if len(evs) == 2 else float("nan"),
                    "downtime_internal_ms": stats["downtime-s"] * 1e3,
                    "total_s": stats["total-s"],
                    "vmstate_bytes": stats["vmstate-bytes"],
                    "pages_written": stats["ram-pages-written"],
                    "zero_pages": stats["zero-pages"],
                    "faults": stats.get("faults", 0),
                    "pages_by_fault": stats.get("fault-chunks", 0) * 512,
                    "pages_by_background": stats.get("bg-chunks", 0) * 512,
                    "fault_latency_p50_ms": float(np.median(lat)) * 1e3,
                    "fault_latency_p99_ms": float(np.percentile(lat, 99)) * 1e3,
                    "peak_extra_bytes": stats.get("peak-extra-bytes", 0),
                    "arm_ms": stats.get("arm-s", 0.0) * 1e3,
                    "rearmed_chunks": stats.get("rearmed-chunks", 0),  # written between the pre-arm and the stop
                    "pre_arm_ms": stats.get("pre-arm-s", 0.0) * 1e3,  # all of RAM protected before the stop
                    # copy-on-write's second zero-page scan: how it ran ("" where it did), chunks the saver used from it
                    "ahead_policy": stats.get("ahead-policy", ""), "ahead_chunks": stats.get("ahead-chunks", 0),
                    "first_entry_ms": stats.get("first-entry-s", math.nan) * 1e3,  # the vCPU's first entry after RESUME, after the arm
                    "populate_s": stats.get("populate-s", 0.0),
                    "setup_s": setup_s,
                    "wp_backend_used": stats.get("backend", ""),
                    "fault_thread": stats.get("fault-thread", ""),
                    "started_at": t0,
                    "guest_iterations": samples[-1].iterations if samples else 0,
                    # the phases (ms); 2 MiB chunks known zero from the page tables (not read), the MiB read
                    **{f"{k}_ms": stats.get(f"{k.replace('_', '-')}-s", 0.0) * 1e3 for k in ("prepare", "zero_scan", "zero_map", "write", "commit", "flush", "freeze", "run")},
                    "zero_chunks": stats.get("zero-chunks", 0), "scanned_mib": stats.get("scanned-bytes", math.nan) / 2**20,
                    "iterations": stats.get("iterations", 1),
                    "progress_during_save": _progress(m, m0, m1, stops_monotonic_ns(sorted(evs.items(), key=lambda kv: kv[1]))),
                    "details": _details(stats, m, m0, m1, evs, t0),
                })
                if on_row is not None:
                    on_row(rows)
                q.execute("snapshot-delete", {"job-id": f"del{rep}", "tag": args["tag"], "devices": ["disk0"]})
                q.wait_job(f"del{rep}")
                q.execute("job-dismiss", {"id": f"del{rep}"})
                time.sleep(spec.gap_s)
            q.execute("quit")
        finally:
            m.close()
            g.close()
        return rows



def _details(stats: dict[str, Any], m: Any, m0: int, m1: int, evs: dict[str, float], t0: float) -> dict[str, Any]:
    """A save row's per-save lists: what its figures draw (``m0``/``m1``: the command and the
    job's end, monotonic ns; ``t0``: the command, wall time; ``evs``: STOP and RESUME)."""
    return {
        # each fault's time, and of it the waiting and the copying
        **{f"fault_{k}_ms": [x * 1e3 for x in stats.get(f"fault-{k}-s", [])] for k in ("latency", "wait", "copy")},
        # pre-copy: dirty bytes, bytes written (clean gaps included), time per round; scans
        **{k.replace("-", "_"): stats.get(k, []) for k in ("bytes-per-round", "written-per-round", "writes-per-round",
                                                         "round-s", "scan-s")},
        "max_rounds": stats.get("max-rounds", 0), "threshold_bytes": stats.get("threshold-bytes", 0),
        # copy-on-write's memory map: each fault's time after the arm (ms) and chunk,
        # and the saver's front, (ms after the arm, chunks behind it); 2 MiB chunks
        "fault_at_ms": [x * 1e3 for x in stats.get("fault-at-s", [])],
        "fault_chunk": list(stats.get("fault-chunk", [])),
        "sweep": [(t * 1e3, c) for t, c in stats.get("sweep", [])],
        "chunks": stats.get("chunks", 0),
        "timeline": [((smp.host_ns - m0) / 1e9, smp.iterations) for smp in m.lab.history()
                     if m0 - 1_000_000_000 <= smp.host_ns <= m1 + 300_000_000],
        "job_s": (m1 - m0) / 1e9,
        "stopped": ((evs["STOP"] - t0, evs["RESUME"] - t0) if len(evs) == 2 else None),
    }

def compare(ram_sizes: list[int], engines: tuple[str, ...] | None = None, *, seed: int = 1,
            repetitions: int = 2, base: ExperimentSpec | None = None, progress: Any = None) -> list[dict[str, Any]]:
    """The main job: blocking vs copy-on-write downtime over RAM sizes, on the default guest
    (``engines``: default :func:`lab.spec.compare_engines`)."""
    base = base or ExperimentSpec(seed=seed, repetitions=repetitions)
    rows: list[dict[str, Any]] = []
    for ram in ram_sizes:
        for eng in engines or compare_engines():
            spec = base.with_(ram_mib=ram, engine=eng)
            rows += run_experiment(spec)
            if progress is not None:
                progress(spec)
    return rows


def _progress(m: Machine, start_ns: int, end_ns: int, stops: list[tuple[float, float]]) -> float:
    """Guest iterations per second over [start_ns, end_ns] (monotonic) over the rate in the second before.

    Iteration counts at the window's edges are interpolated between the lab port's samples in
    running time, flat through the stop (lab/progress.py), so a guest stopped for most of the
    window scores what it ran outside the stop, not a share of the batch that straddled it.
    """
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline and not any(s.host_ns > end_ns for s in m.lab.history(last=4)):
        time.sleep(0.005)  # wait for one sample past the window so its end is interpolated, not clamped
    samples = m.lab.history()
    if len(samples) < 2:
        return float("nan")
    ts = np.array([s.host_ns for s in samples], dtype=np.float64)
    its = np.array([s.iterations for s in samples], dtype=np.float64)
    before_ns = max(start_ns - 1_000_000_000, int(ts[0]))
    if start_ns - before_ns < 50_000_000 or ts[-1] < end_ns:
        return float("nan")
    i0, i1, i2 = iterations_at(ts, its, [before_ns, start_ns, end_ns], stops)
    r0 = (i1 - i0) / ((start_ns - before_ns) / 1e9)
    r1 = (i2 - i1) / ((end_ns - start_ns) / 1e9)
    return float(r1 / r0) if r0 > 0 else float("nan")


def load_experiment(ram_mib: int, engines: tuple[str, ...] | None = None, *, seed: int = 1,
                    repetitions: int = 2) -> list[dict[str, Any]]:
    """Time from snapshot-load to RESUME for each load engine, on one running guest.

    Every load follows the same idle time (0.1 s), and so does a ``query-status`` timed just
    before it: ``idle_query_ms``, the host's cost of waking this process for the smallest
    command, measured in the same run (on a noisy VM it moves as much as the loads do)."""
    spec = ExperimentSpec(ram_mib=ram_mib, seed=seed, dirty_rate_mib_s=0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="snaplab-") as tmp:
        m, g = build_machine(spec, Path(tmp))
        try:
            m.start()
            q = m.qmp()
            m.snapshots.write_protector()  # one-time userfaultfd setup, not part of any measurement
            time.sleep(spec.warmup_s)
            q.execute("snapshot-save", {"job-id": "s", "tag": "base", "vmstate": "disk0", "devices": ["disk0"]})
            q.wait_job("s")
            base_bytes = int(q.execute("__org.snaplab_query-snapshot-stats", {"id": "s"})["vmstate-bytes"])
            for rep in range(repetitions):
                for eng in engines or load_engines():
                    time.sleep(0.1)
                    t_ref = time.perf_counter()
                    q.execute("query-status")
                    idle_query_ms = (time.perf_counter() - t_ref) * 1e3
                    time.sleep(0.1)
                    q.events()
                    job = f"load-{eng}-{rep}"
                    args: dict[str, Any] = {"job-id": job, "tag": "base", "vmstate": "disk0", "devices": ["disk0"],
                                            ENGINE_ARG: eng}
                    t0 = time.time()
                    q.execute("snapshot-load", args)
                    q.wait_job(job, 300, complete=True)
                    stats = q.execute("__org.snaplab_query-snapshot-stats", {"id": job})
                    ev = {e.event: e.timestamp for e in q.events() if e.event in ("STOP", "RESUME")}
                    rows.append({"ram_mib": ram_mib, "engine": eng, "rep": rep, "seed": seed,
                                 "stopped_ms": (ev["RESUME"] - ev["STOP"]) * 1e3,
                                 "command_to_resume_ms": (ev["RESUME"] - t0) * 1e3,
                                 "idle_query_ms": idle_query_ms,
                                 "complete_s": stats["total-s"], "faults": stats.get("faults", 0),
                                 "vmstate_bytes": base_bytes})
            q.execute("quit")
        finally:
            m.close()
            g.close()
    return rows
