"""Snapshot saves on one running mixed guest, each followed by a check of the live guest:
its run state, its RAM (page stamps), its lab page and disk0 against the model of its writes.

The loop that found the pre-copy corruption's cause (docs/test-runs.md, 2026-12-05): at
4809f66, beside two CPU hogs, pre-copy saves failed at iterations 473, 473 and 513 (the guest
in internal-error at pc 0x1001ff, "write outside RAM", twice; its lab page inconsistent once),
blocking saves 0 in 1,800; at c7607e8, pre-copy 0 in 1,600 and 0 in 1,800.

    python bench/precopy_repro.py [--engine precopy] [--iterations 2000] [--seed 1] [--no-collapse]

Prints a line every 100 saves and the first failure; exit status 1 if one was found.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.stress.kill9 as k  # noqa: E402
from emulator.block import Qcow2Image  # noqa: E402
from emulator.memory import GuestRAM  # noqa: E402
from tests.model.guestdisk import data_range, disk0_problem, ram_problems  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="precopy")
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-collapse", action="store_true", help="skip the huge-page collapse after each save")
    args = ap.parse_args()
    if args.no_collapse:
        GuestRAM.collapse_chunks = lambda self, data: None  # type: ignore[method-assign]
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="snaplab-precopy-repro-"))
    for d in k.DISKS:
        Qcow2Image.create(work / f"{d}.qcow2", k.DISK, cluster_size=rng.choice([4096, 65536])).close()
    m, g = k.machine_on(work)
    found = None
    t0 = time.monotonic()
    try:
        m.start()
        for i in range(args.iterations):
            vmstate = rng.choice(k.DISKS)
            time.sleep(rng.uniform(0, 0.05))
            m.snapshots.save_snapshot("t", False, vmstate, list(k.DISKS), args.engine)
            time.sleep(rng.uniform(0, 0.02))
            m.stop()
            if m.runctl.fault is not None:
                found = f"{m.state.value}: {m.runctl.fault}"
            else:
                counter = m.ram.read_u64(k.LAB_COUNTER)
                a, n = data_range(k.SPEC, k.RAM)
                img0 = g["disk0"].format_image
                found = ram_problems(k.SPEC, k.RAM, m.ram.read(a, n), counter) or disk0_problem(
                    k.SPEC, bytes(k.DISK), counter, m.ram.read_u64, img0.read(0, img0.size))
            if found is not None:
                print(f"iteration {i} (VM state on {vmstate}): {found}", flush=True)
                break
            m.snapshots.delete_snapshot("t", list(k.DISKS))
            m.cont()
            if i % 100 == 0:
                print(f"iteration {i}, {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        m.close()
        g.close()
    print(f"{args.engine}: {i + 1} saves, {'1 failure' if found else 'no failure'}, {time.monotonic() - t0:.0f} s")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
