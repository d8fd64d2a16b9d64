"""Notebook 07-copy-on-write: 7. Copy-on-write snapshots"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 7. Copy-on-write snapshots

**Learning goals.** After this notebook you can
1. explain how a copy-on-write snapshot keeps the guest stopped only to write-protect RAM, and saves RAM while the guest runs, still holding the stop instant's contents;
2. read what the window costs the guest: write faults, their service time, its progress rate;
3. say what QEMU 7.2 has of this (the `background-snapshot` migration capability) and what snaplab does differently (an internal qcow2 snapshot through `snapshot-save`, 2 MiB chunks);
4. predict the fault count and the VM-state size of a copy-on-write save from the guest's working set.

**Prerequisites.** Notebook 5 (what a blocking save does in its stop) and notebook 6 (userfaultfd write protection).

**The guest.** The `dirty` workload, unthrottled, writing pages at random in a 32 MiB working set: the RAM in use is the same 32 MiB at every RAM size (notebook 5), and every 2 MiB chunk of the working set is written again and again during the save. In the main comparison the guest runs 1.2 s before the first save and 1.1 s between saves (after the previous snapshot is deleted), so that the second before each save, the baseline of `progress_during_save`, holds no earlier save or deletion; the exercises, which do not use that ratio, keep the lab's shorter pauses.

**What to look at.** The downtime table (medians and IQR, both engines), the faults and where the pages came from (`pages_by_fault` vs `pages_by_background`), the fault times against the time the guest lost, the memory map of one save (the guest keeps running through the window, blocked at times), and the tail of the fault-latency distribution.

Lab functions used: `lab.run.compare`, `lab.run.run_experiment`, `lab.teach.spread_table`, `lab.teach.cow_window_summary`, `lab.plot.fault_latency`, `lab.plot.cow_window`, `lab.proofs.stop_instant_proof`. (The `engine` column says `cow` for copy-on-write, its name in the engine registry.)"""),
    ("md", """**Words used below.**

| word | meaning here |
|---|---|
| chunk | 2 MiB of guest RAM, the unit of protection and of a fault's copy (one transparent huge page) |
| pre-arm | write-protecting all of RAM just before the stop, the guest still running (`pre_arm_s`) |
| arm | inside the stop, protecting again the chunks the guest wrote since the pre-arm (`arm_ms`, `rearmed_chunks`) |
| fault | the guest's first write to a protected chunk: the kernel stops the writing vCPU thread and queues a message for the handler |
| release | removing a chunk's protection (`UFFDIO_WRITEPROTECT` off), which lets the blocked write go through |
| handler | the thread that reads faults, copies the chunk's non-zero pages into a free buffer and releases it |
| saver | the thread that goes through RAM in page order, span by span, gathering the non-zero pages of every chunk not saved by a fault |
| writers | two threads that write the gathered pages into the qcow2 image, around the page cache |
| downtime | STOP to RESUME, from the QMP events |
| total | the command to the job's conclusion (the snapshot exists, flushed) |
| progress | the guest's iteration rate during the job over its rate in the second before (1 = unslowed) |
| span | the chunks the saver takes at a time: 8 chunks, 16 MiB |
| drain | waiting until every disk request in flight has completed, so that none straddles the instant |
| shared zero page | the one read-only page of zeros the kernel maps wherever a process reads memory it never wrote |
| THP | transparent huge pages: 2 MiB pages the kernel backs anonymous memory with, one page-table entry each |
| `PAGEMAP_SCAN` | a Linux (6.7+) ioctl that answers, for a whole range at once, which pages are in a given state (here: mapped to the shared zero page) |
| interpreter lock | Python's global interpreter lock (GIL): the emulator's threads run Python one at a time, except inside calls that release it (numpy copies, system calls) |
"""),
    ("md", """**Mechanism, step by step** (`emulator/migration/cow.py` and `emulator/migration/engines/save_cow.py`):

1. **Pre-arm**, guest running: one `UFFDIO_WRITEPROTECT` protects all of RAM; until the stop, a write to a protected chunk only releases it and is noted.
2. **STOP**: the disks are drained; the CPU and device state are taken.
3. **Arm**: the chunks noted since the pre-arm are protected again (a few ioctls, so the stop does not grow with RAM). No byte of RAM is written inside the stop.
4. **RESUME.** Right after it, the stop's thread freezes the disks (a pending qcow2 snapshot per image, still drained: a guest disk request waits until then, outside STOP-RESUME; `freeze_ms`), asks the page tables which chunks are still the shared zero page, writes the stream's header and starts the saver and writer threads.
5. **Faults**: a guest write to a protected chunk blocks in the kernel and is reported to the fault handler, which reads the chunk once, copies its non-zero pages, packed, into a free buffer (still the stop instant's bytes), releases the chunk and so wakes the guest.
6. **Saver**: walks RAM in page order, a span at a time; skips the chunks still mapped to the shared zero page without reading them (still protected, so zero at the stop too); reads the other unsaved chunks straight from RAM (still protected) and takes the copied ones from their buffers; leaves zero pages out and gathers the others into 32 MiB buffers; releases each span once gathered. One more thread, at idle priority and only when the host's CPUs are not busy (`ahead_policy`, printed below, says whether it ran), scans unsaved chunks for zero pages from the end of RAM back towards the saver.
7. **Writers**: two threads write the gathered buffers into the image's VM-state area, around the page cache.
8. **Commit**: the snapshot table entry, then the flush.

QEMU 7.2's background snapshot (`bg_migration_thread` in migration/migration.c) protects all of RAM *inside* its stop, resumes, then sends RAM page by page (4 KiB) through the migration stream, a faulted page first, and releases each page's protection once it is in the stream. The idea is the same: "'freeze' guest RAM content using write-protection and iteratively release protection for memory ranges that have already been saved ... we read in pending UFFD write fault events and save those pages out-of-order with higher priority" (Andrey Gruzdev, background-snapshot cover letter, QEMU 6.0; docs/reference/qemu-internals.md section 4.1)."""),
    ("code", """QUICK = True   # False: RAM up to 4 GiB
SIZES = [64, 256] if QUICK else [256, 1024, 4096]
REPS = 3 if QUICK else 5
SEED = 1"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.run import compare
from lab import teach
from lab.spec import ExperimentSpec, compare_engines
BLOCKING, COW = compare_engines()      # snaplab's blocking engine (QEMU's savevm semantics, not QEMU itself), then copy-on-write
GUEST = ExperimentSpec(working_set_mib=32, dirty_rate_mib_s=0, warmup_s=1.2, gap_s=1.1, seed=SEED, repetitions=REPS)
rows = compare(SIZES, base=GUEST)
for key, scale in (('downtime_ms', 1), ('total_s', 1e3), ('vmstate_bytes', 2**-20)):
    print(key if scale == 1 else {1e3: 'total (ms)', 2**-20: 'VM state (MiB)'}[scale])
    print(teach.spread_table(rows, key, scale=scale))"""),
    ("code", """med = {(r['ram_mib'], r['engine']): teach.group_median(rows, 'downtime_ms', ram_mib=r['ram_mib'], engine=r['engine'])
       for r in rows}
print('median copy-on-write downtime below the median blocking one at every size:',
      all(med[(mib, COW)] < med[(mib, BLOCKING)] for mib in SIZES))
print('and at least 20 times below:', all(med[(mib, BLOCKING)] >= 20 * med[(mib, COW)] for mib in SIZES))
sorted({(r['ram_mib'], r['engine'], round(r['vmstate_bytes'] / 2**20)) for r in rows})   # VM state, MiB"""),
    ("md", """**Downtime.** The copy-on-write stop holds the drain of the disks, the CPU context and device state, and the protection, again, of the chunks written since all of RAM was protected just before the stop (the disks' snapshots are frozen right after RESUME, while still drained, so a guest disk request can wait until then, outside the downtime: `freeze_ms`, printed in the memory-map section below, counts from the stop's beginning, and it is most of why the saver starts milliseconds after RESUME; docs/deviations.md 35); no byte of RAM is written inside it. Its median is a fraction of a millisecond here, far below snaplab's blocking save's at both sizes (checked above, at least 20 times; divide the medians of the table for the exact factor). That blocking save is snaplab's own engine, not QEMU: it skips RAM never written and writes around the page cache with two threads (notebook 5; docs/deviations.md 57), so it is already far faster than QEMU 7.2's; the write protection itself (`arm_ms`, below) is a part of it (compare the two tables). Single stops can be longer at a slow moment of the host (compare the min-max column); when one is, the `arm_ms` table below shows whether the write protection took the time. The time until the snapshot exists (`total (ms)`) has medians of the same order for both engines (which is longer is not checked here: compare the medians with their ranges): RAM still has to be scanned for zero pages and written, now while the guest runs and competes for the same two host cores (issue #19 of this project measures the copy-on-write total against the blocking one at larger sizes). A single save can be far from its group's median (compare the min-max column with the median); which phase took the time in those is not broken down in this table (the memory-map section below splits one save's total into its phases), so compare medians with their min-max.

**VM-state size.** Both engines store exactly the non-zero 4 KiB pages, in page order: about the 32 MiB in use, at both sizes (the last output above; both streams start their RAM data on a cluster boundary of the image, docs/deviations.md 39 and 57, so they come out the same size). The copy-on-write saver gets there by walking RAM in order, so each page's place in the stream is known when it is written (emulator/migration/cow.py `_Gatherer`, docs/deviations.md entry 33). A page the guest writes during the window can still differ in content between the two saves (they are taken at different instants), not in count here: the working set is the same pages. QEMU's background snapshot sends every page, zero pages as flags (same entry)."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# what the window cost, per copy-on-write save
cow = [r for r in rows if r['engine'] == COW]
for key in ('pre_arm_ms', 'arm_ms', 'faults', 'pages_by_fault', 'pages_by_background', 'fault_latency_p50_ms', 'progress_during_save'):
    print(key)
    print(teach.spread_table(cow, key, digits=3))
print('the second zero-page scan, each save (how it ran; chunks the saver took from it):',
      [(r['ram_mib'], r['ahead_policy'] or 'ran', r['ahead_chunks']) for r in cow])"""),
    ("md", """`arm_ms` is the write protection inside the stop: protecting again the chunks the guest wrote since all of RAM was protected, just before the stop (`rearmed_chunks` in the save's statistics; the protection of all of RAM is `pre_arm_ms`, outside the downtime, printed first). `pages_by_fault` are the pages of the chunks the fault handler saved because the guest wrote them before the saver reached them (512 per 2 MiB chunk, zero pages included; only the non-zero ones are copied); `pages_by_background` are those the saver took straight from RAM (read, or known zero from the page tables without a read). Together they cover every page of RAM, zero pages included; only the non-zero ones go into the VM state. A fault on a chunk the saver has claimed or already saved copies nothing: the handler waits if needed and then wakes the faulting vCPU (emulator/migration/cow.py docstring), so `faults` can exceed `pages_by_fault / 512`. `fault_latency_p50_ms` is how long the handler took for a fault, from reading it to waking the guest (median per save): the guest's stall is longer by the time the fault sat in the queue before the handler thread read it and the vCPU's wait to run again after the wake, neither measured here; `progress_during_save` is the guest's iteration rate during the job over its rate in the second before (1 = unslowed); with 1.1 s between saves that second holds no earlier save or deletion."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
print('every copy-on-write save slowed the guest (progress_during_save < 1):', all(r['progress_during_save'] < 1 for r in cow))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# the copy-on-write saves at the largest size above: the time their faults held the guest, against the time it lost
from lab import plot
from lab.run import run_experiment
one = [r for r in rows if r['engine'] == COW and r['ram_mib'] == max(SIZES)]
for r in one:
    w = teach.cow_window_summary(r)
    job_ms = r['details']['job_s'] * 1e3   # the command to the job's end: the window progress is measured over
    print(f"save: {w['faults']} faults served in {w['fault_ms_sum']:.1f} ms in all; the guest's first report after the last one "
          f"{w['first_progress_after_faults_ms']:.1f} ms after RESUME; job {job_ms:.1f} ms from the command; "
          f"progress {r['progress_during_save']:.2f}, so {(1 - r['progress_during_save']) * job_ms:.1f} ms of the guest's time lost")"""),
    ("md", """Where does the guest's lost time go? While a write of the guest waits for its fault, the guest is blocked: its write hit a chunk not yet saved and waits until the fault handler has copied that chunk's non-zero pages (a few tenths of a millisecond), or, if the saver is gathering the span that holds it (16 MiB), until that gather ends. The lines above put three figures side by side for each save: the sum of its fault times (from the handler reading a fault to waking the guest), the moment the guest reported progress again after its last fault, and the time it lost over the job, `(1 - progress) x` the job's window (the command to the job's end: the window the progress ratio is measured over). The guest makes no whole batch from RESUME until about its first report after the last fault (the memory-map section below shows why: a batch needs all its chunks released), and that stretch is longer than the faults' sum: before the first fault the vCPU must enter the guest again, and between two faults the woken vCPU runs on to its next write and the fault's message waits for the handler, none of which is in a fault's time. The lost time is at least that stretch; where it is more, the guest also ran slower after its faults, while the saver and writer threads shared the host's CPUs and the interpreter lock with it (the rates per stretch, printed in the memory-map section, say how much, save by save). All these figures are coarse: the guest reports once a batch, and the rate before the save is itself measured from such reports. The next figure is the distribution of the fault times over all faults of these saves; the memory map further down opens one save on a millisecond scale."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
fig = plot.fault_latency(one)"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# the tail: percentiles over all faults, and how many faults did not copy their chunk themselves
import numpy as np
lat = np.concatenate([r['details']['fault_latency_ms'] for r in one])
print('faults:', len(lat), '| percentiles 50/75/90/99/max (ms):', np.round(np.percentile(lat, [50, 75, 90, 99, 100]), 2))
print(f'faults over 1 ms: {np.mean(lat > 1):.0%}')
waited = sum(r['faults'] - r['pages_by_fault'] // 512 for r in one) / sum(r['faults'] for r in one)
print(f'faults that did not copy their chunk themselves (waited while the saver gathered its span, or found it saved): {waited:.0%}')
# where each fault's time went: waiting (for the saver, or a buffer), copying its chunk, and the rest
wait = np.concatenate([r['details']['fault_wait_ms'] for r in one])
copy = np.concatenate([r['details']['fault_copy_ms'] for r in one])
rest = lat - wait - copy
for name, sel in (('fast (<= 1 ms)', lat <= 1), ('slow (> 1 ms)', lat > 1)):
    if sel.any():
        print(f"{name:>15}: {sel.sum():3d} faults, median ms: total {np.median(lat[sel]):.2f} = waiting {np.median(wait[sel]):.2f}"
              f" + copying {np.median(copy[sel]):.2f} + the rest {np.median(rest[sel]):.2f} (sums of medians need not add up)")
if (lat > 1).any():
    slow = lat > 1
    main = np.argmax(np.stack([wait[slow], copy[slow], rest[slow]]), axis=0)
    print('slow faults by their largest part: waiting', int((main == 0).sum()), '| copying', int((main == 1).sum()),
          '| the rest', int((main == 2).sum()))"""),
    ("md", """Most faults take a few tenths of a millisecond (the printed median): the handler reads the 2 MiB chunk, copies its non-zero pages into a free buffer (the `copying` part printed above: one pass over the chunk to find its zero pages, and a copy of the others; `docs/deviations.md` 38) and releases it. Any slower ones are counted in the lines above (faults over 1 ms, and the slow line with its largest part, if there were any in this run). The code has two reasons for a fault to wait longer than one copy (`save_or_wait` and `_save_chunk` in `emulator/migration/cow.py`): the chunk was in the stretch the saver was reading straight from RAM (the fault waits until the saver has scanned and gathered that stretch, at most 16 MiB, no disk write involved), or every copy buffer held a chunk the saver had not reached yet and the handler waited for the saver (that second case cannot occur here: at 256 MiB there are 64 buffers, and the guest writes at most 17 chunks). The first case is among the faults that did not copy their chunk themselves (the third line), together with faults that found their chunk already saved and were only woken. The handler now times the parts of every fault (`save_or_wait` in `emulator/migration/cow.py`): *waiting* is the time it spent blocked on the saver (its chunk in the span being gathered, or no free buffer) or on another copy of the same chunk; *copying* is the pass over the 2 MiB chunk and the copy of its non-zero pages; *the rest* is everything else between reading the fault and waking the guest: taking the lock, releasing the protection, and the handler thread waiting for the interpreter lock while the saver and writer threads hold it. The last lines split the fast and the slow faults that way and count, for each slow fault, which part was its largest: read them to see which cause dominates on your run (a copying part far above the fast faults' median is the copy itself being slow on this shared host)."""),
    ("md", """## Inside one save: the memory map

The tables and the distribution above summarise many saves. The next figure opens one: the last copy-on-write save of the main run at the largest size, drawn on one time axis that starts at the arm (inside the stop, a fraction of a millisecond before RESUME) and runs past the job's end. Above, the guest's iterations since RESUME beside the line it would have followed at its rate of the second before the command: the vertical gap between the two is the progress the save cost it. Under them, each fault as a red bar from the moment the handler read it to the moment it woke the guest (two rows, alternating, so that bars next to each other stay apart). Below, the memory map: guest RAM by address (the vertical axis, 2 MiB chunks; cut to the range the faults are in when RAM is much larger) against time. The black step is the saver's front, its first span marked with a triangle: every chunk under the front has been saved and released (dark grey), so a guest write there goes straight through. Each dot is a fault, placed at its chunk: filled where the handler copied the chunk and released it (from then on the chunk is released too: the light band to its right), hollow where it copied nothing (the saver was gathering the span that holds the chunk, another copy of it was under way, or it found the chunk already saved) and only woke the guest. The engine records these times for every save (`fault-at-s`, `fault-chunk` and `sweep` in `__org.snaplab_query-snapshot-stats`, seconds after the arm)."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
fig = plot.cow_window(one[-1])
win = teach.cow_window_summary(one[-1])
print(f"this save: progress during it {one[-1]['progress_during_save']:.2f}; the fault thread's scheduling: {one[-1]['fault_thread'] or 'default'}")
print(f"saver: first span {win['saver_start_ms']:.1f} ms after the arm, end of RAM at {win['saver_end_ms']:.1f} ms; job concluded {one[-1]['details']['job_s'] * 1e3 - one[-1]['details']['stopped'][1] * 1e3:.1f} ms after RESUME")
print(f"the stop's thread after RESUME: disks frozen {one[-1]['freeze_ms']:.1f} ms after the stop began; zero-page map {one[-1]['zero_map_ms']:.2f} ms; "
      f"RAM phase (saver and writers) {one[-1]['run_ms']:.1f} ms; snapshot entry {one[-1]['commit_ms']:.1f} ms; flush {one[-1]['flush_ms']:.1f} ms")
print(f"faults: {win['faults']} ({win['faults_before_saver']} before the saver began); copied their chunk {win['faults_copied']}, waited {win['faults_waited']}")
print(f"the guest's first report after RESUME: {win['first_progress_ms']:.1f} ms")
print(f"the last fault served {win['last_fault_served_ms']:.1f} ms after the arm; the guest's first report after it: {win['first_progress_after_faults_ms']:.1f} ms")
print('each save at this size (ms after the arm): saver began | faults, before the saver, waited | last fault served | first report | first report after the last fault')
for w in (teach.cow_window_summary(r) for r in one):
    print(f"  {w['saver_start_ms']:5.1f} | {w['faults']:3d} {w['faults_before_saver']:3d} {w['faults_waited']:3d} | {w['last_fault_served_ms']:5.1f} | "
          f"{w['first_progress_ms']:5.1f} | {w['first_progress_after_faults_ms']:5.1f}")
print("the guest's rate over its rate before, each save: while faults were served | then until the front reached the end of RAM | then until the job ended")
for w in (teach.cow_window_summary(r) for r in one):
    print(f"  {w['rate_faults']:.2f} | {w['rate_saver']:.2f} | {w['rate_writers']:.2f}")"""),
    ("md", """Read the figure from left to right.

* **The saver does not start at RESUME.** Its first span (the triangle) comes milliseconds later (printed above for each save at this size; they vary from save to save). In between, the thread that ran the stop freezes the disks (a pending qcow2 snapshot per image; the printed freeze time counts from the stop's beginning, and is most of the saver's delay), asks the page tables which chunks are still the shared zero page, writes the stream's header and starts the saver, writer and scan-ahead threads, all of it sharing the two cores and the interpreter lock with the fault handling, so faults can delay it (exercise 4's saves, with fewer faults, can be compared, though they also differ in their pauses). Until then only the fault handler saves RAM: every fault in that stretch copies its own chunk.
* **Why the guest stands still at first.** This guest writes 256 pages at random across its 32 MiB working set in every batch, so every batch needs all 16 of its data chunks, and it then publishes its count in the first chunk (the progress page at 0x7000): 17 chunks, so at most 17 faults a save (the faults table above). A whole batch goes through only once each of them has been released, by its own fault (one at a time: each fault blocks the vCPU until its chunk is copied, a few tenths of a millisecond) or by the saver's front. The guest's first report after RESUME can come sooner: it ends the batch that was running at the stop, which has only its remaining pages to write, and so needs only the chunks of those; where that batch needs them all, it comes just as the last fault is served (compare the columns `first report` and `last fault served`: in most runs they coincide for every save, since the progress page's chunk is written at the end of every batch; a fault's time ends after the handler's bookkeeping, which follows the wake, so a report can be stamped a few tenths of a millisecond before it). The first report after the last fault (the last column) is the first batch no fault held back, and it comes later than the faults' sum (printed in the lost-time lines above): before its first fault the vCPU must enter the guest again, and between two faults it runs on to its next write to a chunk not yet released. That is the flat start of the upper line, under the rows of red bars. Between two bars the guest was woken, ran on to its next first write to a chunk not yet released, and that fault waited in the queue until the handler read it.
* **Faults and the front.** A fault can only come above the front (a chunk under it is released), which tests/migration/test_cow.py checks for every fault that copied. Whether the two meet depends on the save. When the saver starts late, the guest's own faults release its whole working set first: every fault comes before the saver began (printed per save: faults, and how many came before the saver), and every dot lies left of the triangle. When the saver starts early, its spans reach chunks the guest has not released yet: a write to a chunk in the 16 MiB span being gathered waits for the whole span (a hollow dot above a long red bar; counted as `waited` per save). The per-save lines above show which happened in each.
* **The real-time handler.** The fault handler thread runs at real-time priority where the host allows it (the printed scheduling; `emulator/migration/cow.py` `latency_priority`). Without it, a fault's wake-up could wait 2.5 ms for a CPU while the save's other threads ran (measured with `perf sched`), and this guest's first batch came later (`data/results/fault-thread/`).
* **After the faults.** The guest runs again. How fast, stretch by stretch, is printed for each save (its rate over its rate before: while faults were served, then from the last fault until the saver's front reached the end of RAM, the wait for the saver to start included, then while the writers finished, to the job's end; `nan` for a stretch under 1 ms). While faults are served it hardly moves (about 0.01); after them, the job's threads share the host's CPUs and the interpreter lock with it until the job concludes (the dash-dotted line), and how much that slows it varies from save to save (printed; this guest is unpaced, so it competes for the CPUs all the time): read it off the lines and the figure's slope rather than from a rule. A rate above 1 is not the guest going faster than normal: this guest is unthrottled, and its rate in the second before the command is itself measured from reports a batch apart, so read values within about a tenth of 1 as 1. Once the front reaches the end of RAM (the dotted line; RAM never written is passed in a few ioctls) no chunk is protected any more: RAM is all captured, but the writers still write the gathered pages to the image (the RAM phase printed above), and then come the snapshot table entry and the flush.

The working set lies at the bottom of RAM (the map), where the saver starts, at every RAM size; whether faults are still coming when its first spans reach it depends on when the saver starts. A fault that comes then can wait for the saver's span or find its chunk saved (compare `pages_by_fault`, 512 per chunk a fault copied, with 17 chunks' worth, at the two sizes in the tables above).

QEMU's background snapshot has one actor where snaplab has two: its migration thread both walks RAM in order and serves the faults (a guest write to a page not yet saved is queued to that thread, which sends it first, when it next looks at its queue; it releases the page's protection only after the page is in the stream), and it works per 4 KiB page (docs/reference/qemu-internals.md section 4.1): a random writer there faults once per page it writes, not once per 2 MiB, and each fault waits for its page to be in the stream (docs/deviations.md 38)."""),
    ("md", """**Is the saved state really the stop instant?** The `dirty` guest stamps each page it writes with its iteration number, and the host can compute, from the guest's own iteration counter, which stamp every page must carry (emulator/guest.py `expected_generations`). Load the snapshot and compare the stamp (the first 8 bytes) of every page of the working set with the one expected (a page stamped with the very next iteration, the one in flight at the stop, also counts as matching): a snapshot mixing pages from before and after the stop would fail."""),
    ("code", """from lab.proofs import stop_instant_proof
stop_instant_proof(COW, seed=SEED)"""),
    ("md", """Every page's stamp matches the iteration counter saved with the CPU state, although the guest kept writing during the save: the faults counted above are its first writes to chunks not yet saved, and their pages went into the snapshot from the copies, with the stop instant's stamps. This shows the snapshot is *consistent* (one instant for RAM and CPU); notebook 9 shows *which* instant it is.

**What QEMU 7.2 does, and what snaplab does differently.**
* QEMU: `migrate-set-capabilities background-snapshot` then `migrate` to a pipe or a command (`exec:cat > FILE`: QEMU 7.2 has no `file:` URI, docs/deviations.md 29); the result is a migration stream, not a qcow2 snapshot, and the disks are not snapshotted with it (docs/reference/qemu-internals.md section 4.1; recorded: 1.6-2.9 ms STOP-to-RESUME at 256 MiB and 2.0-36.6 ms at 4 GiB, three runs each, docs/reference/qemu-7.2-qmp.md "Background snapshot": QEMU protects all of RAM inside its stop, so its stop grows with RAM, where snaplab's protects inside the stop only the chunks written since its pre-arm (docs/deviations.md 59; exercise 3); that is an idle OVMF guest whose RAM is filled with random bytes, streamed to `exec:cat`, not this notebook's 32 MiB dirty guest into qcow2, so compare orders of magnitude only: notebooks 10 and 12 put both systems on the same guest). It write-protects each RAM block with one call and then saves and releases one host page (4 KiB for its anonymous RAM) at a time; a guest write to a page not yet saved is queued to the migration thread, which saves that page first (`ram_write_tracking_start()`, `get_queued_page()`, `ram_save_release_protection()` in migration/ram.c): QEMU's faulting vCPU waits until its page is in the stream, snaplab's until its chunk is copied into memory (docs/deviations.md 38).
* snaplab: the same technique behind `snapshot-save` (the `__org.snaplab_engine` argument), so the result is an internal qcow2 snapshot, disks frozen at the stop instant, loadable with `snapshot-load`; it works on 2 MiB chunks aligned with the transparent huge pages behind guest RAM, so arming stays O(huge pages) and one fault saves a whole chunk: 512 pages, of which it copies the non-zero ones (docs/deviations.md entries 27, 32, 33, 38)."""),
    ("md", """## Exercises: predict, then measure

1. **Working set and faults.** With 256 MiB of RAM and a working set of 8 MiB (instead of 32), predict the number of faults per save (an upper bound?) and the VM-state sizes of both saves.
2. **A guest that does not write.** With the `idle` workload, predict the fault count and the downtime.
3. **Bigger RAM, same stop?** Predict the copy-on-write downtime at 1024 MiB compared with 64 MiB.
4. **A smaller working set in the memory map.** Exercise 1's copy-on-write saves have a working set of 8 MiB: 4 chunks instead of 16. Before you run the last cell, predict in milliseconds when the guest finishes its first batch after RESUME (how many faults must it take first, and how long does one take?), compare with the main run's saves printed above, and say where its faults will sit in the memory map and whether the saver will start sooner."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
QUICK_GUEST = GUEST.with_(warmup_s=0.6, gap_s=0.2)     # shorter pauses: no progress ratios here
ex1 = []
for eng in (BLOCKING, COW):
    ex1 += run_experiment(QUICK_GUEST.with_(ram_mib=256, engine=eng, working_set_mib=8))
for key, scale in (('faults', 1), ('vmstate_bytes', 2**-20)):
    print(key); print(teach.spread_table(ex1, key, scale=scale))"""),
    ("code", """print('faults never exceed the 2 MiB chunks of the working set plus the first chunk (4 + 1):',
      all(r['faults'] <= 5 for r in ex1 if r['engine'] == COW))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
ex2 = run_experiment(QUICK_GUEST.with_(ram_mib=64, engine=COW, workload='idle'))
print('idle guest:'); print(teach.spread_table(ex2, 'faults')); print(teach.spread_table(ex2, 'downtime_ms', digits=3))
print('chunks protected again inside the stop (written between the pre-arm and the stop), idle guest:',
      [r['rearmed_chunks'] for r in ex2], '| dirty guest, main run:', [r['rearmed_chunks'] for r in cow])
print('the protection inside the stop (arm_ms), idle guest:', [round(r['arm_ms'], 3) for r in ex2])
ex3 = []
for mib in (64, 1024):   # the same guest and pauses at both sizes; two saves each: quick mode's time budget
    ex3 += run_experiment(QUICK_GUEST.with_(ram_mib=mib, engine=COW, repetitions=2))
print('dirty guest, 64 and 1024 MiB (the same pauses as the idle guest above):')
print(teach.spread_table(ex3, 'downtime_ms', digits=3))
print('the protection inside the stop (arm_ms), dirty guest:', [round(r['arm_ms'], 3) for r in ex3])
print('chunks protected again inside the stop, dirty guest, same pauses:', [r['rearmed_chunks'] for r in ex3])
print('the protection of all of RAM before the stop (pre_arm_ms), 64 and 1024 MiB:',
      [(r['ram_mib'], round(r['pre_arm_ms'], 3)) for r in ex3])"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
small = [r for r in ex1 if r['engine'] == COW]
fig = plot.cow_window(small[-1])
for w in (teach.cow_window_summary(r) for r in small):
    print(f"8 MiB working set: {w['faults']} faults ({w['faults_copied']} copied), saver began {w['saver_start_ms']:.1f} ms, "
          f"last fault served {w['last_fault_served_ms']:.1f} ms, first report {w['first_progress_ms']:.1f} ms, "
          f"first report after the last fault {w['first_progress_after_faults_ms']:.1f} ms after the arm")
print("the vCPU's first entry into the guest after RESUME, each save (ms after the arm):", [round(r['first_entry_ms'], 2) for r in small])
print("disks frozen, ms after the stop began: this exercise", [round(r['freeze_ms'], 1) for r in small], "| main run", [round(r['freeze_ms'], 1) for r in one])
lat_small = np.concatenate([r['details']['fault_latency_ms'] for r in small])
print(f"the prediction: 5 faults x {np.median(lat_small):.2f} ms (this exercise's median fault) = {5 * np.median(lat_small):.1f} ms of faults, "
      f"against the main run's 17 x {np.median(lat):.2f} ms = {17 * np.median(lat):.1f} ms")"""),
    ("md", """<details><summary>Worked solutions</summary>

1. A fault happens at most once per 2 MiB chunk per save (the handler copies the chunk's non-zero pages and releases it), and only for chunks the guest writes: the 4 chunks of an 8 MiB working set, plus the first chunk, which holds the workload's stack and progress page (written at the end of every batch). So at most 5 (checked above). Both VM states hold the non-zero pages only, about the 8 MiB working set plus the code and stack (the printed tables give both).
2. The `idle` guest writes almost nothing: one fault per save at most (the first chunk, with its stack and progress page), and a stop of the same order (a fraction of a millisecond). What the guest does after the stop does not enter it; what it wrote just before does, a little: the stop protects again the chunks written between the pre-arm and the stop (printed for the idle guest, for the dirty guest with the same pauses in exercise 3, and for the main run), one ioctl per run of them. Compare the idle guest's downtime with exercise 3's 64 MiB row, which has the same pauses (the main run's has longer ones): the dirty guest's stop can come out longer, but its protection inside the stop (`arm_ms`, printed for both) is only hundredths of a millisecond, so the re-arm explains only part of any difference; the rest of the stop (the device state, draining the disks, the vCPU leaving the guest) may cost more with a guest busy writing, a hypothesis these numbers do not break down (with three idle and two dirty saves, first check whether the two ranges overlap at all).
3. About the same: the stop re-protects only the chunks the guest wrote since all of RAM was protected just before it (a few, whatever the RAM size), takes the device state, and writes no RAM. Compare the two rows printed above (the same guest and pauses, two saves each, so read each min-max as two values): with 16 times the RAM, is the 1024 MiB pair outside the 64 MiB pair's range, and by more than that range's width? A stop that grew with RAM would put it well above. The protection of all of RAM should grow with RAM (it walks the page tables, one entry per 2 MiB huge page: `pre_arm_ms`, printed for both sizes; at a few tenths of a millisecond a single value moves with the host as much as with the size), but it runs before the stop, with the guest running, either way; inside QEMU's stop it adds to the downtime (QEMU's recorded background-snapshot stops above: 1.6-2.9 ms at 256 MiB, 2.0-36.6 ms at 4 GiB; docs/deviations.md 59). The blocking stop depends mostly on the data in use (32 MiB here), not on the RAM size: its writes cover only the data, and its scan for zero pages only the chunks the guest touched (RAM never written is known zero from the page tables, notebook 5); what grows with RAM is small (the page-table query), so between 64 and 256 MiB (the first table) expect the same order, and read any difference against three saves' ranges. The difference is that copy-on-write's stop is far shorter: at least 20 times at both sizes (checked in the cell under the first table; divide its medians for the factor).
4. Sooner, but not as soon as the faults' sum. With 4 chunks a batch needs only 5 chunks released (the 4 of the working set and the first chunk, where it publishes its count), so the guest takes 5 faults (printed: 5, all copied) where the main run's took 17 (16 and the first chunk). The last line printed makes the prediction with the measured fault times: 5 faults' worth of handler time against 17. The measured first report after the last fault (printed per save) comes later than that sum, as in the main run: the vCPU's first entry into the guest after RESUME (`first_entry_ms`, printed, after the arm) comes before the first fault, and between two faults the guest runs on to its next write and the fault waits for the handler. Compare the two runs' ratios of measured to predicted. The faults are 5 filled dots near the bottom of the map, left of the triangle, when the saver began after them (printed). Whether the saver begins sooner than in the main run is printed too, with the disks' freeze beside it, which comes first in the stop's thread and so delays the saver (its time depends on the image, its snapshots and the host, and fewer faults leave the stop's thread more of the CPUs and the interpreter lock); this exercise's pauses differ from the main run's (0.2 s against 1.1 s), so read the difference with care. If one of your saves shows a late first batch, look at its bars: a fault that waited (a red bar much longer than the others), or one that came after the saver began and waited for its span (a hollow dot). Do not compare the dashed lines of the two figures: this exercise pauses only 0.2 s between saves, so the second before each command may hold the previous save and its deletion, and the two baselines are not comparable.
</details>"""),
]
