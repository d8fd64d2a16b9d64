"""Notebook 06-engines: 6. Blocking vs copy-on-write vs pre-copy"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 6. Blocking vs copy-on-write vs pre-copy

What this shows, in one figure: how long each engine stops the guest, how long until the snapshot exists, and how fast the guest runs meanwhile; and which instant each one saves (blocking and copy-on-write: the stop; pre-copy: the end).

Lab functions used: `lab.run.run_experiment`, `lab.plot.engines_figure`, `lab.proofs.stop_instant_proof`."""),
    ("code", """QUICK = True
RAM_MIB = 128 if QUICK else 1024
REPS = 2 if QUICK else 5"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.run import run_experiment
from lab.spec import ExperimentSpec
from lab import results
rows = []
for eng in ('blocking', 'cow', 'precopy'):
    rows += run_experiment(ExperimentSpec(ram_mib=RAM_MIB, engine=eng, repetitions=REPS))
print(results.table(rows))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab import plot
fig = plot.engines_figure(rows)"""),
    ("code", """from lab.proofs import stop_instant_proof
[stop_instant_proof(e)['exact'] for e in ('blocking', 'cow', 'precopy')]"""),
]
