"""Notebook 04-blocking-savevm: 4. Blocking savevm"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 4. Blocking savevm

What this shows: a blocking save stops the guest while it scans RAM for zero pages, writes the rest into the qcow2 image and commits the snapshot; the stop grows with the RAM in use. QEMU 7.2's recorded figures (RAM full of random bytes) are drawn beside.

Lab functions used: `lab.run.run_experiment`, `lab.results.table`, `lab.plot.downtime_vs_ram`, `lab.reference.qemu_reference`."""),
    ("code", """QUICK = True
SIZES = [64, 128, 256] if QUICK else [256, 1024, 2048, 4096]
SEED = 1"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.run import run_experiment
from lab.spec import ExperimentSpec
from lab import results
rows = []
for mib in SIZES:
    rows += run_experiment(ExperimentSpec(ram_mib=mib, engine='blocking', seed=SEED, repetitions=2))
print(results.table(rows))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# where the time goes, per save (ms)
[(r['ram_mib'], round(r['zero_scan_ms'], 1), round(r['write_ms'], 1), round(r['commit_ms'], 1)) for r in rows]"""),
    ("code", """print('the stopped time includes the zero scan, the writes and the commit:',
      all(r['downtime_internal_ms'] >= r['write_ms'] for r in rows))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab import plot
from lab.reference import qemu_reference
ref = qemu_reference()
fig = plot.downtime_vs_ram(rows, reference={'QEMU 7.2 savevm (recorded)': {k: v * 1000 for k, v in ref['blocking save downtime'].items()}})"""),
]
