"""Benchmark: guest speed of the ``dirty`` workload with no snapshot in progress.

    python bench/bench_guest.py [--ram-mib 1024] [--seconds 3]

Instructions per iteration are measured exactly (deterministic stepping with count=); the
free-running rate comes from the lab port's progress samples.  Reference: plain Unicorn runs
~110 M insn/s for sequential stores on these machines (docs/reference/unicorn-notes.md);
the goal is >= 80 M insn/s.
"""

from __future__ import annotations

import argparse
import time

from emulator.guest import WorkloadSpec
from emulator.machine import Machine, MachineConfig


def insns_per_iteration(spec: WorkloadSpec, ram: int) -> float:
    with Machine(MachineConfig(ram_size=ram, workload=spec)) as m:
        m.run_instructions(2_000_000)  # boot, warm up
        i0 = m.ram.read_u64(0x7000)
        n = 20_000_000
        m.run_instructions(n)
        i1 = m.ram.read_u64(0x7000)
        return n / max(i1 - i0, 1)


def free_rate(spec: WorkloadSpec, ram: int, seconds: float) -> tuple[float, float]:
    with Machine(MachineConfig(ram_size=ram, workload=spec)) as m:
        m.start()
        time.sleep(0.5)
        s0 = m.lab.last
        time.sleep(seconds)
        s1 = m.lab.last
        m.stop()
    dt = (s1.vclock_ns - s0.vclock_ns) / 1e9
    return (s1.iterations - s0.iterations) / dt, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    if not 16 <= args.ram_mib <= 65536 or args.seconds <= 0:
        ap.error("--ram-mib: 16 to 65536; --seconds: more than 0")
    ram = args.ram_mib << 20
    print(f"{'pattern':<12}{'insn/iter':>10}{'M iter/s':>10}{'M insn/s':>10}{'GB/s dirtied':>14}")
    for pattern in ("sequential", "random", "hot-cold"):
        spec = WorkloadSpec("dirty", seed=1, pattern=pattern)
        ipi = insns_per_iteration(spec, ram)
        rate, _ = free_rate(spec, ram, args.seconds)
        print(f"{pattern:<12}{ipi:10.1f}{rate / 1e6:10.2f}{rate * ipi / 1e6:10.1f}{rate * 4096 / 1e9:14.2f}")
    print("goal: >= 80 M insn/s; no Python hook runs on the guest's hot path (one lab-port call per batch)")


if __name__ == "__main__":
    main()
