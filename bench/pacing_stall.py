"""Does the paced dirty guest make up for a stall?  (The progress ratio's meaning rests on it.)

    python bench/pacing_stall.py [--stalls 0.05,0.1,0.3] [--rate-mib 100]

The dirty workload paces its page writes by the virtual clock (``throttle`` in
data/guest/workloads.asm).  During a copy-on-write fault the vCPU is blocked while that clock runs
on, like here, where the vCPU is held for ``stall`` seconds by a thread that keeps the GIL (the
guest's clock read is a port access, served in Python).  If the guest made up for it, its
iterations from the stall's start to ``stall + 0.5`` s later would be the steady rate's over the
whole interval (ratio 1); if the stall is simply lost, ``0.5 / (stall + 0.5)``.  Prints both per
stall, from the lab port's host-stamped samples.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

from emulator.block import Qcow2Image
from emulator.block.node import BlockGraph
from emulator.guest import WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig

AFTER_S = 0.5


def count_between(m: Machine, t0_ns: int, t1_ns: int) -> float:
    """Iterations between two host instants, interpolated from the lab port's samples."""
    h = m.lab.history_array()
    host, it = h[:, 1].astype(np.float64), h[:, 2].astype(np.float64)
    return float(np.interp(t1_ns, host, it) - np.interp(t0_ns, host, it))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stalls", default="0.05,0.1,0.3")
    ap.add_argument("--rate-mib", type=int, default=100)
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="snaplab-pacing-"))
    Qcow2Image.create(work / "d.qcow2", 64 << 20).close()
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(work / "d.qcow2"), "node-name": "f"})
    g.add({"driver": "qcow2", "file": "f", "node-name": "disk0"})
    spec = WorkloadSpec("dirty", seed=1, working_set=64 << 20, pattern="random", rate=args.rate_mib << 20)
    m = Machine(MachineConfig(ram_size=256 << 20, workload=spec, disks=[DiskSpec("disk0")]), g)
    try:
        m.start()
        time.sleep(2.0)  # steady state
        t = time.monotonic_ns()
        time.sleep(1.0)
        steady = count_between(m, t, time.monotonic_ns()) / 1.0
        print(f"steady: {steady:.0f} iterations/s (seed 1, {args.rate_mib} MiB/s, 64 MiB working set)")
        for stall in (float(x) for x in args.stalls.split(",")):
            time.sleep(1.0)
            before = sys.getswitchinterval()
            sys.setswitchinterval(stall + 0.05)
            t0 = time.monotonic_ns()
            while time.monotonic_ns() - t0 < stall * 1e9:  # keeps the GIL: the vCPU waits at its next port access
                pass
            sys.setswitchinterval(before)
            time.sleep(AFTER_S + 0.05)
            t1 = t0 + int((stall + AFTER_S) * 1e9)
            got = count_between(m, t0, t1) / (steady * (stall + AFTER_S))
            print(f"stall {stall * 1e3:4.0f} ms: iterations over the {stall + AFTER_S:.2f} s from its start = "
                  f"{got:.2f} of the steady rate's; made up: 1.00, lost: {AFTER_S / (stall + AFTER_S):.2f}")
    finally:
        m.close()
        g.close()


if __name__ == "__main__":
    main()
