"""Benchmark: where a copy-on-write save's time goes, in CPU time per thread, beside a blocking save.

    python bench/bench_cow_cpu.py [--ram-mib 4096] [--ws-mib 2048] [--rate 100] [--rounds 4] [--out FILE]

Issue #19 asks the copy-on-write save's total to be no longer than the blocking save's.  This
measures why it is longer here: one guest (the dirty workload, ``--rate`` MiB/s at random over
``--ws-mib``), saves of both kinds alternated (ABBA, snapshots deleted between), and for each save
the CPU time every thread of the process used during it (``/proc/self/task/*/stat``, utime +
stime, 10 ms ticks: read the sums, not single threads' small numbers), grouped by the thread's
name (``snaplab-worker`` the saver and writers, ``uffd-faults`` the fault handler, ``vcpu`` the
guest, ...); the job's wall time; and, for copy-on-write, its faults, the handlers' summed time
and, of it, the copying.  The first copy-on-write save of the process also makes its warm copy
buffers (its ``prepare-s``): it is run once before the measured rounds.  The last line is one JSON
object with every save.  A timed experiment: run it alone on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from lab.run import build_machine
from lab.spec import ExperimentSpec

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by native thread id."""
    out: dict[int, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # (a thread that ended meanwhile)
        out[int(tid)] = (int(fields[11]) + int(fields[12])) * TICK_S
    return out


def group_of(tid: int, names: dict[int, str]) -> str:
    """A thread's name without its serial number (``snaplab-worker-3`` -> ``snaplab-worker``)."""
    name = names.get(tid, "other")
    head, _, tail = name.rpartition("-")
    return head if head and tail.isdigit() else name


def cpu_by_group(before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out: dict[str, float] = {}
    for tid, s in after.items():
        d = s - before.get(tid, 0.0)
        if d > 0:
            g = group_of(tid, names)
            out[g] = out.get(g, 0.0) + d
    return out


def one_save(q: Any, kind: str, tag: str) -> dict[str, Any]:
    args: dict[str, Any] = {"job-id": tag, "tag": tag, "vmstate": "disk0", "devices": ["disk0"]}
    if kind == "cow":
        args["__org.snaplab_engine"] = "cow"
    before, t0 = thread_cpu(), time.perf_counter()
    q.execute("snapshot-save", args)
    info = q.wait_job(tag, 600)
    wall, after = time.perf_counter() - t0, thread_cpu()
    if "error" in info:
        raise SystemExit(f"{kind} save failed: {info['error']}")
    st = q.execute("__org.snaplab_query-snapshot-stats", {"id": tag})
    q.execute("job-dismiss", {"id": tag})
    q.execute("snapshot-delete", {"job-id": "d" + tag, "tag": tag, "devices": ["disk0"]})
    q.wait_job("d" + tag)
    q.execute("job-dismiss", {"id": "d" + tag})
    cpu = cpu_by_group(before, after)
    return {"kind": kind, "wall_ms": wall * 1e3, "total_ms": st["total-s"] * 1e3, "downtime_ms": st["downtime-s"] * 1e3,
            "vmstate_mib": st["vmstate-bytes"] / 2**20, "cpu_ms": {k: v * 1e3 for k, v in sorted(cpu.items())},
            "cpu_sum_ms": sum(cpu.values()) * 1e3, "faults": st.get("faults", 0),
            "fault_handler_ms": sum(st.get("fault-latency-s", [])) * 1e3,
            "fault_copy_ms": sum(st.get("fault-copy-s", [])) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram-mib", type=int, default=4096)
    ap.add_argument("--ws-mib", type=int, default=2048)
    ap.add_argument("--rate", type=int, default=100, help="MiB/s the guest writes")
    ap.add_argument("--rounds", type=int, default=4, help="pairs of saves (ABBA order)")
    ap.add_argument("--out", help="also write the JSON line to this file")
    a = ap.parse_args()
    spec = ExperimentSpec(ram_mib=a.ram_mib, working_set_mib=a.ws_mib, dirty_rate_mib_s=a.rate)
    saves: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="snaplab-bench-", dir="/var/tmp") as d:
        m, g = build_machine(spec, Path(d))
        try:
            m.start()
            q = m.qmp()
            time.sleep(3.0)
            one_save(q, "cow", "setup")  # the process's warm copy buffers are made here, not measured
            for i in range(a.rounds):
                for kind in (("cow", "blocking") if i % 2 == 0 else ("blocking", "cow")):
                    time.sleep(0.5)
                    r = one_save(q, kind, f"{kind}{i}")
                    saves.append(r)
                    print(f"{kind:>8}: wall {r['wall_ms']:6.0f} ms, total {r['total_ms']:6.0f} ms, CPU {r['cpu_sum_ms']:5.0f} ms "
                          f"({', '.join(f'{k} {v:.0f}' for k, v in r['cpu_ms'].items())})"
                          + (f"; {r['faults']} faults, handlers {r['fault_handler_ms']:.0f} ms, of it copying "
                             f"{r['fault_copy_ms']:.0f} ms" if kind == "cow" else ""), flush=True)
        finally:
            m.close()
            g.close()
    for kind in ("blocking", "cow"):
        rs = [r for r in saves if r["kind"] == kind]
        print(f"{kind}: median wall {np.median([r['wall_ms'] for r in rs]):.0f} ms, median CPU {np.median([r['cpu_sum_ms'] for r in rs]):.0f} ms")
    line = json.dumps({"ram_mib": a.ram_mib, "ws_mib": a.ws_mib, "rate_mib_s": a.rate, "python": sys.version.split()[0],
                       "saves": saves})
    if a.out:
        Path(a.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
