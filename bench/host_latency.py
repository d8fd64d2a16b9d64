"""Is it the emulator or the host?  Unicorn's speed against the host's memory latency, on one CPU.

    python bench/host_latency.py [--rounds 30] [--mib 64] [--cpu 1]

On the Intel Xeon host the lab's guests switch between two speeds for seconds at a time with no
snapshot running (lab/hostnoise.py).  This alternates, on one pinned CPU, a third of a second of
lab/hostnoise.py's bare Unicorn loop (writes to the first word of random pages of ``--mib``
MiB) with a pointer
chase over 256 MiB (bench/host_latency/chase.c, built here with ``cc``: every load waits for
the one before, so its time per load is the memory latency the CPU sees).  Each round prints
both; the last line is one JSON object with both series and their Spearman rank correlation.
A strong negative correlation (slow loop when loads are slow) puts the switching in the host's
memory, not in the emulator.  Needs a C compiler; not a test.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from lab.hostnoise import unicorn_probe

SRC = Path(__file__).with_name("host_latency") / "chase.c"


def build(out_dir: Path) -> ctypes.CDLL:
    """chase.c compiled with ``cc`` into ``out_dir`` and loaded, its two functions typed."""
    so = out_dir / "chase.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(so), str(SRC)], check=True)
    lib = ctypes.CDLL(str(so))
    lib.setup.argtypes, lib.setup.restype = [ctypes.c_size_t], ctypes.c_int
    lib.chase.argtypes, lib.chase.restype = [ctypes.c_long], ctypes.c_double
    return lib


def ranks(x: np.ndarray) -> np.ndarray:
    """The rank of each value (0 = smallest; no ties expected in timings)."""
    return np.argsort(np.argsort(x)).astype(np.float64)


def main() -> None:
    """Build, pin, alternate ``--rounds`` times, print each round and the summary line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--mib", type=int, default=64, help="the Unicorn loop's buffer (a power of two)")
    ap.add_argument("--cpu", type=int, default=os.cpu_count() - 1 if os.cpu_count() else 0)
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.cpu})
    with tempfile.TemporaryDirectory() as d:
        lib = build(Path(d))
        if lib.setup(256) != 0:
            raise SystemExit("host_latency: could not allocate the 256 MiB chase buffer")
        lib.chase(2_000_000)  # warm-up: setup() wrote every line; this walks the cycle once untimed
        uc, lat = [], []
        for k in range(a.rounds):
            uc.append(unicorn_probe(0.3, a.mib)["median"])
            lat.append(lib.chase(1_500_000))
            print(f"round {k:3d} on CPU {a.cpu}: Unicorn loop {uc[-1]:6.2f} M writes/s, chase {lat[-1]:6.1f} ns/load",
                  flush=True)
    u, ln = np.array(uc), np.array(lat)
    rho = float(np.corrcoef(ranks(u), ranks(ln))[0, 1])
    print(f"Spearman rank correlation (Unicorn speed, load latency): {rho:+.2f}")
    print(json.dumps({"cpu": a.cpu, "mib": a.mib, "unicorn_mwps": [round(x, 2) for x in uc],
                      "chase_ns": [round(x, 1) for x in lat], "spearman": round(rho, 3)}))


if __name__ == "__main__":
    main()
