"""Notebook 09-engines: 6. Blocking vs copy-on-write vs pre-copy"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 9. Blocking vs copy-on-write vs pre-copy: cost, and which instant is saved

**Learning goals.** After this notebook you can
1. compare the three save engines on one guest by downtime, time until the snapshot exists, and guest speed meanwhile, with their spread;
2. determine **which instant** a snapshot holds, by experiment: the instant the engine stopped the guest, and when that stop comes (at the request for blocking and copy-on-write, after copying RAM for pre-copy);
3. say which of these QEMU 7.2 offers, and how.

**Prerequisites.** Notebooks 5 (blocking save) and 7 (copy-on-write).

**What to look at.** The spread tables; in the instants tables, `stop_ms` (how long after the request the guest was stopped) and the bracket `saved_lo_ms`..`saved_hi_ms` around the saved instant.

**The three engines.** *Blocking* (QEMU's savevm): everything inside one stop. *Copy-on-write*: a short stop to write-protect RAM, then RAM saved while the guest runs (notebook 7), *pre-copy* (notebook 8): rounds that copy RAM while the guest runs and track what it dirties, then a short stop for what is left (emulator/migration/precopy.py). Pre-copy is how live migration works; Stefan Hajnoczi pointed out why it does not make a point-in-time snapshot: "The user has no control over *when* live migration captures the guest state" (qemu-devel, "Async savevm using userfaultfd(2)", 2016-10-12; shared/reference/qemu-internals.md section 4.2).

Lab functions used: `lab.run.run_experiment`, `lab.teach.spread_table`, `lab.teach.engines_spread_figure`, `lab.teach.saved_instants`."""),
    ("code", """QUICK = True
RAM_MIB = 128 if QUICK else 1024
REPS = 3 if QUICK else 5"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.run import run_experiment
from lab.spec import ExperimentSpec, save_engines
from lab import teach
ENGINES = save_engines()          # blocking, copy-on-write, pre-copy (the registry's order)
rows = []
for eng in ENGINES:
    rows += run_experiment(ExperimentSpec(ram_mib=RAM_MIB, engine=eng, repetitions=REPS))
for key, title in (('downtime_ms', 'downtime (ms)'), ('total_s', 'until the snapshot exists (s)'),
                   ('progress_during_save', 'guest speed during the save (1 = normal)'),
                   ('vmstate_bytes', 'VM state (bytes)')):
    print(title)
    print(teach.spread_table(rows, key, by=('engine',), digits=3))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
fig = teach.engines_spread_figure(rows, ENGINES)"""),
    ("md", """Each dot is one save, each bar a median, each black line an interquartile range. Blocking: the stop is most of the save, and the guest's speed over the job is lowest. Copy-on-write: the shortest stop; the guest runs, slowed by its faults. Pre-copy: a stop for the pages dirtied during the last round, much longer than copy-on-write's, and the longest median time until the snapshot exists, because it copies RAM in rounds while the guest keeps dirtying it. The VM-state sizes differ by layout: the blocking stream holds the written pages only; the copy-on-write and pre-copy streams are about the size of RAM (notebook 7 explains copy-on-write's page-indexed layout)."""),
    ("md", """## Which instant does each snapshot hold?

The previous version of this notebook checked `stop_instant_proof` for each engine. That check loads the snapshot and compares every page's stamp with the guest's iteration counter *saved in the same snapshot*: it shows that RAM and CPU belong to **one** instant, but any instant passes, the start or the end of the job alike.

To tell the instants apart, compare the saved counter with the **time** at which the guest had that counter. The guest reports its counter every 256 iterations through the lab port, stamped with the host's clock; the saved counter `c` lies between the last report below `c` (`saved_lo_ms`) and the first report above it (`saved_hi_ms`). All times are milliseconds after `snapshot-save` was sent; `stop_ms` is the STOP event, `end_ms` the job's conclusion. Three saves per engine on one running guest (the write protector set up before, so the first save is not a cold one). A stop less than 25 ms after the request counts as "at the request" (`lab.teach.PROMPT_MS`: handling the command takes a few ms, copying 128 MiB of RAM takes tens)."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
inst = teach.saved_instants(ENGINES, ram_mib=RAM_MIB, reps=REPS, gap_s=0.15)
for key in ('stop_ms', 'end_ms', 'saved_lo_ms', 'saved_hi_ms'):
    print(key)
    print(teach.spread_table(inst, key, by=('engine',), digits=1))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# each save, classified by lab.teach.PROMPT_MS (a loaded host can delay even a prompt stop)
[(r['engine'], r['rep'], round(r['stop_ms'], 1), r['stopped']) for r in inst]"""),
    ("code", """stop = {eng: teach.group_median(inst, 'stop_ms', engine=eng) for eng in ENGINES}
print({eng: {'saves without error': all(r['job error'] is None for r in inst if r['engine'] == eng),
             'STOP inside the saved bracket, every save': all(r['stop_inside_saved_bracket'] for r in inst if r['engine'] == eng)}
       for eng in ENGINES})
print('pre-copy stops later after the request than blocking and copy-on-write (medians):',
      stop[ENGINES[2]] > max(stop[ENGINES[0]], stop[ENGINES[1]]))"""),
    ("md", """Every snapshot holds the instant its engine **stopped** the guest: the STOP event falls inside the bracket of the saved counter for every save. What differs is when that stop comes:

* **blocking** and **copy-on-write** stop *at the request* (STOP a few ms after the command, before any RAM is copied): the snapshot is the moment you asked for it;
* **pre-copy** stops only *after copying RAM* in rounds, tens to hundreds of milliseconds later (its `stop_ms` above), and how much later depends on how fast the guest dirties memory (exercise 1): you cannot choose the instant in advance.

For a snapshot ("the machine as it was when I clicked") the instant of the request is what one wants. QEMU's background snapshot, built on copy-on-write, promises exactly that: "the migration stream will be a snapshot of the VM exactly at the point when the migration procedure starts" (qapi/migration.json, `background-snapshot`; shared/reference/qemu-internals.md section 4.1). Proxmox's savevm-async, pre-copy style, says the opposite of its own result: "the saved state will be the one right before the snapshot finished, not the one when the snapshot started" (Fiona Ebner, qemu-devel, 2023-05; same file, section 4.2).

**QEMU 7.2** offers the blocking engine as `snapshot-save`, copy-on-write only as a migration to a file (`background-snapshot`, notebook 10), and pre-copy only as live migration; snaplab offers all three behind `snapshot-save` (docs/deviations.md entry 27)."""),
    ("md", """## Exercises: predict, then measure

1. **Faster writer.** Run the instants experiment again with the guest writing 200 MiB/s instead of 50. Predict the effect on pre-copy's downtime and time to the end, and on copy-on-write's downtime.
2. **Where is pre-copy's instant at a higher rate?** In the same run, predict when pre-copy's stop comes, and whether its snapshot still holds the instant of that stop.
3. **An idle guest.** With the `idle` workload, predict pre-copy's total time compared with the `dirty` one."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
inst_fast = teach.saved_instants(ENGINES[1:], ram_mib=RAM_MIB, reps=REPS, dirty_rate_mib_s=200, gap_s=0.15)
both = [{**r, 'MiB/s': rate, 'downtime_ms': r['resume_ms'] - r['stop_ms']}
        for rate, rs in ((50, inst), (200, inst_fast)) for r in rs if r['engine'] != ENGINES[0]]
for key in ('downtime_ms', 'stop_ms', 'end_ms'):
    print(key); print(teach.spread_table(both, key, by=('engine', 'MiB/s'), digits=1))"""),
    ("code", """print('every save at 200 MiB/s holds the instant of its stop:', all(r['stop_inside_saved_bracket'] for r in inst_fast))
print('pre-copy still stops later than copy-on-write (medians):',
      teach.group_median(inst_fast, 'stop_ms', engine=ENGINES[2]) > teach.group_median(inst_fast, 'stop_ms', engine=ENGINES[1]))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
idle = run_experiment(ExperimentSpec(ram_mib=RAM_MIB, engine=ENGINES[2], workload='idle', repetitions=REPS))
print(teach.spread_table(rows + idle, 'total_s', by=('engine', 'workload'), digits=3))"""),
    ("md", """<details><summary>Worked solutions</summary>

1. Pre-copy: more pages are dirtied per round, so rounds converge more slowly and more is left for the final stop: expect a later stop, a later end and a downtime at least as long (compare the rows printed above). Copy-on-write's stop does not depend on the write rate (it only protects RAM) and still comes at the request; its faults do depend on it.
2. Still **after copying RAM**, and later than at 100 MiB/s (more rounds); the snapshot still holds the instant of that stop (both printed above). A faster writer moves the saved instant further from the request.
3. Shorter: an idle guest dirties almost nothing, so the first round copies RAM once and nearly nothing is left; the rounds end quickly.
</details>"""),
]
