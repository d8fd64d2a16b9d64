"""Notebook 07-lazy-restore: 7. Lazy restore"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 7. Lazy restore

What this shows: a blocking `snapshot-load` keeps the guest stopped until all RAM is read back; the lazy load engines (every one after the first in the registry: on demand, background, prefetch) load CPU and devices, empty RAM and resume at once (the disks are reverted right after, before any guest disk access gets through); pages come back on first touch (userfaultfd missing-page faults), and, depending on the engine, from a background filler or a prefetch of the snapshot's recorded loading set.

Lab functions used: `lab.run.load_experiment`, `lab.plot.load_figure`, `lab.spec.resumes_early`."""),
    ("code", """QUICK = True
RAM_MIB = 128 if QUICK else 4096"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.run import load_experiment
rows = load_experiment(RAM_MIB, repetitions=2)
[(r['engine'], round(r['stopped_ms'], 2), round(r['complete_s'], 3), r['faults']) for r in rows]"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab import plot
fig = plot.load_figure(rows)"""),
    ("code", """from lab.spec import resumes_early
lazy = [r for r in rows if resumes_early(r['engine'])]
blocking = [r for r in rows if not resumes_early(r['engine'])]
print('every lazy load resumed the guest sooner than every blocking load:',
      max(r['stopped_ms'] for r in lazy) < min(r['stopped_ms'] for r in blocking))"""),
]
