"""Benchmark: copy-on-write snapshot downtime, total time and guest progress, vs QEMU 7.2.

    python bench/bench_cow.py [--sizes 1024,4096] [--runs 4] [--no-qemu]

snaplab: ``snapshot-save`` with ``__org.snaplab_engine: cow`` on a guest dirtying 100 MiB/s,
and a blocking ``snapshot-save`` of the same guest beside each, before and after in turn (ABBA:
the guest's state grows as it runs), the total of each, same run.
QEMU 7.2: ``migrate-set-capabilities background-snapshot`` + ``migrate exec:cat > FILE`` on
an OVMF guest with RAM filled through ``-device loader`` (the reference's setup), when
``qemu-system-x86_64`` and OVMF are installed; otherwise the recorded figures are used, and
the output says so.  Downtime is STOP -> RESUME from the event timestamps.  Guest progress
during the window is the lab port's iteration rate inside the window over the rate before it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cow_cpu import cpu_by_group, thread_cpu  # noqa: E402
from bench_snapshot import OVMF, drop_caches, warm_memory  # noqa: E402

from lab import qemu as qemu_lab  # noqa: E402
from lab.run import build_machine  # noqa: E402
from lab.spec import ExperimentSpec  # noqa: E402

RECORDED = {1024: (0.0073, 4.554), 4096: (0.0251, 11.422)}  # QEMU 7.2 bg snapshot: median downtime, total (s)


def cpu_used(before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
    """The process's CPU seconds between two :func:`bench_cow_cpu.thread_cpu` readings, and of
    them the userfaultfd fault thread's (cow.WriteProtector's ``uffd-faults``)."""
    by = cpu_by_group(before, after)
    return sum(by.values()), by.get("uffd-faults", 0.0)


def ours(mib: int, runs: int) -> list[dict[str, float]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="snaplab-bench-") as d:
        m, g = build_machine(ExperimentSpec(ram_mib=mib, working_set_mib=mib // 2, dirty_rate_mib_s=100), Path(d))
        try:
            m.start()
            q = m.qmp()
            time.sleep(1.0)
            for i in range(runs):
                # ABBA: the guest's state grows as it runs, so the save that comes second has more
                # to write; alternating which comes first keeps that out of the ratio
                blk_first = blocking_save(m, q, i) if i % 2 else None
                s0 = m.lab.last
                time.sleep(0.5)
                s1 = m.lab.last
                base_rate = (s1.iterations - s0.iterations) / max((s1.host_ns - s0.host_ns) / 1e9, 1e-9)
                q.events()
                c0 = thread_cpu()
                q.execute("snapshot-save", {"job-id": f"c{i}", "tag": f"c{i}", "vmstate": "disk0",
                                            "devices": ["disk0"], "__org.snaplab_engine": "cow"})
                t_start = time.monotonic_ns()
                info = q.wait_job(f"c{i}", 600)
                t_end = time.monotonic_ns()
                cpu, fault_cpu = cpu_used(c0, thread_cpu())
                assert "error" not in info, info
                st = q.execute("__org.snaplab_query-snapshot-stats", {"id": f"c{i}"})
                q.execute("job-dismiss", {"id": f"c{i}"})
                ev = {e.event: e.timestamp for e in q.events() if e.event in ("STOP", "RESUME")}
                win = [s for s in m.lab.history() if t_start <= s.host_ns <= t_end]
                rate = ((win[-1].iterations - win[0].iterations) / ((win[-1].host_ns - win[0].host_ns) / 1e9)
                        if len(win) > 1 and win[-1].host_ns > win[0].host_ns else float("nan"))
                out.append({"downtime": ev["RESUME"] - ev["STOP"], "total": st["total-s"], "bytes": st["vmstate-bytes"],
                            "thp_mib": m.ram.huge_bytes() >> 20,
                            "progress": rate / base_rate if base_rate else float("nan"),
                            "faults": st["faults"], "arm_ms": st["arm-s"] * 1e3,
                            "zero_chunks": st.get("zero-chunks", 0), "chunks": mib // 2,
                            "cpu_s": cpu, "fault_cpu_s": fault_cpu,
                            "zero_map_ms": st.get("zero-map-s", 0.0) * 1e3})
                q.execute("snapshot-delete", {"job-id": f"d{i}", "tag": f"c{i}", "devices": ["disk0"]})
                q.wait_job(f"d{i}")
                q.execute("job-dismiss", {"id": f"d{i}"})
                out[-1] |= blk_first if blk_first is not None else blocking_save(m, q, i)
        finally:
            m.close()
            g.close()
    return out


def blocking_save(m: Any, q: Any, i: int) -> dict[str, float]:
    """QEMU's blocking save of the same guest, right before or after the copy-on-write one
    (same file system): its downtime, its total (command to the job's end, the flush
    included, as for copy-on-write) and its VM-state bytes."""
    time.sleep(0.5)
    q.events()
    c0 = thread_cpu()
    q.execute("snapshot-save", {"job-id": f"b{i}", "tag": f"b{i}", "vmstate": "disk0", "devices": ["disk0"]})
    info = q.wait_job(f"b{i}", 600)
    cpu, _ = cpu_used(c0, thread_cpu())
    assert "error" not in info, info
    st = q.execute("__org.snaplab_query-snapshot-stats", {"id": f"b{i}"})
    q.execute("job-dismiss", {"id": f"b{i}"})
    ev = {e.event: e.timestamp for e in q.events() if e.event in ("STOP", "RESUME")}
    q.execute("snapshot-delete", {"job-id": f"db{i}", "tag": f"b{i}", "devices": ["disk0"]})
    q.wait_job(f"db{i}")
    q.execute("job-dismiss", {"id": f"db{i}"})
    return {"blocking_downtime": ev["RESUME"] - ev["STOP"], "blocking_total": st["total-s"],
            "blocking_bytes": st["vmstate-bytes"], "blocking_cpu_s": cpu}


def qemu(mib: int, runs: int, w: Path) -> list[dict[str, float]]:
    """QEMU 7.2 background-snapshot on RAM full of random bytes (lab.qemu, as the reference)."""
    with qemu_lab.running(w, mib) as q:
        return [{"downtime": d, "total": t} for d, t in qemu_lab.background_snapshots(q, w, runs)]


def span(rows: list[dict[str, float]], key: str) -> str:
    """``key``'s min-max over the rows, as "lo-hi"."""
    return f"{min(r[key] for r in rows):.2f}-{max(r[key] for r in rows):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,4096")
    ap.add_argument("--runs", type=int, default=4, help="saves of each kind per size (even: ABBA balanced)")
    ap.add_argument("--no-qemu", action="store_true")
    a = ap.parse_args()
    try:
        sizes = [int(x) for x in a.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes: {a.sizes!r}: expected RAM sizes in MiB such as 1024,4096")
    if not all(64 <= s <= 16384 for s in sizes) or a.runs < 1:
        ap.error("--sizes: each from 64 to 16384 MiB; --runs: at least 1")
    if a.runs % 2:
        print(f"note: --runs {a.runs} is odd, so the blocking save comes after the copy-on-write one once more "
              "than before it: the ABBA order is not balanced")
    print(f"warming host memory: {warm_memory((max(sizes) << 20) * 3):.1f} s")
    have_qemu = shutil.which("qemu-system-x86_64") and (OVMF / "OVMF_CODE.fd").exists() and not a.no_qemu
    for mib in sizes:
        drop_caches()
        mine = ours(mib, a.runs)
        if have_qemu:
            drop_caches()
            with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
                theirs = qemu(mib, a.runs, Path(d))
            q_down = float(np.median([r["downtime"] for r in theirs]))
            q_tot = float(np.median([r["total"] for r in theirs]))
            src = "measured in this run"
        else:
            q_down, q_tot = RECORDED.get(mib, (float("nan"), float("nan")))
            src = "RECORDED (--no-qemu)" if a.no_qemu else "RECORDED (QEMU or OVMF not installed here)"
        d_ms = [r["downtime"] * 1e3 for r in mine]
        print(f"{mib} MiB: snaplab cow downtime {', '.join(f'{x:.2f}' for x in d_ms)} ms "
              f"(median {np.median(d_ms):.2f}); total {np.median([r['total'] for r in mine]):.2f} s; "
              f"guest progress during the window {np.nanmedian([r['progress'] for r in mine]) * 100:.0f}% of normal; "
              f"arm {np.median([r['arm_ms'] for r in mine]):.3f} ms; "
              f"huge pages behind RAM {min(r['thp_mib'] for r in mine)}-{max(r['thp_mib'] for r in mine)} MiB; "
              f"chunks known zero without a read {int(np.median([r['zero_chunks'] for r in mine]))} of {mine[0]['chunks']} "
              f"(found in {np.median([r['zero_map_ms'] for r in mine]):.2f} ms)")
        cow_t, blk_t = np.median([r["total"] for r in mine]), np.median([r["blocking_total"] for r in mine])
        print(f"   same guest, same run: copy-on-write total {cow_t:.2f} s ({np.median([r['bytes'] for r in mine]) / 2**20:.0f} MiB) "
              f"vs blocking save total {blk_t:.2f} s ({np.median([r['blocking_bytes'] for r in mine]) / 2**20:.0f} MiB), "
              f"downtime {np.median([r['blocking_downtime'] for r in mine]) * 1e3:.0f} ms; cow/blocking total {cow_t / blk_t:.2f} "
              f"(goal <= 1)")
        print(f"   the process's CPU (user + system, all threads; the guest's vCPU included) from the command to the job's end: "
              f"copy-on-write {span(mine, 'cpu_s')} s, of it the fault thread {span(mine, 'fault_cpu_s')} s "
              f"(faults {min(int(r['faults']) for r in mine)}-{max(int(r['faults']) for r in mine)}); blocking {span(mine, 'blocking_cpu_s')} s; "
              f"host CPUs {len(os.sched_getaffinity(0))}")
        print(f"   QEMU 7.2 background-snapshot ({src}): downtime {q_down * 1e3:.1f} ms, total {q_tot:.2f} s; "
              f"ratio downtime {q_down * 1e3 / np.median(d_ms):.1f}x, total {q_tot / np.median([r['total'] for r in mine]):.1f}x")
    print("goals: cow downtime <= 1 ms at 1 GiB, <= 2 ms at 4 GiB; total <= 1 s at 1 GiB; progress >= 50%")


if __name__ == "__main__":
    main()
