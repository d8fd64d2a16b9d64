"""Benchmark: the copy-on-write unit, 2 MiB against 64 KiB and 4 KiB, for a paced guest.

    python bench/bench_wp_unit.py [--ws-mib 256] [--batch-pages 256] [--period-ms 10] [--batches 25]

A copy-on-write save (emulator/migration/cow.py) serves a guest's write to a protected chunk
by copying the chunk and releasing its protection, in a Python fault thread; the unit is the
2 MiB chunk (docs/deviations.md 38).  The dirty guest at 100 MiB/s writes 256 random pages of
its working set per batch, a batch every 10 ms, and loses the time a batch overruns its period
(``throttle`` in data/guest/workloads.asm).  This puts a writer like it (one byte stored into
each page, from a thread, through ``ctypes.memset``) on a write-protected working set backed by
huge pages, and serves its faults with each unit in turn (``lab.uffd_steps.write_fault_loop``, paced):
per fault, one copy of the unit into a buffer, then ``UFFDIO_WRITEPROTECT`` release of the unit (a release smaller than 2 MiB splits
the huge page under it).  Nothing else runs: no saver, no writers.  For each unit it prints the
faults, the handler's median time per fault, the batches' times and the **stall**: the time
batches ran past their period, the guest's loss.  The last line is one JSON object:
``{"units": {"2097152": {"faults": n, "handler_us": x, "stall_ms": y, "first_batch_ms": z}, ...}}``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from lab.uffd_steps import write_fault_loop

UNITS = (2 << 20, 64 << 10, 4 << 10)


def one_unit(unit: int, ws: int, batch_pages: int, period_s: float, batches: int, seed: int) -> dict[str, float]:
    """One fresh working set, protected whole, written by paced batches; faults served at
    ``unit`` (:func:`lab.uffd_steps.write_fault_loop`, the loop notebook 6 teaches)."""
    r = write_fault_loop(unit, size=ws, writes=batches * batch_pages, seed=seed, batch=batch_pages,
                         period_s=period_s)
    took, lat = r["batch_ms"], r["service_us"]
    return {"faults": r["faults"], "handler_us": float(np.median(lat)) if lat else 0.0,
            "handler_sum_ms": sum(lat) / 1e3, "first_batch_ms": took[0],
            "later_batch_ms": float(np.median(took[5:])) if len(took) > 5 else float("nan"),
            "stall_ms": r["stall_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ws-mib", type=int, default=256)
    ap.add_argument("--batch-pages", type=int, default=256)
    ap.add_argument("--period-ms", type=float, default=10.0)
    ap.add_argument("--batches", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.ws_mib <= 0 or a.ws_mib % 2 or a.batch_pages <= 0 or a.period_ms <= 0 or a.batches <= 0:
        ap.error("--ws-mib must be a positive even number of MiB; --batch-pages, --period-ms, --batches positive")
    out = {}
    for unit in UNITS:
        r = one_unit(unit, a.ws_mib << 20, a.batch_pages, a.period_ms / 1e3, a.batches, a.seed)
        out[str(unit)] = r
        print(f"unit {unit >> 10:5d} KiB: {r['faults']:5d} faults, handler median {r['handler_us']:.0f} us "
              f"(sum {r['handler_sum_ms']:.1f} ms); first batch {r['first_batch_ms']:.1f} ms, later median "
              f"{r['later_batch_ms']:.2f} ms; stall past the {a.period_ms:g} ms period {r['stall_ms']:.1f} ms", flush=True)
    print(json.dumps({"ws_mib": a.ws_mib, "batch_pages": a.batch_pages, "period_ms": a.period_ms,
                      "batches": a.batches, "units": out}))


if __name__ == "__main__":
    main()
