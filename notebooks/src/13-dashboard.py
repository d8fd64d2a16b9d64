"""Notebook 13-dashboard: snapshots by hand, with the dashboard widget (lab.widgets.Dashboard)."""

CELLS: list[tuple[str, str]] = [
    ("md", """# 13. The dashboard: snapshots by hand

Learning goals: take, load and delete snapshots of a running guest with buttons, and read what each
engine costs the guest from two views of the same run:

* **the event log** (newest line first): every QMP event the machine sends (`STOP`, `RESUME`, `JOB_STATUS_CHANGE`), each
  with its time since the machine started (`+1.234 s`); the time from `STOP` to `RESUME` is the
  downtime, and each job's line ends with the downtime `__org.snaplab_query-snapshot-stats` measured;
* **the plot**: the guest's speed (workload iterations per second, from the lab port) since the
  machine started (the last minute once it has run longer), with the windows in which the guest was
  stopped shaded. It is redrawn every second while **live plot** is ticked, so a copy-on-write
  save's slower guest or a lazy load's recovery can be watched as it happens.

QEMU has no such dashboard: everything here is QMP (`snapshot-save`, `snapshot-load`,
`snapshot-delete`, `cont`) with snaplab's engine extension `__org.snaplab_engine`; the engines in the
drop-downs are read from the engine registry, so a new engine shows up here by itself.

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
shows a run."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
d.ram.value = 128
d.boot()
d.save().join(120)   # take snapshot: a job on a thread, as the button starts it
d.load().join(120)   # load snapshot
print(*d.lines(), sep='\\n')"""),
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

1. With the first save engine in the list (QEMU's blocking save) and then with the copy-on-write one,
   take a snapshot at 128 MiB and at 1024 MiB. Predict which one's shaded window grows with the RAM
   size, and which one's guest keeps running (at what speed?) while the job is still running.
2. Set the working set to 16 MiB, then to the whole RAM, and take a pre-copy snapshot at a dirty rate
   of 500 MiB/s. Predict which needs the longer stop at the end, and check the downtime in the log.
3. Load a snapshot with each load engine. Predict how long the guest is stopped with each, and look
   at the speed right after the `RESUME` of the engine that resumes first and fills RAM afterwards.
4. Switch the pattern from `random` to `sequential` and to `hot-cold` with the copy-on-write engine:
   which pattern slows the guest least during the save, and why?

When you are done: `d.close()` stops the machine and removes its scratch files."""),
]
