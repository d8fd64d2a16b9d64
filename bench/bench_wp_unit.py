"""Benchmark: the copy-on-write unit, 2 MiB against 64 KiB and 4 KiB, for a paced guest.

    python bench/bench_wp_unit.py [--ws-mib 256] [--batch-pages 256] [--period-ms 10] [--batches 25]

A copy-on-write save (emulator/migration/cow.py) serves a guest's write to a protected chunk
by copying the chunk and releasing its protection, in a Python fault thread; the unit is the
2 MiB chunk (docs/deviations.md 38).  The dirty guest at 100 MiB/s writes 256 random pages of
its working set per batch, a batch every 10 ms, and loses the time a batch overruns its period
(``throttle`` in data/guest/workloads.asm).  This puts a writer like it (one 8-byte write into
each page, from a thread, through ``ctypes.memmove``) on a write-protected working set backed by
huge pages, and serves its faults with each unit in turn: per fault, one copy of the unit into a
buffer, then ``UFFDIO_WRITEPROTECT`` release of the unit (a release smaller than 2 MiB splits
the huge page under it).  Nothing else runs: no saver, no writers.  For each unit it prints the
faults, the handler's median time per fault, the batches' times and the **stall**: the time
batches ran past their period, the guest's loss.  The last line is one JSON object:
``{"units": {"2097152": {"faults": n, "handler_us": x, "stall_ms": y, "first_batch_ms": z}, ...}}``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import select
import threading
import time

import numpy as np

from emulator.memory import GuestRAM
from emulator.uffd import UFFDIO_REGISTER_MODE_WP, UserFaultFD

UNITS = (2 << 20, 64 << 10, 4 << 10)


def one_unit(unit: int, ws: int, batch_pages: int, period_s: float, batches: int, seed: int) -> dict[str, float]:
    """One fresh working set, protected whole, written by batches; faults served at ``unit``."""
    ram = GuestRAM(ws)
    u = UserFaultFD()
    stop = threading.Event()
    lat: list[float] = []
    buf = ctypes.create_string_buffer(max(UNITS))
    ctypes.memset(buf, 1, len(buf))  # warm, as the engine's fault buffers

    def serve() -> None:
        p = select.poll()
        p.register(u.fd, select.POLLIN)
        while not stop.is_set():
            if not p.poll(50):
                continue
            for f in u.read_faults():
                t0 = time.perf_counter()
                a = f.address & ~(unit - 1)
                ctypes.memmove(buf, a, unit)
                u.writeprotect(a, unit, False)
                lat.append(time.perf_counter() - t0)

    try:
        ram.populate(write=True)
        u.register(ram.addr, ws, UFFDIO_REGISTER_MODE_WP)
        u.writeprotect(ram.addr, ws, True)
        th = threading.Thread(target=serve, daemon=True)
        th.start()
        rng = np.random.default_rng(seed)
        word = ctypes.c_uint64(7)
        took: list[float] = []
        for _ in range(batches):
            pages = rng.integers(0, ws // 4096, batch_pages).tolist()
            t0 = time.perf_counter()
            for pg in pages:
                ctypes.memmove(ram.addr + pg * 4096, ctypes.byref(word), 8)
            took.append(time.perf_counter() - t0)
            time.sleep(max(0.0, period_s - took[-1]))
        stop.set()
        th.join()
        u.writeprotect(ram.addr, ws, False)
    finally:
        stop.set()
        u.close()
        ram.close()
    return {"faults": len(lat), "handler_us": float(np.median(lat)) * 1e6 if lat else 0.0,
            "handler_sum_ms": sum(lat) * 1e3, "first_batch_ms": took[0] * 1e3,
            "later_batch_ms": float(np.median(took[5:])) * 1e3 if len(took) > 5 else float("nan"),
            "stall_ms": sum(max(0.0, t - period_s) for t in took) * 1e3}


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
