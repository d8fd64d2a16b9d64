"""Notebook 08-reproduction: 8. Reproduction: snaplab beside QEMU 7.2"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 8. Reproduction: snaplab beside QEMU 7.2

What this shows: our downtimes beside QEMU 7.2's, measured on this project's machines (data/reference/qemu-7.2.csv, from shared/reference). The quick mode uses small guests; `bench/bench_snapshot.py` and `bench/bench_cow.py` run the same setup as QEMU's (RAM full of random bytes, 1-4 GiB) and run QEMU itself when it is installed.

Lab functions used: `lab.reference.qemu_reference`, `lab.run.compare`, `lab.run.load_experiment`, `lab.plot.downtime_vs_ram`, `lab.plot.throughput`."""),
    ("code", """from lab.reference import qemu_reference
ref = qemu_reference()
sorted(ref)"""),
    ("code", """ref['blocking save downtime'], ref['background snapshot downtime']"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.run import compare
from lab import plot, results
rows = compare([64, 128], repetitions=1)
print(results.table(rows))
fig = plot.downtime_vs_ram(rows, reference={
    'QEMU 7.2 savevm (recorded)': {k: v * 1e3 for k, v in ref['blocking save downtime'].items()},
    'QEMU 7.2 background-snapshot (recorded)': {k: v * 1e3 for k, v in ref['background snapshot downtime'].items()}})"""),
    ("md", """Throughput: MiB of vmstate written (or read) per second of stop, beside QEMU's recorded figures (QEMU's RAM was full of random bytes, so its vmstate is about its RAM size). The quick guests are small, so fixed costs weigh more here than at 1 GiB; `bench/bench_snapshot.py` measures both sides at 1 GiB in one run."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.run import load_experiment
loads = load_experiment(128, engines=('blocking',), repetitions=1)
fig = plot.throughput(rows, loads, reference=ref)"""),
]
