"""Notebook 07-lazy-restore: 7. Lazy restore"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 7. Lazy restore

What this shows: a blocking `snapshot-load` keeps the guest stopped until all RAM is read back; the lazy engine loads CPU and devices, empties RAM and resumes at once (the disks are reverted right after, before any guest disk access gets through); pages come back on first touch (userfaultfd missing-page faults) and from a background filler.

Lab functions used: `lab.run.load_experiment`, `lab.plot.load_figure`."""),
    ("code", """QUICK = True
RAM_MIB = 128 if QUICK else 4096"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.run import load_experiment
rows = load_experiment(RAM_MIB, repetitions=2)
[(r['engine'], round(r['stopped_ms'], 2), round(r['complete_s'], 3), r['faults']) for r in rows]"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab import plot
fig = plot.load_figure(rows)"""),
    ("code", """lazy = [r for r in rows if r['engine'] == 'lazy']
blocking = [r for r in rows if r['engine'] == 'blocking']
print('every lazy load resumed the guest sooner than every blocking load:',
      max(r['stopped_ms'] for r in lazy) < min(r['stopped_ms'] for r in blocking))"""),
]
