"""Notebook 10-two-ways: QEMU's background snapshot beside an internal snapshot"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 10. Two ways to snapshot a running VM: an internal snapshot and QEMU's background snapshot

**Learning goals.** After this notebook you can
1. say what an internal snapshot (`snapshot-save`, HMP `savevm`) stores and where: the VM state inside the qcow2 image, past the end of the virtual disk, and a copy of every disk's L1 table;
2. say what a background snapshot (`migrate-set-capabilities background-snapshot` + `migrate`) stores and where: a migration stream of the VM state in a file of your choice, and *no* disk state;
3. compare the two on the same guest, on QEMU 7.2 and on snaplab: downtime, total time (and the stream rate behind it), and how much the guest kept running.

**Prerequisites.** Notebooks 3 (the OVMF varstore: which devices a snapshot covers), 4 (inside a qcow2 file: L1 tables, the VM-state area), 5 (what a blocking save does in its stop) and 7 (copy-on-write: snaplab's `migrate` background snapshot is notebook 7's copy-on-write engine writing a migration stream). "Copy-on-write" means two things here: qcow2 clusters shared by a snapshot and copied when the guest writes the disk (notebook 4), and guest RAM write-protected and copied on the guest's first write (notebook 7).

**Words.** *Chunk*: 2 MiB of guest RAM, the unit snaplab protects and copies (one transparent huge page). *Warm buffer*: memory allocated and touched before the operation, so a copy into it costs no page fault. *Bottom half*: QEMU's deferred callback, run by its main loop soon after. *`PAGEMAP_SCAN`*: a Linux (6.7+) ioctl that says for a whole range which pages are in a given state (here: still the kernel's shared zero page, never written). *IQR*: the interquartile range, 25th to 75th percentile.

**What to look at.** The `qemu-img snapshot -l` listing after both operations, the file the background snapshot wrote, and the tables of downtimes, total times and progress (medians with IQR over three runs per system).

Lab functions used: `lab.two_ways.snapshot_two_ways`, `two_ways_rows`; `lab.teach.spread_table`."""),
    ("md", """## The two mechanisms

*Internal snapshot.* QEMU's `save_snapshot()` (`migration/savevm.c`) stops the guest, writes the VM state (devices and every RAM page) into the qcow2 image's VM-state area (`bdrv_save_vmstate`: it lies past the end of the virtual disk, so the guest never sees it), creates a snapshot table entry on every disk (each keeps a copy of its L1 table; the clusters become shared and copy-on-write), then resumes. Everything is in the images; `qemu-img snapshot -l` lists it; `snapshot-load` (or `loadvm`) brings the whole VM back.

*Background snapshot* (QEMU 6.0, `background-snapshot` capability, by Andrey Gruzdev): `migrate` to a file with the guest running. QEMU write-protects all of RAM with userfaultfd at the start and sends pages in the background; a guest's first write to a page not yet sent waits until that page is in the stream, then goes through: the stream is the VM as it was at the start. The disks are *not* part of it: to restore you need the disks as they were at that instant from somewhere else (an external snapshot taken at the same moment), and `migrate-incoming` to load the stream (`exec:cat FILE`: QEMU 7.2 has no `file:` URI, docs/deviations.md 29).

snaplab implements both *saves* with QEMU's interface: the same QMP commands below run against QEMU 7.2 and against snaplab's machine, with the same guest program (the dirty workload; `emulator/qemu_guest.py` builds it for QEMU). For the restore, snaplab has `snapshot-load` and `migrate-incoming`, but not QEMU's external disk snapshots (`blockdev-snapshot-sync`, `transaction`), so it cannot take the disk half of a background snapshot (exercise 2)."""),
    ("code", """import shutil
from lab.two_ways import two_ways_rows
from lab import teach
from lab.two_ways import snapshot_two_ways
import inspect
SYSTEMS = ['snaplab'] + (['qemu'] if shutil.which('qemu-system-x86_64') else [])
REPS, RAM_MIB, SEED = 3, 128, 1
_kw = inspect.signature(snapshot_two_ways).parameters   # the guest's rate and working set: the function's defaults
RATE, WS = _kw['rate_mib_s'].default, _kw['ws_mib'].default
print('systems:', SYSTEMS, f'| guest: {RAM_MIB} MiB, the dirty workload at {RATE} MiB/s over {WS} MiB, seed {SEED} | '
      f'{REPS} runs per system, each on a fresh guest')
print('QEMU 7.2 runs with -accel tcg (the same emulator family as Unicorn); each QEMU run is a process of its own, snaplab runs in this '
      'notebook process, warmed by one discarded run first; both write the qcow2 image around the page cache (QEMU: cache.direct=on), '
      'but not the same way (see the tables); both background streams go through exec:cat into the page cache')"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
two_ways_rows('snaplab', reps=1, ram_mib=RAM_MIB, seed=SEED)   # discarded: the process's first save pays one-time set-up
rows, results = [], {}
for s in SYSTEMS:
    rs, results[s] = two_ways_rows(s, reps=REPS, ram_mib=RAM_MIB, seed=SEED)
    rows += rs
for key, title in (('downtime_ms', 'downtime, STOP to RESUME (ms)'), ('total_s', 'total (s)'),
                   ('progress', 'guest progress during the operation (1 = its rate before)'),
                   ('stored_mib', 'stored (MiB: internal in the qcow2 image, background in a file)'),
                   ('written_before_mib', 'MiB the guest had written since boot when the command was sent')):
    print(title); print(teach.spread_table(rows, key, by=('system', 'op'), digits=3))
for s in SYSTEMS:
    med = {k: teach.group_median(rows, k, system=s, op='internal') for k in ('downtime_ms', 'total_s')}
    print(f"{s}: internal snapshot, downtime / total (medians) = {med['downtime_ms'] / (med['total_s'] * 1e3):.0%}")
import math
for s in SYSTEMS:   # the working set's pages written at least once: WS x (1 - exp(-written / WS))
    for op in ('internal', 'background'):
        w = teach.group_median(rows, 'written_before_mib', system=s, op=op)
        print(f"{s} {op}: the guest had written {w:.0f} MiB (median), so it had touched about "
              f"{WS * (1 - math.exp(-w / WS)):.1f} of its {WS} MiB working set; stored {teach.group_median(rows, 'stored_mib', system=s, op=op):.1f} MiB")
for s in SYSTEMS:   # the stream's rate: what it stored over its total (medians), and for the internal one over its stop
    for op in ('internal', 'background'):
        mib, tot = teach.group_median(rows, 'stored_mib', system=s, op=op), teach.group_median(rows, 'total_s', system=s, op=op)
        print(f"{s} {op}: {mib / tot:.0f} MiB/s over the total" + (
            f", {mib / (teach.group_median(rows, 'downtime_ms', system=s, op=op) / 1e3):.0f} MiB/s over the stop" if op == 'internal' else ''))"""),
    ("md", """Read the tables with what each number includes:

* **Internal snapshot.** Both systems write the VM state with the guest stopped, but the stops do not hold the same work: QEMU flushes the image inside its stop, while snaplab resumes the guest first and flushes after RESUME, so the flush is in snaplab's total time and not in its downtime (`docs/deviations.md` 24). The lines under the tables give each system's downtime as a share of its total: snaplab's share leaves out its flush and the job's start and end, which come outside the stop; in both, the guest keeps only part of its rate over the whole operation, the part it ran outside the stop (the progress table). The two need not add up to 1: the progress is estimated from reports every ~20 ms at this rate, the counts at the window's edges interpolated between reports (flat through the stop, `lab/progress.py`), and for an operation of a few tens of ms one report more or less moves it by up to a half. Both write the image around the page cache, but not the same way: snaplab skips the 2 MiB chunks the page tables show were never written, scans the others for zero pages with every CPU, and writes what it gathered in 32 MiB pieces on two threads (notebook 5; `docs/deviations.md` 57), while QEMU reads every page inside its stop and writes its stream through a `QEMUFile` that flushes at 32 KiB of buffered bytes or 64 queued pages (`IO_BUF_SIZE`, `MAX_IOV_SIZE` in migration/qemu-file.c), one synchronous write after another. The stream rates printed last (MiB stored over the stop) show the gap; how QEMU's stop divides between its writes, its page scan and its flush is not measured here; exercise 3 tests one part, the reading of zero pages (four times the RAM, the added part all zero pages).
* **Background snapshot.** Both stops take the CPU and device state and arm the write protection, but not the same way. QEMU's `bg_migration_thread()` (`migration/migration.c`) stops the VM, writes the non-RAM state into a buffer (`qemu_savevm_state_complete_precopy_non_iterable`), calls `ram_write_tracking_start()`, which write-protects every RAM block, and restarts the VM from a bottom half: the protection of all of RAM is inside its stop. Its cost grows with the populated page tables; the recorded runs, on an idle OVMF guest whose RAM was filled with random bytes (all of it populated), found its stops longer at larger sizes (1.6-2.9 ms at 256 MiB, 2.0-36.6 ms at 4 GiB: docs/reference/qemu-7.2-qmp.md, "Background snapshot"), while at this notebook's sizes exercise 3 shows whether it grew; what the rest of its stop costs is not measured here. snaplab write-protects all of RAM just before its stop, with the guest still running, and inside the stop protects again only the chunks the guest wrote in between (a few ioctls, whatever the RAM size: `emulator/migration/cow.py`, docs/deviations.md 59), then takes the CPU context and device sections. After the stop, both write RAM with the guest running, which keeps more of its rate than during the internal snapshot (the progress table). This guest is paced to a fixed rate and does not make up for a stall (a late batch takes its own start as the next deadline; `bench/pacing_stall.py` holds the vCPU for 50, 100 and 300 ms and finds 0.95, 0.87 and 0.65 of the steady rate over the next half second, against 0.91, 0.83 and 0.62 for a stall simply lost and 1 for one made up: docs/reproduction.md): every wait lowers its progress, and a value above 1 (a few percent, sometimes more, and then often in every run of a row) is the bias and noise of the two rate estimates, not a faster guest. The two background snapshots' totals differ too (the total table, and the stream rates printed last): both stream through `exec:cat` into the page cache, QEMU's migration thread page by page (4 KiB, each tested for zeros), snaplab's saver by 2 MiB chunks; which part of QEMU's time each step takes is not measured here. Their progress figures are each taken over the system's own operation (command to completion), so the same lost time weighs less in the figure of the system whose operation lasts longer (exercise 1).
* **Stored bytes.** The background snapshot stores more than the internal one on both systems (the `stored` table). It is not what the guest writes during it: each stream holds the instant at its start, each page once. (A page counts as written when the guest stamps it: 16 bytes at its start, `dp_store` in `data/guest/workloads.asm`; the `MiB written` table counts such pages × 4 KiB.) It runs after the internal snapshot on the same guest, and this random writer has by then written more (the last table), so more pages of its working set are non-zero: the lines under the tables give, for each system and operation, the share of the working set touched that the MiB written predict, beside what was stored. Most of the gap between the two operations is that. The guest writes for a different time between the two operations on each system (each waits for the guest's steady rate again), so compare each system's two rows rather than the systems' background rows with each other. The formats differ too, by little at this size: snaplab's streams store no zero page, QEMU's sends each zero page as a small record (docs/deviations.md 23 and 30; exercise 3 prints what the records of 384 MiB of zero pages weigh).
* Each row is three runs on fresh guests (on snaplab a fresh machine in the same, warmed, process). The IQR of three values is computed by interpolation between them (its ends lie halfway between the median and each extreme), so read the min-max too before calling a difference real."""),
    ("md", """**The same runs, drawn.** The tables reduce each operation to three numbers. The figure below draws the last run of each system whole (its legend's numbers are that run's, not the tables' medians; its spread is in the tables): for each operation, the guest's work since the command against time since the command. The work is counted from the command (the count there interpolated between the two samples around it), in seconds at the guest's own rate of the second before the command (its iterations divided by that rate): a scale on which the dotted diagonal is a guest the operation did not slow at all, whatever the guest's speed (both are paced at 50 MiB/s here, one batch about every 20 ms). Each line is drawn in steps from one progress sample to the next (between two samples the count is known only to be at least the earlier one), so a flat stretch is time without a finished batch; the hatched band is the stop (STOP to RESUME); the vertical line of the same style is the operation's end (the job concluded, or the migration completed), and each line ends 0.1 s after it. The progress ratio of the tables is, roughly, the line's slope up to that end over the diagonal's; roughly, because the tables interpolate the count between samples (in running time, `lab/progress.py`) where the figure draws whole steps, and an operation as short as snaplab's holds only one or two of them."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab import plot
fig = plot.two_ways_timelines(results, conditions=f"{RAM_MIB} MiB guest, dirty workload at {RATE} MiB/s over {WS} MiB (random), "
                              f"TCG on both, images around the page cache; the last of {REPS} runs per system")
for s, r in results.items():
    for op in ('internal', 'migrate'):
        x = r[op]
        t, done = x['timeline'][-1] if x['timeline'] else (float('nan'), 0)
        lost = t - done / x['rate_before']   # time passed, minus the work done at the rate before
        print(f"{s:>8} {op:>8}: operation {x['end_s'] * 1e3:7.1f} ms, of it stopped {x['downtime_ms']:7.1f} ms; "
              f"guest work lost by its last sample ({t:.2f} s after the command): {lost * 1e3:6.1f} ms")
print('(lost by the last sample: the time since the command minus the work done by then; exercise 1 uses another measure, (1 - progress) x the operation)')"""),
    ("md", """Read each panel against the diagonal. In the internal snapshot both guests stand still for the stop (the flat, hatched stretch) and then run at their speed again, parallel to the diagonal and below it: the work they lost is about their stop (the last lines print it: the time since the command at the last sample, minus the work done by then at the rate before; exact only to about one batch, since the last sample can come anywhere in its 20 ms). QEMU's stop is several times snaplab's, and its job ends with it (its flush is inside the stop); snaplab's job ends a few milliseconds after its RESUME (its last steps, the snapshot entry and the flush, come after RESUME: `docs/deviations.md` 24; the lines printed give each operation's length beside its stop). In the background snapshot both stops are too short to see at this scale, and neither line leaves the diagonal by more than a batch. The reason is the pacing: the guest writes its batch (256 pages, 1 MiB) in well under a millisecond and then sleeps until its next deadline, 20 ms after the last one, so a wait for the write protection that ends before that deadline costs it nothing. A wait costs only when it is longer than that slack: exercise 1 raises the rate to 200 MiB/s (a deadline every 5 ms, a slack four times shorter). For the same reason, compare the systems by the work lost rather than by the progress ratio alone where their operations differ in length: a ratio is the work over the operation's own length, so the same loss weighs more in a short operation than in a long one (the same caution as notebook 12's lost-time table)."""),
    ("code", """for s, r in results.items():
    print(f'--- {s} (last run): qemu-img snapshot -l after both operations')
    print(r['snapshots'].strip())
    names = [line.split()[1] for line in r['snapshots'].strip().splitlines()[2:]]
    print('snapshots in the image:', names)
    print('the background snapshot left no snapshot in the image:', names == ['internal'])
    print('it wrote its stream to a file of its own:', r['migrate']['file_bytes'] > 0)"""),
    ("md", """Only the internal snapshot is in the image. The background snapshot's stream is a file beside it, and the disks it would need are wherever you put them. The internal snapshot's VM state is inside `disk0.qcow2`, past the end of its 1 GiB virtual disk: `qemu-img info` lists the snapshot with its VM-state size (`VM SIZE`), and the image's allocated size grew by about that much (before and after, printed):"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
for s, r in results.items():
    print(f"{s}: allocated {r['disk_allocated_before'] / 2**20:.1f} MiB before, {r['disk_allocated_bytes'] / 2**20:.1f} MiB after, "
          f"for a VM state of {r['internal']['vmstate_bytes'] / 2**20:.1f} MiB")
    print('\\n'.join(line for line in r['disk_after'].splitlines()
                    if 'virtual size' in line or 'snapshot' in line.lower() or 'VM SIZE' in line or 'internal' in line))"""),
    ("md", """## Exercises: predict, then measure

1. **A faster writer.** Predict how the background snapshot's guest progress changes on each system if the guest dirties 200 MiB/s instead of 50 (each first write to a page waits for that page, or on snaplab the non-zero pages of its 2 MiB chunk, to be copied). Make it a number for the time lost: snaplab takes at most one fault per chunk of the 32 MiB working set plus the progress page's chunk, 17, at about 0.4 ms each (notebook 7's median fault); QEMU takes one per 4 KiB page the guest first writes during its operation, each waiting until its page is in the stream. The first cell below runs `two_ways_rows(s, reps=REPS, ram_mib=128, seed=1, rate_mib_s=200)` on each system and prints the progress beside the 50 MiB/s runs above.
2. **What you need to restore.** List what a restore from the background snapshot's file needs that a `snapshot-load` of the internal one does not, and which QMP commands do each (`migrate-incoming`; `snapshot-load`).
3. **Bigger RAM.** Predict which of the four downtimes grow with RAM, then check: the second cell below runs `two_ways_rows(s, reps=REPS, ram_mib=512, seed=1)` (the same guest and working set, four times the RAM) and prints the downtimes beside the 128 MiB runs above."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 1: the same runs with the guest dirtying 200 MiB/s instead of 50
fast = [r | {'MiB/s': 200} for s in SYSTEMS for r in two_ways_rows(s, reps=REPS, ram_mib=128, seed=1, rate_mib_s=200)[0]]
bg = sorted((r for r in [r | {'MiB/s': 50} for r in rows] + fast if r['op'] != 'internal'), key=lambda r: r['system'])
print('guest progress during the background snapshot (1 = its rate before)')
print(teach.spread_table(bg, 'progress', by=('system', 'op', 'MiB/s'), digits=3))
print('the window that progress is measured over: the background snapshot, command to completion (s)')
print(teach.spread_table(bg, 'total_s', by=('system', 'op', 'MiB/s'), digits=3))
print('guest time lost, (1 - progress) x window (ms)')
lost = [r | {'lost_ms': (1 - r['progress']) * r['total_s'] * 1e3} for r in bg]
print(teach.spread_table(lost, 'lost_ms', by=('system', 'op', 'MiB/s'), digits=1))
def lost_range(system, rate):
    xs = [r['lost_ms'] for r in lost if r['system'] == system and r['MiB/s'] == rate]
    return min(xs), max(xs)
for s in SYSTEMS:
    (a0, a1), (b0, b1) = lost_range(s, 50), lost_range(s, 200)
    print(f"{s}: lost more at 200 than at 50 MiB/s in every run (ranges apart): {b0 > a1}; medians {teach.group_median(lost, 'lost_ms', system=s, **{'MiB/s': 50}):.1f} -> "
          f"{teach.group_median(lost, 'lost_ms', system=s, **{'MiB/s': 200}):.1f} ms")
if len(SYSTEMS) == 2:
    print('at 200 MiB/s, QEMU lost more than snaplab (medians):',
          teach.group_median(lost, 'lost_ms', system='qemu', **{'MiB/s': 200}) > teach.group_median(lost, 'lost_ms', system='snaplab', **{'MiB/s': 200}))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 3: the same runs with 512 MiB of RAM instead of 128 (the guest still dirties 32 MiB)
big = [r | {'RAM MiB': 512} for s in SYSTEMS for r in two_ways_rows(s, reps=REPS, ram_mib=512, seed=1)[0]]
both = [r | {'RAM MiB': 128} for r in rows] + big
for key, title in (('downtime_ms', 'downtime, STOP to RESUME (ms)'), ('stored_mib', 'stored (MiB)')):
    print(title); print(teach.spread_table(sorted(both, key=lambda r: (r['system'], r['op'])), key, by=('system', 'op', 'RAM MiB'), digits=3))
for s in SYSTEMS:
    for op in ('internal', 'background'):
        d = {mib: [r['downtime_ms'] for r in both if r['system'] == s and r['op'] == op and r['RAM MiB'] == mib] for mib in (128, 512)}
        st = {mib: [r['stored_mib'] for r in both if r['system'] == s and r['op'] == op and r['RAM MiB'] == mib] for mib in (128, 512)}
        way = ('longer' if min(d[512]) > max(d[128]) else 'shorter' if max(d[512]) < min(d[128]) else 'within the same range')
        grow = teach.group_median(both, 'stored_mib', system=s, op=op, **{'RAM MiB': 512}) - teach.group_median(both, 'stored_mib', system=s, op=op, **{'RAM MiB': 128})
        print(f"{s} {op}: the 512 MiB stops, against the 128 MiB ones: {way}; stored grew {grow:+.2f} MiB (medians; "
              f"the 128 MiB runs' own stored range {max(st[128]) - min(st[128]):.2f} MiB)")
print(f"QEMU's zero-page records for the 384 MiB added: {384 * 2**20 // 4096} pages x 9 bytes = {384 * 2**20 // 4096 * 9 / 2**20:.2f} MiB")"""),
    ("md", """<details><summary>Worked solutions (open after predicting)</summary>

1. More writes per second means more first writes to not-yet-copied memory while the background snapshot runs, so the guest should wait more and its progress should drop on both systems. QEMU copies a 4 KiB page per fault; snaplab saves the whole 2 MiB chunk, copying its non-zero pages into a warm buffer (`docs/deviations.md` 38), so it takes at most one fault per chunk but each one copies more. What the guest waits for differs too: on QEMU the faulting vCPU waits until the migration thread has written that page to the stream and only then released its protection (`migration/ram.c`: "Flush async buffers before un-protect"), so a burst of first writes queues behind the stream; on snaplab the fault returns as soon as its chunk's non-zero pages are in a warm buffer (a few tenths of a millisecond: notebook 7 times the faults), and the saver writes the copy later. So predict more time lost on QEMU: on snaplab at most about 17 × 0.4 ≈ 7 ms whatever the window; on QEMU the number of pages first written during its window (up to the working set's 8192) times its per-page wait, so more the longer its window. The cell above measured it in three forms. The progress medians: compare each system's at 200 MiB/s with its own at 50, with the min-max columns beside them (three runs per row: a drop whose ranges overlap is within the run-to-run spread). The window each progress figure covers (second table): the longer it is, the less a given lost time weighs in the figure (the guest never makes a stall up: `bench/pacing_stall.py`), and QEMU's windows are several times snaplab's. And the time lost, (1 - progress) times the window (third table): the figure the prediction is about. It is not independent of the window: a longer window holds more first writes to pages not yet in the stream, so QEMU's loss mixes its per-fault cost with its window's length, while snaplab's is bounded by its chunk count. The last lines check the prediction on it: for each system, whether every run at 200 MiB/s lost more than every run at 50 (ranges apart, or only the medians moved), and whether QEMU lost more than snaplab at 200 MiB/s. Where a line says False, the prediction did not hold in this run, or not beyond its spread. A progress value above 1 (a negative loss) is the noise of the two rate estimates.
2. The internal snapshot has everything in the image: `snapshot-load` reverts the disks and loads the VM state. The background snapshot has only the VM state: you need disks as they were at the same instant, which QEMU 7.2's background snapshot does not take. On QEMU, one way is an external snapshot of each disk (`blockdev-snapshot-sync`, `qapi/block-core.json`: "Takes a synchronous snapshot of a block device": new writes go to a new overlay image, so the old image keeps the disk as it was), and to make the two coincide: `stop`, then `blockdev-snapshot-sync` of each disk (or one `transaction`), then `migrate` with `background-snapshot`; QEMU 7.2's background snapshot resumes a guest it found paused (docs/reference/qemu-7.2-qmp.md section 6.3). snaplab has neither `blockdev-snapshot-sync` nor `transaction`, so this recipe does not run on it: a background snapshot there is RAM and devices only, and a guest that writes its disk cannot be restored consistently from it (use `snapshot-save` with the `cow` engine instead, notebook 7: the same copy-on-write, disks frozen at the stop instant). To restore the stream on QEMU: a VM started with `-incoming defer` on the old images, then `migrate-incoming` with `exec:cat FILE` (QEMU 7.2 has no `file:` URI, docs/deviations.md 29).
3. Here the RAM grows but the working set does not: the guest still dirties 32 MiB, so the bytes stored hardly change (the `stored` table). What grows with RAM is the work done over all of RAM, wherever a stop does it. snaplab's internal snapshot does not read the RAM the guest never wrote: the page tables list the 2 MiB chunks still mapped to the kernel's shared zero page (one `PAGEMAP_SCAN`), and only the other chunks are scanned for zero pages inside its stop (notebook 5), so its downtime should hardly grow with RAM: compare its 512 MiB row with its 128 MiB row. QEMU's internal snapshot walks every page inside its stop (a zero page is sent as a small record instead of 4 KiB, so its stored bytes should grow a little with RAM, by about the number of added pages times that record: the last line prints that arithmetic), so a prediction is that its downtime grows too. QEMU's background snapshot protects all of RAM inside its stop, one call per RAM block whose cost grows with the *populated* page tables: the 384 MiB added here are never written, so the prediction is no growth; snaplab's protects all of RAM before its stop; the pages themselves are written after the guest resumed on both. The lines above say, per system and operation, whether the three 512 MiB stops were all longer than the three 128 MiB ones, all shorter, or within the same range, and how the stored bytes moved beside the 128 MiB runs' own spread of them. Read them as they come: "within the same range" means this run cannot show an effect of RAM (three fresh guests each); for the stored bytes, compare the 512 MiB runs' range with the 128 MiB runs' range: where the ranges are apart and the medians moved by about the printed arithmetic, that is the zero-page records showing. If QEMU's internal stop did not grow, the zero pages' reading and records are not what makes it several times snaplab's (its writes are the other suspect: see the stream rates printed under the first tables). (A working set that grows with RAM would also make the internal snapshots write more inside the stop; that is not measured here.)
</details>"""),
]
