"""Notebook 13-dashboard: snapshots by hand, with the dashboard widget (lab.widgets.Dashboard)."""

CELLS: list[tuple[str, str]] = [
    ("md", """# 13. The dashboard: snapshots by hand

**Learning goals.** After this notebook you can take, load and delete snapshots of a running guest
with buttons, and read what each engine costs the guest from two views of the same run:

* **the event log** (in the widget, newest line first): every QMP event the machine sends (`STOP`, `RESUME`, `JOB_STATUS_CHANGE`), each
  with its time since the machine started (`+1.234 s`); the time from `STOP` to `RESUME` is the
  downtime, and each job's line ends with the downtime `__org.snaplab_query-snapshot-stats` measured;
* **the plot**: the guest's speed (workload iterations per second, one iteration being one 4 KiB
  page written, from the lab port, in 50 ms bins) since the machine started (the last minute once it
  has run longer), with the windows in which the guest was stopped shaded. It is redrawn every second
  while **live plot** is ticked. A blocking stop of tens of ms shows as a dip of a bin or two; a stop
  too short to see as a band (a copy-on-write save's, a lazy load's) is marked by a triangle on the
  axis (notebook 7's memory map opens a copy-on-write save on a millisecond scale).

QEMU has no such dashboard: everything here is QMP (`snapshot-save`, `snapshot-load`,
`snapshot-delete`, `cont`) with snaplab's two extensions, the engine argument `__org.snaplab_engine`
and the statistics command `__org.snaplab_query-snapshot-stats` (the `done` lines); the engines in the
drop-downs are read from the engine registry, so a new engine shows up here by itself (the first cell
prints both lists). QEMU 7.2 has one way to save a snapshot through `snapshot-save`, the blocking one;
its live counterpart is a `migrate` with the `background-snapshot` capability (notebook 10).

**Prerequisites.** Notebooks 5 (the blocking save), 7 (copy-on-write), 8 (pre-copy) and 11 (lazy
loads): the dashboard runs the engines they measure, one save or load at a time.

**What to look at.** In the scripted run below: the `STOP` and `RESUME` lines of each job and the
downtime at the end of its `done` line; which engine each job used (printed with the run); in the
plot, the shaded stops and the guest's speed just after each `RESUME`.

Lab functions used: `lab.widgets.Dashboard`."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.widgets import Dashboard
from lab.spec import save_engines, load_engines

d = Dashboard()
print('save engines in the drop-down:', list(d.engine.options), '| in the registry:', save_engines())
print('load engines in the drop-down:', list(d.load_engine.options), '| in the registry:', load_engines())
d.widget"""),
    ("md", """Press **boot**, then **take snapshot**: the log gets the job's events and its downtime, and
the plot shows the stop. A second save to the same tag is refused with QEMU 7.2's error (`snapshot-save`
never overwrites: delete the snapshot first, or change the tag; HMP `savevm` would overwrite; the
scripted run below shows the refusal). The controls: RAM size, workload, dirty rate (MiB/s the guest writes; 0 means
as fast as it can), working set (how much of RAM it writes) and pattern (in which order), the save and
load engines, and the tag. A change to the guest's controls takes effect at the next **boot**.

The cell below does from code what the buttons do (quick mode: 128 MiB), so that this notebook
shows a run: it boots, lets the guest run 2 s (at 100 MiB/s over its 64 MiB working set, most of the
working set is written by then, so the snapshots hold it), then a save with the dashboard's default
save engine (copy-on-write) to `snap1` and a load of it with the default load engine (blocking), then
the same with the blocking save engine to `snap2`.
The log is printed as the widget shows it, newest line first; the plot below it is the dashboard's
plot as it stood after the run (the widget itself does not show in a static rendering)."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from IPython.display import Image, display
import time
d.ram.value = 128
d.boot()
time.sleep(2.0)          # the guest fills its working set
runs = []
for engine, tag in ((d.engine.value, 'snap1'), ('blocking', 'snap2')):
    d.engine.value, d.tag.value = engine, tag
    d.save().join(120)   # take snapshot: a job on a thread, as the button starts it
    d.load().join(120)   # load snapshot, with the load engine in the drop-down
    runs.append((tag, engine, d.load_engine.value))
for tag, save_eng, load_eng in runs:
    print(f'{tag}: saved with {save_eng}, loaded with {load_eng}')
print(d.log.value)       # the widget's log: newest line first
d.draw()
display(Image(d.plot.value))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# each job of the run, as its 'done' line says it (oldest first): the stop, the whole job, what a save stored
for r in d.results:
    print(f"{r['command']:>15} {r['tag']} ({r['engine']}): command to STOP {r['before_stop_ms']:6.1f} ms, downtime {r['downtime_ms']:6.2f} ms, "
          f"RESUME to the job's end {r['after_resume_ms']:6.1f} ms; command to the job's end {r['job_ms']:6.1f} ms"
          + (f", VM state {r['vmstate_mib']:.1f} MiB" if r['command'] == 'snapshot-save' else ''))"""),
    ("code", """print('a second save to snap1:')
d.tag.value, d.engine.value = 'snap1', 'blocking'
d.save().join(120)
print(d.errors[-1])"""),
    ("md", """**What the run shows, and why.** The copy-on-write save's downtime is a fraction of a
millisecond while its job lasts far longer, on both sides of its stop (printed): before the stop it
prepares (the first copy-on-write save in a process also makes its warm copy buffers, and every one
makes RAM present and write-protects all of it), and after RESUME it writes RAM. Its stop only takes
the CPU and device state and protects again the few chunks written since all of RAM was
write-protected, and RAM is written afterwards, with the guest running (a guest write to a chunk not saved yet waits for that chunk's
copy: notebook 7). The blocking save's downtime is nearly its whole job: it writes the VM state with
the guest stopped, as QEMU's `snapshot-save` does (QEMU also flushes inside its stop; snaplab flushes
after RESUME: `docs/deviations.md` 24). Both saves stored about the same VM state (the non-zero
pages, in page order: `docs/deviations.md` 33). The two loads use the same engine (blocking), which
stops the guest until every saved page is back in RAM: its downtime is nearly its whole job. The
pages are read around the page cache with neighbouring pages grouped into one read
(`docs/deviations.md` 57: before the grouping, a blocking load of this default guest's snapshot,
52 MiB of scattered pages then, took 540-566 ms, and 67-86 ms after it). Notebook 11 sets the lazy
load engines beside it. A second save to the same tag is refused, with QEMU 7.2's words."""),
    ("md", """Bad input ends in the log, never as a traceback: a RAM size outside 16-65536 MiB (or a working
set larger than RAM) is refused in the fields' own unit before anything is built, and the running
machine stays; a load of a tag that does not exist is QEMU's error.
As in QEMU 7.2, a failed `snapshot-load` leaves the guest stopped (its `snapshot_load_job_bh`
restarts the VM only when the load succeeded): press **continue** (QMP `cont`)."""),
    ("code", """d.ram.value = 8
print(d.boot())             # False: refused; the 128 MiB machine keeps running
d.tag.value = 'nope'
d.load().join(120)
print(*d.errors, sep='\\n')
print(d.q.execute('query-status')['status'])"""),
    ("code", """d.cont()
d.tag.value = 'snap1'
d.ram.value = 128
d.q.execute('query-status')['status']"""),
    ("md", """## Predict, then measure

Each can be done with the buttons; the cells after the exercises do them from code, as the buttons
would, and print the `done` lines' numbers.

1. With the first save engine in the list (QEMU's blocking save) and then with the copy-on-write one,
   take a snapshot at 128 MiB and at 512 MiB, with the same 64 MiB working set. Predict whether either
   one's downtime grows with the RAM size, and which one's guest keeps running while the job runs.
2. Set the working set to 16 MiB, then to the whole RAM, and take a pre-copy snapshot at a dirty rate
   of 500 MiB/s. Predict which needs the longer stop at the end, and check the downtime in the log.
3. Load a snapshot with each load engine. Predict how long the guest is stopped with each, and, for
   the lazy ones (`ondemand`, `background`, `prefetch`: they resume first and fill RAM afterwards), how
   long their jobs go on after `RESUME` and what the guest's speed does right after it.

When you are done: `d.close()` stops the machine and removes its scratch files."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 1: each save engine at 128 and 512 MiB of RAM, the same 64 MiB working set, on a second
# dashboard (ex: the one above, d, keeps its machine and log)
ex = Dashboard()
def jobs_on(ram, ws, rate, engines, wait=2.0):
    ex.ram.value, ex.working_set.value, ex.rate.value = ram, ws, rate
    ex.boot(); time.sleep(wait)
    first = len(ex.results)
    for i, eng in enumerate(engines):
        ex.engine.value, ex.tag.value = eng, f'ex-{i}'
        ex.save().join(120)
    return ex.results[first:]
for ram in (128, 512):
    for r in jobs_on(ram, 64, 100, ['blocking', 'cow']):
        print(f"{ram:4} MiB RAM, {r['engine']:>8}: downtime {r['downtime_ms']:6.2f} ms, job {r['job_ms']:6.1f} ms, "
              f"VM state {r['vmstate_mib']:.1f} MiB; the guest's rate during the job over its rate before: {r['progress']:.2f}")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 2: pre-copy at 500 MiB/s over 16 MiB, then over the whole RAM (128 MiB)
for ws in (16, 128):
    for r in jobs_on(128, ws, 500, ['precopy']):
        print(f"working set {ws:3} MiB: pre-copy downtime {r['downtime_ms']:6.2f} ms, job {r['job_ms']:6.1f} ms")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 3: one snapshot, loaded with each load engine (the guest's speed after each RESUME is in the plot)
jobs_on(128, 64, 100, ['blocking'])   # the snapshot ex-0
first = len(ex.results)
for eng in load_engines():
    ex.load_engine.value = eng
    ex.load().join(120)
for r in ex.results[first:]:
    print(f"load with {r['engine']:>10}: downtime {r['downtime_ms']:6.2f} ms, job {r['job_ms']:7.1f} ms, "
          f"of it after RESUME {r['after_resume_ms']:7.1f} ms")
print('the loads in the log, oldest first:')
print(*[line for line in ex.lines() if line.split(' ', 2)[2].startswith(('STOP', 'RESUME', 'snapshot-load'))][-12:], sep='\\n')
ex.draw()
display(Image(ex.plot.value))
ex.close()"""),
    ("md", """<details><summary>Worked solutions (open after predicting)</summary>

1. Neither downtime should grow much with the RAM size when the working set stays 64 MiB. The
   blocking save's stop scans the chunks the guest wrote and writes their non-zero pages, and RAM
   never written is known zero from the page tables and not read (notebook 5; notebook 10's
   exercise 3 finds the same from 128 to 512 MiB); QEMU's stop would grow, since it reads every page.
   The copy-on-write save's stop is a fraction of a millisecond at both sizes, and its guest keeps
   running during the job, slower while its writes fault on chunks not yet saved. The printed lines
   give both at both sizes, with the guest's rate during each job over its rate before: the blocking
   save's guest stands still for most of its job, the copy-on-write save's keeps most of its rate.
   To see the blocking stop grow, grow the working set with the RAM.
2. The whole-RAM working set: at 500 MiB/s over 16 MiB the guest keeps rewriting the same few
   chunks, so each round's dirty set is at most 16 MiB, while over the whole RAM each round finds
   more distinct pages dirty and the rounds level off higher (notebook 8's model: a round holds
   `S * (1 - exp(-D * t / S))`, which grows with `S`); the stop writes the last round, so its
   downtime should be the longer one: compare the two printed downtimes (one save each: a single
   slow round can blur a small difference).
3. The blocking load stops the guest until every saved page is read: its downtime is most of its
   job. The lazy loads resume after a stop of about a millisecond and fill RAM afterwards, on demand or
   in the background, so their jobs go on after RESUME (printed: most of their job comes after it)
   and the guest runs slowly right after `RESUME` while its first touches wait for chunks: in the
   plot, the bins right after the triangles that mark their stops (the log lines printed give each
   STOP and RESUME time). Notebook 11
   measures stop, time to full speed and faults per engine, with their spread.
</details>"""),
]
