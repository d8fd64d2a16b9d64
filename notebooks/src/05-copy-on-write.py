"""Notebook 05-copy-on-write: 5. Copy-on-write snapshots"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 5. Copy-on-write snapshots

What this shows: a blocking save stops the guest for as long as it takes to write its RAM; the copy-on-write engine stops it only to freeze the disks and write-protect RAM (userfaultfd), then saves in the background while the guest runs. The saved state is still the stop instant, bit for bit: every page's generation stamp matches the host-side model of the workload at the guest's own iteration counter.

Lab functions used: `lab.run.compare`, `lab.plot.downtime_vs_ram`, `lab.results.table`, `lab.proofs.stop_instant_proof`."""),
    ("code", """QUICK = True   # False: the full experiment (RAM up to 4 GiB, more repetitions)
SIZES = [64, 128] if QUICK else [256, 1024, 4096]
REPS = 1 if QUICK else 5
SEED = 1"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.run import compare
from lab import results
rows = compare(SIZES, seed=SEED, repetitions=REPS)
print(results.table(rows))"""),
    ("code", """cow = [r for r in rows if r['engine'] == 'cow']
blk = [r for r in rows if r['engine'] == 'blocking']
print('copy-on-write downtime shorter than blocking at every size:',
      all(c['downtime_ms'] < b['downtime_ms'] for c, b in zip(cow, blk)))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab import plot
fig = plot.downtime_vs_ram(rows)"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# the guest keeps running through the window, slowed while it faults
from lab.run import run_experiment
from lab.spec import ExperimentSpec
one = run_experiment(ExperimentSpec(ram_mib=max(SIZES), engine='cow', repetitions=2, seed=SEED))
fig = plot.progress_timeline(one[-1])"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
fig = plot.fault_latency(one)"""),
    ("code", """from lab.proofs import stop_instant_proof
stop_instant_proof('cow', seed=SEED)"""),
]
