"""Benchmark: copy-on-write snapshot downtime, total time and guest progress, vs QEMU 7.2.

    python bench/bench_cow.py [--sizes 1024,4096] [--runs 4] [--ws-mib 256] [--no-qemu]

snaplab: ``snapshot-save`` with ``__org.snaplab_engine: cow`` on a guest dirtying 100 MiB/s at
random over ``--ws-mib`` (256, as the reproduction's dirty guest, at most half of RAM; 0: half of RAM), and a
blocking ``snapshot-save`` of the same guest beside each, before and after in turn (ABBA), the
total of each, same run, after ``--warmup`` saves of each kind not measured (1).  Every save
starts from steady state: the guest has written 7 working
sets' worth of pages (99.9% of the set touched) and ran at its rate over the last second
(lab.reproduce.wait_steady, the reproduction's rule); the engine's one-time setup is made
before the guest starts (lab.run.engine_setup), so no save pays for it.
QEMU 7.2: ``migrate-set-capabilities background-snapshot`` + ``migrate exec:cat > FILE`` on
an OVMF guest with RAM filled through ``-device loader`` (the reference's setup), when
``qemu-system-x86_64`` and OVMF are installed; otherwise the recorded figures are used, and
the output says so.  Downtime is STOP -> RESUME from the event timestamps.  Guest progress
during the save is the reproduction's ``progress_ratio`` (lab.reproduce.progress_rates): the
lab port's rate from the command to the job's end over its rate in the second before.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cow_cpu import cpu_by_group, thread_cpu  # noqa: E402
from bench_snapshot import OVMF, drop_caches, warm_memory  # noqa: E402

from emulator.guest import PAGE, WorkloadSpec  # noqa: E402
from lab import qemu as qemu_lab  # noqa: E402
from lab.reproduce import (  # noqa: E402
    TOUCHED_WS,
    Guest,
    machine_guest,
    progress_rates,
    rate_ratio,
    run_job,
    stopped_ms,
    wait_steady,
)
from lab.run import build_machine, engine_setup, wait_for_progress  # noqa: E402
from lab.spec import ExperimentSpec  # noqa: E402

RATE_MIB_S = 100  # the guest's dirtying rate (issue #16's and the reproduction's)
RECORDED = {1024: (0.0073, 4.554), 4096: (0.0251, 11.422)}  # QEMU 7.2 bg snapshot: median downtime, total (s)


def cpu_used(before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
    """The process's CPU seconds between two :func:`bench_cow_cpu.thread_cpu` readings, and of
    them the userfaultfd fault thread's (cow.WriteProtector's ``uffd-faults``)."""
    by = cpu_by_group(before, after)
    return sum(by.values()), by.get("uffd-faults", 0.0)


def ours(mib: int, runs: int, ws_mib: int, warmup: int) -> list[dict[str, float]]:
    """``runs`` copy-on-write saves of one guest, each beside a blocking save of it (ABBA),
    every save started once the guest is in steady state (lab.reproduce.wait_steady: it has
    written TOUCHED_WS working sets' worth of pages, and ran at its rate, within 3%, over the
    last second), never after a fixed sleep.  The copy-on-write engine's one-time setup
    (lab.run.engine_setup) is made before the guest starts, outside every save; then ``warmup``
    saves of each kind, not measured, so that the first measured one is not a machine's first."""
    out = []
    spec = ExperimentSpec(ram_mib=mib, working_set_mib=ws_mib, dirty_rate_mib_s=RATE_MIB_S, engine="cow")
    with tempfile.TemporaryDirectory(prefix="snaplab-bench-", dir="/var/tmp") as d:
        m, graph = build_machine(spec, Path(d))
        w = m.config.workload  # the guest's workload as build_machine made it (its working set, its rate)
        least = int(TOUCHED_WS * w.working_set // PAGE)
        try:
            setup_s = engine_setup(m, spec)
            m.start()
            wait_for_progress(m)
            g = machine_guest(m, Path(d), [])
            for i in range(warmup):
                for kind, extra in (("wc", {"__org.snaplab_engine": "cow"}), ("wb", {})):
                    ready(g, w, least)
                    save(g, f"{kind}{i}", extra)
                    delete(g, f"{kind}{i}")
            for i in range(runs):
                # ABBA: which save comes first alternates, so a trend in the guest's state
                # (the working set still filling, if steady state came early) stays out of the ratio
                blk_first = blocking_save(g, w, least, i) if i % 2 else None
                steady = ready(g, w, least)
                c0 = thread_cpu()
                st, t0_ns, t1_ns = save(g, f"c{i}", {"__org.snaplab_engine": "cow"})
                cpu, fault_cpu = cpu_used(c0, thread_cpu())
                before, during = progress_rates(g, t0_ns, t1_ns)
                out.append({"downtime": stopped_ms(g.qmp.events) / 1e3, "engine_downtime": st["downtime-s"],
                            "total": st["total-s"], "bytes": st["vmstate-bytes"],
                            "thp_mib": m.ram.huge_bytes() >> 20, "steady": steady, "setup_s": setup_s,
                            "progress": rate_ratio(before, during),
                            "faults": st["faults"], "arm_ms": st["arm-s"] * 1e3,
                            "zero_chunks": st.get("zero-chunks", 0), "chunks": mib // 2,
                            "cpu_s": cpu, "fault_cpu_s": fault_cpu,
                            "zero_map_ms": st.get("zero-map-s", 0.0) * 1e3})
                delete(g, f"c{i}")
                out[-1] |= blk_first if blk_first is not None else blocking_save(g, w, least, i)
        finally:
            m.close()
            graph.close()
    return out


def ready(g: Guest, w: WorkloadSpec, least: int) -> bool:
    """Until the guest is in steady state (lab.reproduce.wait_steady); False, and said on
    stderr, if it was not within its time limit (the save is measured anyway, and counted)."""
    if wait_steady(g, w, least):
        return True
    print(f"  the guest did not run steadily at {RATE_MIB_S} MiB/s within the time limit: this save "
          "is measured anyway and not counted as from steady state", file=sys.stderr, flush=True)
    return False


def save(g: Guest, tag: str, extra: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
    """``snapshot-save`` of ``tag`` to its job's end (lab.reproduce.run_job): the job's
    statistics, and the command's and the job's end's monotonic ns (the window a progress
    ratio is measured over)."""
    st: dict[str, Any] = {}
    _, _, t0, t1 = run_job(g, "snapshot-save", {"job-id": tag, "tag": tag, "vmstate": "disk0", "devices": ["disk0"], **extra},
                           lambda: st.update(g.qmp.cmd("__org.snaplab_query-snapshot-stats", {"id": tag})))
    return st, t0, t1


def delete(g: Guest, tag: str) -> None:
    run_job(g, "snapshot-delete", {"job-id": f"d-{tag}", "tag": tag, "devices": ["disk0"]})


def blocking_save(g: Guest, w: WorkloadSpec, least: int, i: int) -> dict[str, float]:
    """QEMU's blocking save of the same guest, right before or after the copy-on-write one
    (same file system), from steady state: its downtime (STOP to RESUME), its total (the
    engine's ``total-s``: from the job's start to its end, the flush included, as for
    copy-on-write) and its VM-state bytes."""
    steady = ready(g, w, least)
    c0 = thread_cpu()
    st, _, _ = save(g, f"b{i}", {})
    cpu, _ = cpu_used(c0, thread_cpu())
    down = stopped_ms(g.qmp.events) / 1e3
    delete(g, f"b{i}")
    return {"blocking_steady": steady, "blocking_downtime": down, "blocking_total": st["total-s"],
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
    ap.add_argument("--ws-mib", type=int, default=256,
                    help="the guest's working set, MiB, at most half of RAM (0: half of RAM)")
    ap.add_argument("--warmup", type=int, default=1, help="saves of each kind made first and not measured")
    ap.add_argument("--no-qemu", action="store_true")
    a = ap.parse_args()
    try:
        sizes = [int(x) for x in a.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes: {a.sizes!r}: expected RAM sizes in MiB such as 1024,4096")
    if not all(64 <= s <= 16384 for s in sizes):
        ap.error(f"--sizes: {a.sizes}: each from 64 to 16384 MiB")
    if a.runs < 1:
        ap.error(f"--runs: {a.runs}: at least 1")
    if a.warmup < 0:
        ap.error(f"--warmup: {a.warmup}: 0 or more")
    if a.ws_mib < 0:
        ap.error(f"--ws-mib: {a.ws_mib}: expected a working set in MiB, or 0 for half of RAM")
    if a.runs % 2:
        print(f"note: --runs {a.runs} is odd, so the blocking save comes after the copy-on-write one once more "
              "than before it: the ABBA order is not balanced")
    print(f"warming host memory: {warm_memory((max(sizes) << 20) * 3):.1f} s")
    have_qemu = shutil.which("qemu-system-x86_64") and (OVMF / "OVMF_CODE.fd").exists() and not a.no_qemu
    for mib in sizes:
        drop_caches()
        ws_mib = min(a.ws_mib, mib // 2)  # at most half of RAM, as the reproduction's (lab.reproduce.ReproSpec.working_set)
        mine = ours(mib, a.runs, ws_mib, a.warmup)
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
        report(mib, mine, ws_mib, a.warmup)
        print(f"   QEMU 7.2 background-snapshot ({src}; not the same guest: idle, its RAM random bytes, the "
              f"reference's setup): downtime {q_down * 1e3:.1f} ms, total {q_tot:.2f} s")
    print("issue #19's goals: copy-on-write downtime <= 0.5 ms at every size from 256 MiB to 16 GiB; "
          "its total <= the blocking save's (same guest, same run)")


def report(mib: int, mine: list[dict[str, Any]], ws_mib: int, warmup: int) -> None:
    """One size's lines: medians with min-max, the ratio of the medians and each pair's."""
    def mm(key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
        v = np.array([r[key] for r in mine], dtype=float) * scale
        return f"{np.nanmedian(v):{fmt}} ({np.nanmin(v):{fmt}}-{np.nanmax(v):{fmt}})"

    d_ms = [r["downtime"] * 1e3 for r in mine]
    print(f"{mib} MiB, working set {ws_mib or mib // 2} MiB, {len(mine)} saves of each kind "
          f"(from steady state: {sum(bool(r['steady']) for r in mine)} copy-on-write, "
          f"{sum(bool(r['blocking_steady']) for r in mine)} blocking; after {warmup} unmeasured of each; engine setup "
          f"{mine[0]['setup_s']:.2f} s before the guest started): copy-on-write downtime {', '.join(f'{x:.2f}' for x in d_ms)} ms, median (min-max) "
          f"{mm('downtime', 1e3)} ms; arm {mm('arm_ms', 1.0, '.3f')} ms; huge pages behind RAM "
          f"{min(r['thp_mib'] for r in mine)}-{max(r['thp_mib'] for r in mine)} MiB; chunks known zero without a read "
          f"{int(np.median([r['zero_chunks'] for r in mine]))} of {mine[0]['chunks']} "
          f"(found in {np.median([r['zero_map_ms'] for r in mine]):.2f} ms)")
    print(f"   guest progress during the copy-on-write save (rate from the command to the job's end over the "
          f"second before): {mm('progress', 100, '.0f')} %")
    cow_t, blk_t = np.median([r["total"] for r in mine]), np.median([r["blocking_total"] for r in mine])
    pairs = [r["total"] / r["blocking_total"] for r in mine]
    print(f"   same guest, same run: copy-on-write total {mm('total', 1e3, '.1f')} ms ({np.median([r['bytes'] for r in mine]) / 2**20:.0f} MiB) "
          f"vs blocking save total {mm('blocking_total', 1e3, '.1f')} ms ({np.median([r['blocking_bytes'] for r in mine]) / 2**20:.0f} MiB), "
          f"its downtime {mm('blocking_downtime', 1e3, '.0f')} ms; cow/blocking total: ratio of the medians "
          f"{cow_t / blk_t:.2f}, each pair {min(pairs):.2f}-{max(pairs):.2f} (goal <= 1)")
    print(f"   the process's CPU (user + system, all threads; the guest's vCPU included) from the command to the job's end: "
          f"copy-on-write {span(mine, 'cpu_s')} s, of it the fault thread {span(mine, 'fault_cpu_s')} s "
          f"(faults {min(int(r['faults']) for r in mine)}-{max(int(r['faults']) for r in mine)}); blocking {span(mine, 'blocking_cpu_s')} s; "
          f"host CPUs {len(os.sched_getaffinity(0))}")


if __name__ == "__main__":
    main()
