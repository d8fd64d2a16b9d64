"""Notebook 13-dashboard: snapshots by hand, with the dashboard widget (lab.widgets.Dashboard)."""

CELLS: list[tuple[str, str]] = [
    ("md", """# 13. The dashboard: snapshots by hand

**Learning goals.** After this notebook you can take, load and delete snapshots of a running guest
with buttons, and read what each engine costs the guest from two views of the same run:

* **the event log** (in the widget, newest line first): every QMP event the machine sends (`STOP`, `RESUME`, `JOB_STATUS_CHANGE`), each
  with its time since the machine started (`+1.234 s`); the time from `STOP` to `RESUME` is the
  downtime, and each job's line ends with the downtime `__org.snaplab_query-snapshot-stats` measured;
* **the plot**: the guest's speed (workload iterations per second, from the lab port) since the
  machine started (the last minute once it has run longer), with the windows in which the guest was
  stopped shaded. It is redrawn every second while **live plot** is ticked, so a copy-on-write
  save's slower guest or a lazy load's recovery can be watched as it happens.

QEMU has no such dashboard: everything here is QMP (`snapshot-save`, `snapshot-load`,
`snapshot-delete`, `cont`) with snaplab's engine extension `__org.snaplab_engine`; the engines in the
drop-downs are read from the engine registry, so a new engine shows up here by itself.

**Prerequisites.** Notebooks 5 (the blocking save), 7 (copy-on-write), 8 (pre-copy) and 11 (lazy
loads): the dashboard runs the engines they measure, one save or load at a time.

**What to look at.** In the scripted run below: the `STOP` and `RESUME` lines of each job and the
downtime at the end of its `done` line; which engine each job used (printed with the run); in the
plot, the shaded stops and the guest's speed just after each `RESUME`.

Lab functions used: `lab.widgets.Dashboard`."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.widgets import Dashboard

d = Dashboard()
d.widget"""),
    ("md", """Press **boot**, then **take snapshot**: the log gets the job's events and its downtime, and
the plot shows the stop. A second save to the same tag is refused with QEMU 7.2's error (`snapshot-save`
never overwrites: delete the snapshot first, or change the tag). The controls: RAM size, workload, dirty rate (MiB/s the guest writes; 0 means
as fast as it can), working set (how much of RAM it writes) and pattern (in which order), the save and
load engines, and the tag. A change to the guest's controls takes effect at the next **boot**.

The cell below does from code what the buttons do (quick mode: 128 MiB), so that this notebook
shows a run: a save with the dashboard's default save engine (copy-on-write) to `snap1` and a load of
it with the default load engine (blocking), then the same with the blocking save engine to `snap2`.
The log is printed as the widget shows it, newest line first; the plot below it is the dashboard's
plot as it stood after the run (the widget itself does not show in a static rendering)."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from IPython.display import Image, display
d.ram.value = 128
d.boot()
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
# the downtimes from the log's 'done' lines (oldest first)
done = [line.split(' ', 2)[2] for line in d.lines() if ': done downtime' in line]
print(*done, sep='\\n')
ms = {line.split(':')[0]: float(line.rsplit(' ', 2)[1]) for line in done}
print('blocking load of the copy-on-write snapshot slower than of the blocking one:',
      ms['snapshot-load snap1'] > ms['snapshot-load snap2'])"""),
    ("md", """The two loads use the same engine (blocking) and the same guest, but not the same snapshot
and not the same instant. Both snapshots hold only the non-zero pages, in page order (a
copy-on-write save walks RAM in order for that, `docs/deviations.md` 33); both are read back from
the disk around the page cache (`O_DIRECT`, `docs/deviations.md` 39 and 57), and the load reads
pages that lie near each other in the file with one read. So expect their downtimes to be of the
same order: the printed boolean says which was longer in this run, and either answer is within
what the two snapshots' sizes and the host allow (the notebook does not time the reads
themselves). Before the loads grouped their reads, each run of non-zero pages was a request of
its own, and a blocking load of the default 128 MiB guest took 540-566 ms (`docs/deviations.md` 57)."""),
    ("md", """Bad input ends in the log, never as a traceback: a RAM size the machine cannot give is the
machine's error (and the running machine stays), a load of a tag that does not exist is QEMU's error.
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

These are by hand, with the buttons; the worked solutions say what to expect and which notebook
measured it.

1. With the first save engine in the list (QEMU's blocking save) and then with the copy-on-write one,
   take a snapshot at 128 MiB and at 1024 MiB. Predict which one's shaded window grows with the RAM
   size, and which one's guest keeps running (at what speed?) while the job is still running.
2. Set the working set to 16 MiB, then to the whole RAM, and take a pre-copy snapshot at a dirty rate
   of 500 MiB/s. Predict which needs the longer stop at the end, and check the downtime in the log.
3. Load a snapshot with each load engine. Predict how long the guest is stopped with each, and look
   at the speed right after the `RESUME` of the engine that resumes first and fills RAM afterwards.

When you are done: `d.close()` stops the machine and removes its scratch files."""),
    ("md", """<details><summary>Worked solutions (open after predicting)</summary>

1. The blocking save's shaded window grows with the RAM size: the default guest's working set is
   half of RAM, and inside the stop the save scans the chunks the guest wrote for zero pages and
   writes the non-zero pages (notebook 5 measures both parts; RAM never written is known zero from
   the page tables and not read). The copy-on-write
   save's window is a thin line at both sizes (a few milliseconds at most in notebook 7's table, often a fraction of one),
   and its guest keeps running during the job, slower than before while its writes fault on chunks
   not yet saved (notebook 7's `progress_during_save`).
2. The whole-RAM working set: at 500 MiB/s over 16 MiB the guest keeps rewriting the same few
   chunks, so each round's dirty set is at most 16 MiB, while over the whole RAM each round finds
   more distinct pages dirty and the rounds level off higher (notebook 8's model: a round holds
   `S * (1 - exp(-D * t / S))`, which grows with `S`); the stop writes the last round, so its
   downtime is the longer one.
3. The blocking load stops the guest until every saved page is read (for the two snapshots above
   expect the same order: both are read from the disk); the lazy loads resume after a short stop and fill RAM
   afterwards, on demand or in the background, so the guest runs slowly right after `RESUME` while
   its first touches wait for chunks (notebook 11 measures stop, time to full speed and faults per
   engine).
</details>"""),
]
