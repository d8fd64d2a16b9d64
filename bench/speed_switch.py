"""Does the guest change speed on its own?  The restore bench's guest, left alone.

    python bench/speed_switch.py [--ram-mib 1024] [--ws-mib 64] [--seconds 12] [--flush-every S]

Boots bench/bench_restore.py's guest (random RAM, the unthrottled dirty workload over a working
set at a seeded place, lab/restore.py) and takes no snapshot: it only watches the guest's
progress rate, the median of its 20 ms windows in each half second.  With ``--flush-every S``
it also takes the vCPU out of the guest every S seconds for an instant, long enough to flush
its softmmu TLB (no stop, no event):
if the speed switching came from Unicorn's TLB resizing at flushes, this would move it.
The last line is one JSON object with the half-second medians.  Timed: run it alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lab.restore import RestoreSpec, _fill_random, _machine, _window_rates


def main() -> None:
    """Boot, watch (flushing if asked), print the half-second medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--ws-mib", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--flush-every", type=float, default=0.0, help="stop, flush the TLB, cont every S s (0: never)")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    spec = RestoreSpec(ram_mib=a.ram_mib, ws_mib=a.ws_mib, runs=1, seed=a.seed)
    with tempfile.TemporaryDirectory(prefix="snaplab-speed-", dir="/var/tmp") as tmp:
        m, g = _machine(spec, Path(tmp))
        try:
            _fill_random(m, spec.seed)
            m.start()
            t0 = time.monotonic_ns()
            flushes = 0
            with m.qmp() as q:
                while (time.monotonic_ns() - t0) / 1e9 < a.seconds:
                    time.sleep(a.flush_every or a.seconds)
                    if a.flush_every:  # the vCPU out of the guest for an instant, the flush done meanwhile
                        m.runctl.while_parked(m.cpu.flush_tlb)
                        flushes += 1
                samples = m.lab.history_array()
                q.execute("quit")
        finally:
            m.close()
            g.close()
    ts, its = samples[:, 1].astype(np.float64), samples[:, 2].astype(np.float64)
    grid, rate = _window_rates(ts, its, max(ts[0], t0), ts[-1])
    rel = (grid - t0) / 1e9
    halves = []
    for h in np.arange(0.0, a.seconds, 0.5):
        sel = (rel >= h) & (rel < h + 0.5)
        if sel.any():
            halves.append(round(float(np.median(rate[sel])) / 1e6, 2))
    print(f"{spec.ram_mib} MiB, working set {spec.ws_mib} MiB, seed {spec.seed}, "
          f"{'TLB flushed every %g s (%d flushes)' % (a.flush_every, flushes) if a.flush_every else 'left alone'}: "
          "M pages/s per half second: " + " ".join(f"{x:.1f}" for x in halves))
    print(json.dumps({"ram_mib": spec.ram_mib, "ws_mib": spec.ws_mib, "seed": spec.seed, "flush_every_s": a.flush_every,
                      "flushes": flushes, "half_second_mpps": halves}))


if __name__ == "__main__":
    main()
