"""Notebook 13-dashboard: snapshots by hand, with the dashboard widget (lab.widgets.Dashboard)."""

CELLS: list[tuple[str, str]] = [
    ("md", """# 13. The dashboard: snapshots by hand

**Learning goals.** After this notebook you can take, load and delete snapshots of a running guest
with buttons, and read what each engine costs the guest from two views of the same run:

* **the event log** (in the widget, newest line first): every QMP event the machine sends (`STOP`, `RESUME`, `JOB_STATUS_CHANGE`), each
  with its time since the machine started (`+1.234 s`); the time from `STOP` to `RESUME` is the
  downtime, and each job's `done` line gives the downtime `__org.snaplab_query-snapshot-stats` measured
  (the engine's own clock, from the guest stopped to the guest let go: the events' window to a fraction of a millisecond);
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
load engines, and the tag. A change to the guest's controls takes effect at the next **boot**; hover over a control for what it
means. A second click on **take snapshot** while a job runs is refused with `Another snapshot operation
is in progress` (snaplab's monitor answers during a job, QEMU's does not: notebook 2).

The cell below does from code what the buttons do (128 MiB, the default), so that this notebook
shows a run: it boots, lets the guest run 2 s (at 100 MiB/s over its 64 MiB working set, most of the
working set is written by then, so the snapshots hold it), then a save with the dashboard's default
save engine (copy-on-write) to `snap1` and a load of it with the default load engine (blocking), then
the same with the blocking save engine to `snap2`.
It turns **live plot** off first: the redraw runs every second in this process, beside the jobs being
timed, on a host with two CPUs; the plot is drawn once at the end instead.
The log is printed as the widget shows it, newest line first; the plot below it is the dashboard's
plot as it stood after the run. (A page rendered without a kernel shows the widget above as it was
left after all the cells ran; its buttons do nothing there: run the first cell for a live one.)"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from IPython.display import Image, display
import time
d.ram.value = 128
d.live_plot.value = False   # no redraw beside the timed jobs
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
display(Image(d.plot.value))
d.live_plot.value = True    # back on: from here the plot follows the guest, for the buttons"""),
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
copy: notebook 7). The blocking save's downtime is most of its job: it writes the VM state with
the guest stopped, as QEMU's `snapshot-save` does (QEMU also flushes inside its stop; snaplab flushes
after RESUME: `docs/deviations.md` 24). Both saves stored about the same VM state (the non-zero
pages, in page order: `docs/deviations.md` 33). The two loads use the same engine (blocking), which
stops the guest until every saved page is back in RAM; before its stop it warms its 8 MiB read buffer
(the first load of a process only) and waits for the vCPU to leave the guest, both printed in `command
to STOP`. The pages are read around the page cache with neighbouring pages grouped into one read
(`docs/deviations.md` 57). Two loads of snapshots of the same size can differ in time (compare the two
printed): one load each is an anecdote, not a measurement; notebook 11 sets the load engines side by
side with their spread. A second save to the same tag is refused, with QEMU 7.2's words."""),
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

Each can be done with the buttons (the `done` lines give the downtimes and job times; the guest's
rate during a job, printed by the cells below, is in `d.results`, not on screen); the cells after the
exercises do them from code, as the buttons would, on a second dashboard with **live plot** off,
the first one's guest paused meanwhile (it would otherwise run beside the timed jobs; the last
exercise cell lets it run again, and turns its live plot back on, for the buttons).

1. With the first save engine in the list (QEMU's blocking save) and then with the copy-on-write one,
   take three snapshots at 128 MiB and three at 512 MiB, with the same 64 MiB working set. Predict
   whether either one's downtime grows with the RAM size, and which one's guest keeps running while
   the job runs.
2. Set the working set to 16 MiB, then to the whole RAM, and take a pre-copy snapshot at a dirty rate
   of 500 MiB/s. Predict which needs the longer stop at the end, and check the downtime in the log.
3. Load a snapshot with each load engine. Predict how long the guest is stopped with each, and, for
   the lazy ones (`ondemand`, `background`, `prefetch`: they resume first and fill RAM afterwards), how
   long their jobs go on after `RESUME` and what the guest's speed does right after it.

When you are done: `d.close()` stops the machine and removes its scratch files."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 1: each save engine at 128 and 512 MiB of RAM, the same 64 MiB working set, three saves each,
# on a second dashboard, live plot off, the first one's guest paused (it would run beside these jobs)
d.live_plot.value = False
d.q.execute('stop')
ex = Dashboard()
ex.live_plot.value = False
def jobs_on(ram, ws, rate, engines, wait=2.0):
    ex.ram.value, ex.working_set.value, ex.rate.value = ram, ws, rate
    ex.boot(); time.sleep(wait)
    first = len(ex.results)
    for i, eng in enumerate(engines):
        ex.engine.value, ex.tag.value = eng, f'ex-{i}'
        ex.save().join(120)
    return ex.results[first:]
from lab.stats import median
for ram in (128, 512):
    rs = jobs_on(ram, 64, 100, ['blocking', 'cow'] * 3)
    for eng in ('blocking', 'cow'):
        mine = [r for r in rs if r['engine'] == eng]
        dt, job, prog = ([r[k] for r in mine] for k in ('downtime_ms', 'job_ms', 'progress'))
        print(f"{ram:4} MiB RAM, {eng:>8}: downtime median {median(dt):6.2f} ms (min-max {min(dt):.2f}-{max(dt):.2f}), "
              f"job median {median(job):6.1f} ms, VM state {median([r['vmstate_mib'] for r in mine]):.1f} MiB; "
              f"the guest's rate during the job over its rate before: median {median(prog):.2f} ({min(prog):.2f}-{max(prog):.2f})")"""),
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
ex.close()
d.cont()                    # the first dashboard's guest runs again, its plot live: the buttons above work
d.live_plot.value = True"""),
    ("md", """<details><summary>Worked solutions (open after predicting)</summary>

1. The prediction: neither downtime should grow much with the RAM size when the working set stays
   64 MiB. The blocking save's stop scans the chunks the guest wrote and writes their non-zero pages,
   and RAM never written is known zero from the page tables and not read (notebook 5; notebook 10's
   exercise 3 tests the same from 128 to 512 MiB). The copy-on-write save's stop is a fraction of a
   millisecond at both sizes, and its guest keeps running during the job, slower while its writes
   fault on chunks not yet saved. Check it on the printed lines, median against median with the
   min-max beside: if the blocking save's 512 MiB range lies above its 128 MiB range, something in its
   stop did grow with RAM on your run (the zero-page map of a larger RAM, or the host), and notebook 5's
   phase tables are where to look; if the ranges overlap, three saves cannot tell. The guest's rate
   during each job: the blocking save's guest stands still for most of its job, the copy-on-write
   save's keeps most of its rate. To see the blocking stop grow for certain, grow the working set with
   the RAM.
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
