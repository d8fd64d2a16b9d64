"""Teardown stress, long version (issue #20): 1000 cycles by default (900 in-process, 100
``snaplab-system`` processes) of create -> start -> snapshot with every engine / load /
lazy fill / migrate -> quit, close or signal at a random point; prints hangs, deaths by
signal, segfaults in dmesg and the process's threads, fds, userfaultfd registrations and
RSS before and after.  The CI-sized version is tests/stress/test_teardown.py.

    python bench/stress_teardown.py [--cycles 1000] [--processes 100] [--seed 20]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.stress.cycles import Tally, in_process_cycle, process_cycle, sample  # noqa: E402


def segfaults() -> int | None:
    """Segfault lines in the kernel log (None if it cannot be read)."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return out.stdout.count("segfault") if out.returncode == 0 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=100, help="how many of the cycles are processes")
    ap.add_argument("--seed", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tally = Tally()
    seg0 = segfaults()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for i in range(10):  # warm-up: the pools reach their size
            (work / f"w{i}").mkdir()
            in_process_cycle(work / f"w{i}", rng, tally)
        before = sample()
        n_proc = min(args.processes, args.cycles)
        every = max(args.cycles // max(n_proc, 1), 1)
        for i in range(args.cycles):
            (work / f"c{i}").mkdir()
            if n_proc and i % every == 0:
                process_cycle(work / f"c{i}", rng, tally)
            else:
                in_process_cycle(work / f"c{i}", rng, tally)
            if (i + 1) % 100 == 0:
                print(f"  {i + 1} cycles, {tally.hangs} hangs, rss {sample().rss_kib // 1024} MiB", flush=True)
        after = sample()
    seg1 = segfaults()
    print(f"cycles: {tally.cycles - 10} (+10 warm-up) in {time.monotonic() - t0:.0f} s")
    print(f"hangs: {tally.hangs}   deaths by signal: {tally.signal_deaths}   other bad exits: {tally.bad_exits}")
    print(f"SHUTDOWN events seen by the signalled processes' clients: {tally.shutdown_events}")
    print(f"segfaults in dmesg during the run: {'unreadable' if seg0 is None or seg1 is None else seg1 - seg0}")
    print(f"threads {before.threads} -> {after.threads}   fds {before.fds} -> {after.fds}   "
          f"uffd fds {before.uffd_fds} -> {after.uffd_fds}   uffd ranges {before.uffd_ranges} -> {after.uffd_ranges}")
    print(f"RSS {before.rss_kib // 1024} MiB -> {after.rss_kib // 1024} MiB")
    print("by scenario:", dict(sorted(tally.by_scenario.items())))
    for f in tally.failures[:20]:
        print("  failure:", f)
    return 1 if tally.hangs or tally.signal_deaths or tally.bad_exits or tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
