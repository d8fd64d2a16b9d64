"""Notebook 09-engines: 6. Blocking vs copy-on-write vs pre-copy"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 9. Blocking vs copy-on-write vs pre-copy: cost, and which instant is saved

**Learning goals.** After this notebook you can
1. compare the three save engines on the same guest program by downtime, time until the snapshot exists, and guest speed meanwhile, with their spread;
2. determine **which instant** a snapshot holds, by experiment: the instant the engine stopped the guest, and when that stop comes (at the request for blocking and copy-on-write, after copying RAM for pre-copy);
3. say which of these QEMU 7.2 offers, and how.

**Prerequisites.** Notebooks 5 (blocking save) and 7 (copy-on-write).

**What to look at.** The spread tables; in the instants tables, `stop_ms` (how long after the request the guest was stopped) and the bracket `saved_lo_ms`..`saved_hi_ms` around the saved instant.

**The three engines.** *Blocking* (QEMU's savevm): everything inside one stop (snaplab then flushes the image after RESUME, where QEMU flushes inside the stop: `docs/deviations.md` 24). *Copy-on-write*: a short stop (RAM was write-protected just before it; inside it, only the chunks the guest wrote since are protected again), then RAM saved while the guest runs (notebook 7), *pre-copy* (notebook 8): rounds that copy RAM while the guest runs and track what it dirties, then a short stop for what is left (emulator/migration/precopy.py). RAM is handled in 2 MiB *chunks* (the unit the write protection works in). Pre-copy is how live migration works; Stefan Hajnoczi pointed out why it does not make a point-in-time snapshot: "The user has no control over *when* live migration captures the guest state" (qemu-devel, "Async savevm using userfaultfd(2)", 2016-10-12; docs/reference/qemu-internals.md section 4.2).

**The guests.** The two experiments run under different conditions; each claim below says which one it comes from.

| | first part (`run_experiment`) | instants experiment (`saved_instants`) |
|---|---|---|
| guest | `dirty` at 100 MiB/s over half of RAM (`ExperimentSpec`'s defaults, printed below) | `dirty` at 50 MiB/s over half of RAM |
| machines | a fresh one per engine | one for all, the engines interleaved |
| snapshots | each deleted after its save | all kept in the image |
| pauses | 1.2 s before the first save, 1.1 s between saves (the second before each save, the baseline of the guest's speed, holds no earlier save, as in notebook 7) | 0.15 s between saves |

The first part's first save of each engine is the first save of a fresh machine: it finds the image, the page cache and the engine's buffers cold.

Lab functions used: `lab.run.run_experiment`, `lab.teach.spread_table`, `lab.plot.engines_spread_points`, `lab.teach.saved_instants`."""),
    ("code", """QUICK = True
RAM_MIB = 128 if QUICK else 1024
REPS = 3 if QUICK else 5
from lab.spec import ExperimentSpec
_d = ExperimentSpec(ram_mib=RAM_MIB, warmup_s=1.2, gap_s=1.1, repetitions=REPS)
GUEST = f"{_d.workload} guest at {_d.dirty_rate_mib_s} MiB/s over {_d.working_set_mib or RAM_MIB // 2} MiB of {RAM_MIB} MiB RAM"
print('first part:', GUEST, f'| {_d.warmup_s} s before the first save, {_d.gap_s} s between saves')"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.run import run_experiment
from lab.spec import ExperimentSpec, save_engines
from lab import teach
ENGINES = save_engines()          # blocking, copy-on-write, pre-copy (the registry's order)
rows = []
for eng in ENGINES:
    rows += run_experiment(_d.with_(engine=eng))
for key, title in (('downtime_ms', 'downtime (ms)'), ('total_s', 'until the snapshot exists (s)'),
                   ('progress_during_save', 'guest speed during the save (1 = normal)'),
                   ('vmstate_bytes', 'VM state (MiB)')):
    print(title)
    print(teach.spread_table(rows, key, by=('engine',), digits=3, scale=2**-20 if key == 'vmstate_bytes' else 1))
for r in rows:
    if r['engine'] == ENGINES[2]:  # pre-copy: the last round is the one the stop writes
        d = r['details']
        print(f"pre-copy save {r['rep']}: the stop's round {d['bytes_per_round'][-1] / 2**20:.1f} MiB dirty, "
              f"{d['written_per_round'][-1] / 2**20:.1f} MiB written (clean gaps included), downtime {r['downtime_ms']:.1f} ms")
for r in rows:
    if r['engine'] == ENGINES[2]:
        print(f"pre-copy save {r['rep']}: round 0 (all of RAM, guest running) {r['details']['round_s'][0] * 1e3:.1f} ms; "
              f"the stop's round in {r['details']['writes_per_round'][-1]} writes")
print(f"blocking: {teach.group_median(rows, 'vmstate_bytes', engine=ENGINES[0]) / 2**20:.1f} MiB written in its stop (median)")
for eng in (ENGINES[0], ENGINES[2]):   # the stop's milliseconds per MiB it wrote
    per = [r['downtime_ms'] / ((r['details']['written_per_round'][-1] if eng == ENGINES[2] else r['vmstate_bytes']) / 2**20)
           for r in rows if r['engine'] == eng]
    print(f"{eng}: its stop took {', '.join(f'{x:.2f}' for x in per)} ms per MiB written")
for r in rows:
    if r['engine'] == ENGINES[0]:
        print(f"blocking save {r['rep']}: downtime {r['downtime_ms']:.1f} ms, job {r['total_s'] * 1e3:.1f} ms, of it before the stop "
              f"{r['prepare_ms']:.1f} ms and the flush after RESUME {r['flush_ms']:.1f} ms; guest speed {r['progress_during_save']:.2f}; the share of the job it was "
              f"not stopped (1 - downtime / job time) {1 - r['downtime_ms'] / (r['total_s'] * 1e3):.2f}")
dt = {eng: teach.group_median(rows, 'downtime_ms', engine=eng) for eng in ENGINES}
mib = {eng: teach.group_median([{**r, 'w': (r['details']['written_per_round'][-1] if eng == ENGINES[2] else r['vmstate_bytes']) / 2**20}
                                for r in rows if r['engine'] == eng], 'w', engine=eng) for eng in (ENGINES[0], ENGINES[2])}
print(f"medians: pre-copy's stop {dt[ENGINES[2]]:.1f} ms writing {mib[ENGINES[2]]:.1f} MiB, blocking's {dt[ENGINES[0]]:.1f} ms writing "
      f"{mib[ENGINES[0]]:.1f} MiB: pre-copy's stop is {dt[ENGINES[2]] / dt[ENGINES[0]]:.2f}x blocking's for "
      f"{mib[ENGINES[2]] / mib[ENGINES[0]]:.2f}x its MiB")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab import plot
fig = plot.engines_spread_points(rows, ENGINES, GUEST)"""),
    ("code", """dt = {eng: teach.group_median(rows, 'downtime_ms', engine=eng) for eng in ENGINES}
print("copy-on-write's median downtime is the shortest of the three:", dt[ENGINES[1]] < min(dt[ENGINES[0]], dt[ENGINES[2]]))"""),
    ("md", """Each grey dot is one save, each diamond a median, each black line the spread: the min-max with fewer than five saves (quick mode's three), the interquartile range from five. Blocking: everything is written inside the stop. Copy-on-write: the shortest stop (checked above), only the write protection and the device state; the guest runs, slowed by its faults. Pre-copy: a stop for the pages dirtied during the last round (up to the engine's 8 MiB threshold, or more after its round limit); before it, round 0 writes all of RAM while the guest runs, so its time until the snapshot exists is at least that one copy of RAM. Read the guest-speed and total-time panels with their spread: with a few saves one slow save moves a median (here the blocking engine's save 0, the first save of its fresh machine: its job took several times the others', and the lines printed under the tables show where: before its stop, where the first blocking save of a process allocates and touches the engine's gather buffers, 96 MiB, once; the guest ran meanwhile, hence that save's high guest speed) (notebook 8 shows how much a pre-copy save's duration can vary from run to run). The VM-state sizes differ by layout: the blocking and copy-on-write streams hold the non-zero pages only, in page order (their sizes still differ a little from save to save: each save is taken at another instant, and this random writer keeps touching new pages of its working set); the pre-copy stream is about the size of RAM (its rounds rewrite pages in any order, so each page keeps a fixed place, page index times 4 KiB, and round 0 writes every page, zero ones included: notebook 8).

**Guest speed during the save** is the guest's progress from the command to the job's end over its rate in the second before. The guest reports its counter once per batch (every 256 iterations: about every 10 ms at 100 MiB/s), so the counts at the window's edges are interpolated between reports, in *running* time: flat through the STOP-RESUME, when the guest cannot progress (`lab/progress.py`). A blocking save's job is mostly stop, so its figure is small, unless the job outlasts its stop: the guest progresses only in the parts of the window before the STOP and after the RESUME (the preparation before the stop, the flush after RESUME) (the lines printed put each blocking save's figure beside `1 - downtime / job time`, the share of the job it was not stopped; the two need not agree, because the window's edges are interpolated between reports, and because the job time is the engine's own timing while the speed's window runs from the command to the client seeing the job end). For a window of a few tens of ms, one report more or less moves the figure by a tenth or more: read it as coarse.

**How pre-copy knows what the guest dirtied.** QEMU's live migration asks KVM for the dirty bitmap of guest memory after each round; it stops the guest once the bytes still dirty could be sent within `downtime-limit` (300 ms by default) at the bandwidth it measured, and its stream *appends* every page it sends, a page sent in three rounds three times. snaplab's emulator has no KVM: its *dirty log* is Linux userfaultfd's asynchronous write protection (`WP_ASYNC`: a guest write clears a page's protection bit in the page table, no fault reaches user space) read back with one `PAGEMAP_SCAN` call per round; it stops once a round's dirty set is under a fixed 8 MiB, or after 10 rounds, and writes each page *in place* (page index × 4 KiB), so a page written in three rounds takes its space once (notebook 8).

**Pre-copy's stop against blocking's.** Pre-copy's stop writes only what was dirtied during the last round, at most about 8 MiB of dirty pages, the blocking save's stop all the non-zero pages (both printed above). The last printed line compares the two medians (with three saves each their ranges can overlap: read the min-max too): pre-copy's stop comes out the shorter one, but by far less than its share of the bytes, in two steps: the bytes it writes are several times its dirty bytes (the clean gaps, below), and each of its MiB costs more than one of the blocking save's (the milliseconds per MiB printed). The lines printed under the tables say why: a round writes runs of dirty pages *with up to 16 clean pages between them written through* (`GAP_PAGES` in `emulator/migration/precopy.py`: one write instead of two), so a guest that dirties pages scattered over its working set makes its stop write several times its dirty bytes, in many short writes, one per run (their count is printed, four in flight at a time: `WRITE_THREADS`); the blocking save writes its pages in a few large gathered writes on two threads (notebook 5). Per MiB, many short writes cost more than a few long ones (notebook 8 finds a round's time set by its writes, not its dirty bytes; the lines printed give each stop's milliseconds per MiB written). The stop also scans the dirty log and commits the snapshot, as the others do."""),
    ("md", """## Which instant does each snapshot hold?

A first idea, `stop_instant_proof` (notebook 7), loads the snapshot and compares every page's stamp with the guest's iteration counter *saved in the same snapshot*: it shows that RAM and CPU belong to **one** instant, but any instant passes, the start or the end of the job alike.

To tell the instants apart, compare the saved counter with the **time** at which the guest had that counter. The guest reports its counter every 256 iterations (one batch: 256 pages, 1 MiB, so every 20 ms at 50 MiB/s) through the lab port, stamped with the host's clock, and then sleeps until its next batch is due; the saved counter `c` lies between the last report below `c` (`saved_lo_ms`) and the first report above it (`saved_hi_ms`). A guest stopped while sleeping after a report saved exactly that report's counter, so its bracket starts at the report *before* it and spans about two report periods (40 ms here), plus the time the guest was held (the stop, and for copy-on-write the faults right after RESUME): the bracket is safe (the instant is surely inside it), not tight. All times are milliseconds after `snapshot-save` was sent; `stop_ms` is the STOP event, `end_ms` the job's conclusion (for blocking it includes the image flush after RESUME, `docs/deviations.md` 24). Guest: the `dirty` workload at 50 MiB/s over half of RAM. Several saves per engine (three in quick mode) on one running guest, all kept in the image (the write protector set up before, so the first save is not a cold one). A stop less than 25 ms after the request counts as "at the request" (`lab.teach.PROMPT_MS`: handling the command takes about a millisecond, copying all of RAM takes tens)."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
inst = teach.saved_instants(ENGINES, ram_mib=RAM_MIB, reps=REPS, gap_s=0.15)
held = [{**r, 'downtime_ms': r['resume_ms'] - r['stop_ms']} for r in inst]   # STOP to RESUME, this experiment's
for key in ('stop_ms', 'downtime_ms', 'end_ms', 'saved_lo_ms', 'saved_hi_ms'):
    print(key)
    print(teach.spread_table(held, key, by=('engine',), digits=1))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# the blocking save's job, timed in both experiments: end_ms here, total_s in the first part (median, ms)
print(f"blocking: end_ms {teach.group_median(inst, 'end_ms', engine=ENGINES[0]):.1f} here, total_s {teach.group_median(rows, 'total_s', engine=ENGINES[0]) * 1e3:.1f} in the first part")"""),
    ("md", """Both numbers time a blocking save of a guest of the same RAM size, in two separate experiments (written at 100 MiB/s in the first part and 50 MiB/s here, so the VM states differ somewhat; `end_ms` also includes the QMP round trips of waiting for the job). Two such medians of three saves agree only to within their spread: the job's end includes writing the VM state and flushing the image (after RESUME), whose time other work on a shared host can stretch in one experiment and not the other."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# each save, classified by lab.teach.PROMPT_MS (a loaded host can delay even a prompt stop)
[(r['engine'], r['rep'], round(r['stop_ms'], 1), r['stopped']) for r in inst]"""),
    ("code", """stop = {eng: teach.group_median(inst, 'stop_ms', engine=eng) for eng in ENGINES}
print({eng: {'saves without error': all(r['job error'] is None for r in inst if r['engine'] == eng),
             'STOP inside the saved bracket, every save': all(r['stop_inside_saved_bracket'] for r in inst if r['engine'] == eng)}
       for eng in ENGINES})
print('pre-copy stops later after the request than blocking and copy-on-write (medians):',
      stop[ENGINES[2]] > max(stop[ENGINES[0]], stop[ENGINES[1]]))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# timings: the bracket's width, and whether the request itself fell inside it (read them on your run)
print('median bracket width saved_hi_ms - saved_lo_ms (ms):',
      {eng: round(teach.group_median([{**r, 'w': r['saved_hi_ms'] - r['saved_lo_ms']} for r in inst], 'w', engine=eng), 1) for eng in ENGINES})
print('the request (0 ms) inside the saved bracket, every save:',
      {eng: all(r['saved_lo_ms'] <= 0 <= r['saved_hi_ms'] for r in inst if r['engine'] == eng) for eng in ENGINES})"""),
    ("md", """Every snapshot holds the instant its engine **stopped** the guest: the STOP event falls inside the bracket of the saved counter for every save. What differs is when that stop comes:

* **blocking** and **copy-on-write** stop *at the request* (STOP within about a millisecond of the command, before any RAM is copied): the snapshot is the moment you asked for it, to within the bracket's width (printed above): two of the guest's report periods (see above), stretched by the stop itself for the blocking save and by the faults right after RESUME for copy-on-write, which hold back the report after the saved counter; the request itself falls inside the bracket of every such save;
* **pre-copy** stops only *after copying RAM*: round 0 writes all of RAM, then come the rounds needed until the pages dirtied meanwhile fit under the engine's threshold (8 MiB, `emulator/migration/precopy.py`; at most 10 rounds). Its `stop_ms` above is therefore at least the time to write all of RAM into the image, plus more rounds the faster the guest dirties memory (exercise 1). Its spread comes mostly from round 0 itself: the same 128 MiB, copied with the guest running, can take tens of milliseconds more in one save than in another (the cell after exercise 1's prints, for these same saves, round 0's time and every round: compare them with each save's `stop_ms`). You cannot choose the instant in advance.

For a snapshot ("the machine as it was when I clicked") the instant of the request is what one wants. QEMU's background snapshot, built on copy-on-write, promises exactly that: "the migration stream will be a snapshot of the VM exactly at the point when the migration procedure starts" (qapi/migration.json, `background-snapshot`; docs/reference/qemu-internals.md section 4.1). Proxmox's savevm-async, pre-copy style, states that its own state is the end instant: "the saved state will be the one right before the snapshot finished, not the one when the snapshot started" (Fiona Ebner, qemu-devel, 2023-05; same file, section 4.2).

**In short** (the stops' lengths from the first part, the instants from the second; read each claim against the tables above): copy-on-write has the shortest stop, at the request, and its snapshot tends to exist later than the blocking save's (compare their `end_ms` medians and ranges: its RAM is written after RESUME, beside the running guest); the blocking save stops at the request and writes the VM state inside that stop (the first save of a process prepares before it, and the flush comes after RESUME); pre-copy stops later than both, for longer than copy-on-write and, in the medians of the first part, shorter than the blocking save (three saves each: where the ranges overlap, not established), and its snapshot exists last (round 0 writes all of RAM first). Pre-copy's strength is elsewhere: live migration, where the stop must not hold all of RAM and the instant does not matter.

**QEMU 7.2** offers the blocking engine as `snapshot-save`, copy-on-write only as a migration stream (`background-snapshot`, to a pipe or a command such as `exec:cat > FILE`: QEMU 7.2 has no `file:` URI, docs/deviations.md 29; notebook 10), and pre-copy only as live migration; snaplab offers all three behind `snapshot-save` (docs/deviations.md entry 27)."""),
    ("md", """## Exercises: predict, then measure

1. **Faster writer.** Run the instants experiment again with the guest writing 200 MiB/s instead of 50. Predict the effect on pre-copy's downtime and time to the end, and on copy-on-write's downtime. Make it a number first: round 1 holds about what the guest dirtied during round 0, so predict its size as the rate × round 0's time (from the printed round-0 times at 50 MiB/s) at each rate, and whether it exceeds the 8 MiB threshold (then expect one more round). The cell after it prints each pre-copy save's rounds, at both rates: check your numbers.
2. **Where is pre-copy's instant at a higher rate?** In the same run, predict when pre-copy's stop comes, and whether its snapshot still holds the instant of that stop.
3. **An idle guest.** With the `idle` workload, predict pre-copy's total time compared with the first part's `dirty` guest at 100 MiB/s, and its downtime."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
inst_fast = teach.saved_instants(ENGINES[1:], ram_mib=RAM_MIB, reps=REPS, dirty_rate_mib_s=200, gap_s=0.15)
both = [{**r, 'MiB/s': rate, 'downtime_ms': r['resume_ms'] - r['stop_ms']}
        for rate, rs in ((50, inst), (200, inst_fast)) for r in rs if r['engine'] != ENGINES[0]]
for key in ('downtime_ms', 'stop_ms', 'end_ms'):
    print(key); print(teach.spread_table(both, key, by=('engine', 'MiB/s'), digits=1))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# pre-copy's rounds in the instants experiments' own saves: round 0's time, the MiB of each round, when it stopped
for rate, rs in ((50, inst), (200, inst_fast)):
    for r in rs:
        if r['engine'] == ENGINES[2]:
            print(f"{rate:>4} MiB/s save {r['rep']}: round 0 {r['round0_ms']:6.1f} ms (x the rate: {rate * r['round0_ms'] / 1e3:4.1f} MiB), "
                  f"rounds (MiB) {[round(b, 1) for b in r['rounds_mib']]}, stop_ms {r['stop_ms']:.1f}, downtime {r['resume_ms'] - r['stop_ms']:.1f} ms")"""),
    ("code", """print('every save at 200 MiB/s holds the instant of its stop:', all(r['stop_inside_saved_bracket'] for r in inst_fast))
print('pre-copy still stops later than copy-on-write (medians):',
      teach.group_median(inst_fast, 'stop_ms', engine=ENGINES[2]) > teach.group_median(inst_fast, 'stop_ms', engine=ENGINES[1]))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
idle = run_experiment(_d.with_(engine=ENGINES[2], workload='idle'))   # the first part's pauses, an idle guest
print(teach.spread_table(rows + idle, 'total_s', by=('engine', 'workload'), digits=3))
print(f"pre-copy, idle / dirty (medians): {teach.group_median(idle, 'total_s', engine=ENGINES[2]) / teach.group_median(rows, 'total_s', engine=ENGINES[2]):.2f}")
for r in idle:
    d = r['details']
    print(f"idle pre-copy save {r['rep']}: downtime {r['downtime_ms']:.1f} ms, rounds (MiB dirty) {[round(b / 2**20, 2) for b in d['bytes_per_round']]}, "
          f"round 0 {d['round_s'][0] * 1e3:.1f} ms")"""),
    ("md", """<details><summary>Worked solutions</summary>

1. Pre-copy's stop comes after round 0 (all of RAM) and the rounds that follow until a round's dirty pages fit under 8 MiB. Round 1 holds what the guest dirtied while round 0 was written: about the rate × round 0's time (printed beside each save's rounds), less the pages dirtied twice; where that is under the 8 MiB threshold the stop follows, where it is over it one more round comes first. So a faster writer fills it faster: it *can* need more rounds (the cell after exercise 1's prints each of these saves' rounds: count how many of them did) and, with round 0 taking the same time, tends to stop and end later (compare the `stop_ms` medians with their min-max: a few saves per rate). Its downtime is bounded all the same: the rounds go on until what is left fits under the threshold, so the last round, which the stop writes, holds at most about 8 MiB at either rate, and the faster writer's last round is usually the fuller one: its stop is longer by the time to write up to a few MiB more (from nothing to about ten milliseconds on this host's disk; compare the two rates' `downtime_ms` medians and min-max); a difference far beyond the time to write 8 MiB is a stop slowed by other work on the host, as is a `stop_ms` later than the save's own round-0 time and rounds (printed beside it) explain. Copy-on-write's stop hardly depends on the write rate (it protects again only the chunks written since the pre-arm, a few) and still comes at the request; its faults, and so its end, do depend on it.
2. Still **after copying RAM**, when the rounds have converged (or after the round limit), and the snapshot still holds the instant of that stop (both printed as booleans above, on every run). How far from the request that instant lies is set by round 0's duration plus the added rounds, so it cannot be chosen in advance, and a faster writer can only add rounds to it.
3. Shorter for the idle guest, but of the same order: pre-copy's round 0 writes all of RAM, zero pages or not (`_write_all` in `emulator/migration/precopy.py`), whatever the guest does, and the idle guest then has almost nothing dirty, so its save is round 0 and a stop with almost nothing to write (the idle saves' rounds and downtimes are printed under the table). The dirty guest adds a stop that writes the last dirty pages (its `downtime_ms`, tens of ms above), and a running vCPU competing with the saver for the host's CPUs while the idle guest halts. So expect the idle total shorter, by an amount of the order of a stop. Then read the min-max columns before the medians' ratio: with three saves each, where the two ranges overlap the difference is not established by this run, whatever the ratio says.
</details>"""),
]
