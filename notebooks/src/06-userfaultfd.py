"""Notebook 06-userfaultfd: 4b. userfaultfd step by step"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 6. userfaultfd step by step: write protection, the fault loop, filling missing pages

**Learning goals.** After this notebook you can
1. name the steps of a userfaultfd write-protect window: create the descriptor and negotiate features (`UFFDIO_API`), register a range (`UFFDIO_REGISTER`), protect it (`UFFDIO_WRITEPROTECT`), serve faults in a loop, release, unregister;
2. explain what the faulting thread experiences (it blocks in the kernel until the handler releases the page) and why a snapshot's handler copies the page *before* releasing it;
3. compare the costs of 4 KiB and 2 MiB granules (a *granule* is the unit a fault handler copies and releases at once: the page written, or the whole 2 MiB chunk around it), measured here: arming, number of faults, time per fault, bytes copied;
4. fill missing pages three ways (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_MOVE`) and say which lazy restore uses when;
5. say which write-protect backend snaplab uses for guest RAM, and why.

**Prerequisites.** Notebook 5 (what a blocking save does); virtual memory and page faults at the level of "a page table entry can forbid writes".

**What to look at.** The feature list the kernel grants; `faults`, `MiB_copied` and `service_us` for the two granules, with many writes and with few; `ms_per_MiB` of the fill ioctls.

**Sources.** Linux `Documentation/admin-guide/mm/userfaultfd.rst` and `include/uapi/linux/userfaultfd.h` for the interface; emulator/uffd.py wraps exactly these ioctls with ctypes; emulator/migration/cow.py uses them for the copy-on-write engine. The first proposal to use it for savevm: "Async savevm must copy-on-write guest RAM ... Rik van Riel suggested using userfaultfd(2) ... UFFDIO_REGISTER_MODE_WP" (Stefan Hajnoczi, qemu-devel, 2016-10-12; docs/reference/qemu-internals.md section 4.2).

The experiments run on a scratch mapping made like snaplab's guest RAM (anonymous, private, 2 MiB aligned, advised for transparent huge pages). The thread that writes is a `ctypes.memset` caller, which releases Python's GIL while it is blocked, as the vCPU thread does inside Unicorn's `emu_start`.

Lab functions used: `lab.uffd_steps.kernel_offer`, `copy_order`, `write_fault_loop`, `missing_fault`, `fill_costs`, `lab.teach.spread_table`, `lab.run.run_experiment`."""),
    ("code", """from lab import uffd_steps as us, teach
offer = us.kernel_offer()
offer"""),
    ("md", """Step 1, `UFFDIO_API`: this kernel grants write-protect faults (`PAGEFAULT_FLAG_WP`), write protection of pages not yet populated (`WP_UNPOPULATED`), asynchronous write protection resolved in the kernel (`WP_ASYNC`, used by the pre-copy engine's dirty tracking with `PAGEMAP_SCAN`), `MOVE` (the `UFFDIO_MOVE` ioctl, used by the lazy loads below), and `EVENT_REMAP` (the handler is told when the process `mremap`s a registered range; the probe asks for each feature alone, and snaplab's engines do not use this one). Step 2, `UFFDIO_REGISTER` in both modes (missing and write-protect) returns the ioctls allowed on the range, listed above; of them snaplab does not use `UFFDIO_POISON` (it marks pages so that an access raises a memory error, for handlers that lost a page, e.g. after a hardware error on the migration source)."""),
    ("md", """## One fault, served in two orders

Before a loop of many faults, one fault in slow motion. A snapshot must keep memory as it was at one instant, the *stop instant* (for a VM, the moment the guest is paused: QEMU 7.2 write-protects all of RAM inside that pause, in `ram_write_tracking_start()` (migration/ram.c), called by `bg_migration_thread()` with the VM stopped; snaplab protects it just before, with the guest running, and inside the pause protects again only the chunks written meanwhile, `docs/deviations.md` 59: either way the snapshot holds the pause's content); every later write must reach the running guest, not the snapshot. Here a 2 MiB range holds the byte `0x11` everywhere: that is the stop instant's content. The range is registered for write protection and protected as a whole; then a writer thread stores `0x22` into one byte of its sixth page (pages are counted from 0, so the output says page 5). The store cannot complete: the writer blocks in the kernel, and a fault message arrives on the descriptor, saying *which* page and *why* (`fault_write`: a write; `fault_wp`: the page is write-protected, not missing). The handler, this notebook's thread, must now do two things: copy the page (for the snapshot) and release the protection (here of the whole 2 MiB range; releasing wakes the writer, whose store then completes). `copy_order` does them in both orders and keeps the copy as "the snapshot". In the wrong order the writer's store races the copy. To show what happens when the writer wins, every time and not only when the race goes that way, the handler then *joins* the writer thread before it copies: once the writer's `memset` has returned, its store is in memory, so a copy taken afterwards cannot miss it. The second cell below runs the race for real, without that join."""),
    ("code", """demo = [us.copy_order(order) for order in us.COPY_ORDERS]
for d in demo:
    print(f"{d['order']:<19}: fault on page {d['fault_page']} (write {d['fault_write']}, write-protected {d['fault_wp']}); "
          f"snapshot holds {d['snapshot_byte']:#04x}, the page now {d['page_byte_now']:#04x}: "
          f"{'the stop instant kept' if d['snapshot_kept_the_stop_instant'] else 'the stop instant LOST'}")"""),
    ("md", """Copy first, and the snapshot holds `0x11`: while the handler copied, the writer was still blocked, so the page could not change. Release first, and the snapshot holds `0x22`, a byte written *after* the stop: the snapshot is silently wrong, and nothing in it says so. In both orders the page ends with `0x22` (the guest's write is never lost; only the snapshot's view of the page differs). This is why snaplab's fault path copies a chunk into a buffer and only then calls `UFFDIO_WRITEPROTECT` to release it (`CowSave._save_chunk` in emulator/migration/cow.py), and why QEMU's background snapshot writes the faulting page into its migration stream, flushes the stream's buffer ("Flush async buffers before un-protect", migration/ram.c) and only then clears the protection with `uffd_change_protection` (docs/reference/qemu-internals.md section 4.1). Without the join, does the wrong order fail every time? The handler copies within microseconds of the release, and the writer needs a wake-up and a CPU before its store lands, so the race can go either way. The cell below serves the same fault 300 times in each order with no join at all and counts the snapshots that lost `0x11`."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
race = {order: us.copy_order_trials(order, trials=300) for order in us.COPY_ORDERS}
for order, r in race.items():
    print(f"{order:<19}: {r['snapshots_wrong']:3} of {r['trials']} snapshots lost the stop instant's byte")"""),
    ("code", """print('copy, then release: not one snapshot wrong in 300 races:', race[us.COPY_ORDERS[0]]['snapshots_wrong'] == 0)"""),
    ("md", """Copy first is never wrong: while the handler copies, the writer cannot run its store, whatever the scheduler does. Release first *can* be wrong, and how often depends on the host's scheduling at that moment: the count printed above is this execution's; in the executions while this notebook was written it ranged from none in 300 to about 1 in 3. A count of 0 does not make release first right: that order lets the writer's store run between the release and the copy, and only the scheduler decides whether it does; copy first leaves it no such moment (the single fault above, whose handler let the writer's store land before copying, shows the wrong byte). A bug that shows once in 300 snapshots passes most tests, and corrupts a snapshot now and then without a trace.

## A write-protect window, served in Python

`write_fault_loop(granule, writes=...)` registers 64 MiB, protects it with one `UFFDIO_WRITEPROTECT` (`arm_ms`), and starts a writer that stores one byte into each of `writes` random pages. Each store to a protected page blocks the writer in the kernel and queues a fault message; the loop reads it (`read_faults`), copies the granule around the page (the contents a snapshot must keep, still unchanged), then releases the granule's protection, which wakes the writer to retry its store. Two writers: a busy one (2000 writes) and a sparse one (10 writes); three repetitions per granule each. `service_us` is the handler's time per fault (read to release); `writer_us_per_fault` is the writer's whole run (timed in the writer's own thread, from its first store to its last) divided by its faults: with the busy writer nearly all of that run is spent waiting at faults, so it is what a fault costs the thread that takes it; with the sparse writer it also holds the time between its ten stores, so read it as an upper figure."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
REPS = 3
runs = [us.write_fault_loop(g, writes=w, seed=rep) for w in (2000, 10) for g in (4096, 2 << 20) for rep in range(REPS)]
rows = [{**{k: v for k, v in r.items() if k != 'service_us'}, 'granule': '4 KiB' if r['granule'] == 4096 else '2 MiB',
         'service_us_median': teach.group_median([{'x': x} for x in r['service_us']], 'x'),
         'writer_us_per_fault': r['writer_ms'] * 1e3 / max(r['faults'], 1)} for r in runs]
for key in ('arm_ms', 'faults', 'MiB_copied', 'service_us_median', 'writer_ms', 'writer_us_per_fault'):
    print(key)
    print(teach.spread_table(rows, key, by=('writes', 'granule')))"""),
    ("code", """by = {(w, g): [r for r in rows if r['granule'] == g and r['writes'] == w] for w in (2000, 10) for g in ('4 KiB', '2 MiB')}
print('2000 writes, 2 MiB granules: at most 32 faults (64 MiB / 2 MiB):', all(r['faults'] <= 32 for r in by[2000, '2 MiB']))
print('2000 writes: 4 KiB granules take more faults than 2 MiB ones, every run:',
      min(r['faults'] for r in by[2000, '4 KiB']) > max(r['faults'] for r in by[2000, '2 MiB']))
print('2000 writes, 2 MiB granules copied all 64 MiB, every run:', all(r['MiB_copied'] == 64 for r in by[2000, '2 MiB']))
print('10 writes: at most 10 faults with either granule:', all(r['faults'] <= 10 for w, g in by if w == 10 for r in by[w, g]))
print('4 KiB granules copy fewer bytes, with both writers:',
      all(max(r['bytes_copied'] for r in by[w, '4 KiB']) < min(r['bytes_copied'] for r in by[w, '2 MiB']) for w in (2000, 10)))
{w: {g: sorted({round(r['MiB_copied'], 2) for r in by[w, g]}) for g in ('4 KiB', '2 MiB')} for w in (2000, 10)}"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# the same runs, drawn: what the writer paid (its time in its writes) against the faults it took
from lab import plot
fig = plot.fault_granules(rows)"""),
    ("md", """**4 KiB against 2 MiB.** The figure puts each run at its fault count and the time its writer spent in its writes (filled: the busy writer, hollow: the sparse one; the ringed point is each group's median, printed beside it). For the busy writer the two granules lie far apart along both axes: about 2000 faults against 32, and many times the writer's time (the medians beside the points). For the sparse writer they lie close together (about 10 faults each), and the 2 MiB granules cost the writer more per fault, the price of copying 2 MiB instead of 4 KiB (compare the medians printed beside the points). Arming costs the same for both (one ioctl over the range, before any granule matters). With 4 KiB granules every distinct page written takes a fault (2000 writes hit a little under 2000 distinct pages), each fault is cheap to serve (a 4 KiB copy) but costs a round trip through the kernel and the Python loop, and the writer is slowed by all of them. With 2 MiB granules a fault copies 512 times as much, so each takes longer, but there are at most 32 faults for 64 MiB, and every later write to the chunk goes through unhindered.

The bytes copied tell the other side (the `MiB_copied` lines, exact and deterministic for these seeds). 2000 random writes over only 32 chunks hit every chunk, so 2 MiB granules copied all 64 MiB (checked), while 4 KiB granules copied only the pages written, under 8 MiB. The busy writer thus favours 2 MiB granules: fewer faults for the same chunks. The sparse writer reverses the verdict: 10 writes take at most 10 faults with either granule (checked; fewer with 2 MiB when two writes share a chunk), so the fault count no longer favours 2 MiB, while each 2 MiB fault copies 512 times as many bytes (MiB against KiB above); compare its `service_us_median` for the two granules, the price of those bytes. Note also that a 4 KiB fault took the handler longer for the sparse writer than for the busy one (the `service_us_median` table): each of the sparse writer's ten faults is the first release inside its huge page, which makes the kernel split it (13.1 us per split in the project's probe, docs/reference/unicorn-notes.md, addendum), where most of the busy writer's 4 KiB faults land in huge pages already split; a handler loop that runs ten times also runs colder than one that runs two thousand times. This was not measured apart here. Which granule wins depends on how many writes land in each chunk during the window. Releasing 4 KiB inside a transparent huge page also forces the kernel to split it into 4 KiB entries, and the splits stay, so a later arm of the same range has 4 KiB entries to walk (the project's probe, docs/reference/unicorn-notes.md, addendum section 1; not measured in this notebook). snaplab's copy-on-write engine uses 2 MiB chunks for these reasons (docs/deviations.md entry 32; emulator/migration/cow.py docstring); QEMU's background snapshot saves the faulting page itself ("finding respective RAM block and saving faulting page to the migration stream", docs/reference/qemu-internals.md section 4.1).

## Filling missing pages: what lazy restore does

A range registered in *missing* mode faults on first access to a page that has no page table entry. The handler fills it: `UFFDIO_COPY` copies from a buffer, `UFFDIO_ZEROPAGE` maps zeros, `UFFDIO_MOVE` (Linux 6.8) moves the pages of another anonymous range of the same process in, without copying. Each call also wakes the thread that waited. First, one such fault. `missing_fault` registers a 2 MiB range in missing mode without touching it (no page has a page-table entry: `pages_with_an_entry_before`), and a reader thread reads one byte of its tenth page. The reader blocks; the message says a read (`fault_write` False) of a missing page (`fault_wp` False); the handler fills that one 4 KiB page, with `UFFDIO_COPY` from a buffer of `0x5a` bytes or with `UFFDIO_ZEROPAGE`, and the fill wakes the reader, which reads what was put there."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
FAULTS = 20  # each fill, 20 times: one fault's timing alone is noise
for fill in us.FILLS:
    ms = [us.missing_fault(fill) for _ in range(FAULTS)]
    m = ms[0]
    waits = teach.spread_table([{'fill': fill, 'x': r['reader_waited_ms']} for r in ms], 'x', by=('fill',), digits=3)
    ioctl = teach.spread_table([{'fill': fill, 'x': r['fill_ioctl_ms']} for r in ms], 'x', by=('fill',), digits=3)
    print(f"{fill}: a read of page {m['fault_page']} (write {m['fault_write']}, write-protected {m['fault_wp']}) read "
          f"{m['reader_read']:#04x}; pages with an entry: {m['pages_with_an_entry_before']} before, {m['pages_with_an_entry_after']} after")
    print("  the reader's wait (ms), over", FAULTS, 'faults:'); print(waits)
    print('  of it, the fill ioctl (ms):'); print(ioctl)"""),
    ("code", """checks = [us.missing_fault(fill) for fill in us.FILLS]
print('the reader read what the fill put there (0x5a, then 0):', [c['reader_read'] for c in checks] == [us.FILLED, 0])
print('each fill put exactly one page into the 2 MiB range:',
      all(c['pages_with_an_entry_before'] == 0 and c['pages_with_an_entry_after'] == 1 for c in checks))"""),
    ("md", """The reader's wait is the whole round trip: the kernel queues the message, this thread's `poll` wakes, Python reads the message and issues the ioctl, the kernel installs the page and wakes the reader, and the reader gets a CPU again. The fill ioctl is only a part of that wait (compare the two tables of each fill); the rest is delivery and wake-ups on both sides, and the Python in between. The two fills' waits are close: filling one 4 KiB page costs little either way, so the round trip decides. (`pages with an entry` is counted with `mincore`, one flag per page of the range; pages are numbered from 0.) Only the page asked for arrives: the other 511 pages of the range still have no entry and would each fault on their first touch. That is the cost a lazy restore weighs: a page at a time means one such round trip per page the guest touches, which is why snaplab's lazy loads fill whole 2 MiB chunks at each fault, and fill the rest of RAM in the background (notebook 11).

Now the fill costs in bulk. `fill_costs` fills 32 MiB with each, in 4 KiB and in 2 MiB calls, and checks every byte of the filled range (one numpy comparison over the mapping). One more row moves 4 KiB at a time from a source mapped with 4 KiB pages instead of huge pages."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
fills = us.fill_costs(reps=REPS)
print(teach.spread_table(fills, 'ms_per_MiB', by=('ioctl', 'step'), digits=3))
def fill_med(op, step):
    return teach.group_median(fills, 'ms_per_MiB', ioctl=op, step=step)
for op in ('UFFDIO_COPY', 'UFFDIO_ZEROPAGE', 'UFFDIO_MOVE'):
    print(f"{op}: 4 KiB calls cost {fill_med(op, '4 KiB') / fill_med(op, '2 MiB'):.0f}x as much per MiB as 2 MiB calls")
print(f"UFFDIO_MOVE in 4 KiB calls, huge-page source over 4 KiB-page source: "
      f"{fill_med('UFFDIO_MOVE', '4 KiB') / fill_med('UFFDIO_MOVE', '4 KiB, source in 4 KiB pages'):.2f}x")
print(f"4 KiB calls, UFFDIO_MOVE (huge-page source) over UFFDIO_COPY: {fill_med('UFFDIO_MOVE', '4 KiB') / fill_med('UFFDIO_COPY', '4 KiB'):.2f}x")"""),
    ("code", """# (ioctl, step, calls, all 32 MiB filled, every byte right)
sorted({(r['ioctl'], r['step'], r['calls'], r['bytes_filled'] == 32 << 20, r['contents_right']) for r in fills})"""),
    ("md", """Every fill reported all 32 MiB filled, and every byte of the range held what it should (zeros, or the source's `0x01`): the last column above. Per MiB, 2 MiB calls are much cheaper than 4 KiB calls for all three (the ratios printed under the table). Why differs by ioctl, and the kernel source says how (mm/userfaultfd.c):

* `UFFDIO_COPY` and `UFFDIO_ZEROPAGE` on an anonymous private range fill **one 4 KiB page-table entry at a time** whatever the length of the call (`mfill_atomic` loops over the range in `PAGE_SIZE` steps; only hugetlbfs ranges are filled in huge pages). A 2 MiB call does the same 512 entries of work as 512 calls of 4 KiB; what it saves is the 511 other system calls and their set-up. So 32 MiB is 16 calls instead of 8192 (the `calls` column), and that is where the gain comes from; `UFFDIO_ZEROPAGE` maps the shared zero page into each entry, `UFFDIO_COPY` allocates and copies a page for each.
* `UFFDIO_MOVE` (`move_pages`) is the only one that moves a whole huge page: when source and destination are 2 MiB aligned, the length covers the huge page and the source is mapped by one huge-page entry, it moves that entry (`move_pages_huge_pmd`), so nothing is copied and one entry changes per 2 MiB. That is why it is the cheapest fill per MiB.
* A 4 KiB `UFFDIO_MOVE` out of a huge page cannot move the huge entry: the kernel first **splits** it (`split_huge_pmd`; "The folio will be split by move_pages_pte()") and then moves 4 KiB entries one by one. Does that split make 4 KiB moves dear? The extra row tests it: the same 4 KiB moves from a source mapped with 4 KiB pages from the start, where there is nothing to split. The split costs only what the printed huge-page/4 KiB-page ratio exceeds 1; a ratio at or under 1, within the spread of the two rows, means no split cost is measurable here. Against a 4 KiB copy (the last printed line), a 4 KiB move does per page work that filling an empty destination does not (`move_pages_pte` takes the page tables of both ranges, clears the source entry, which needs a TLB flush, and re-points the page's reverse mapping) and saves the 4 KiB copy; which of the two weighs more is what that ratio shows on this host (the ratio has varied from one execution to the next, in either order: within about 15% in some, 25% apart in another; one execution does not settle which is dearer).

snaplab's lazy load engines fill RAM in 2 MiB chunks: they read a chunk into the old RAM's pages set aside and move them in with `UFFDIO_MOVE` where the kernel allows it, and fall back to `UFFDIO_COPY` otherwise (emulator/migration/postcopy.py `_fill`, `_install`). A chunk whose pages are all zero in the snapshot is not read at all and is left missing; if the guest touches it during the load, one `UFFDIO_ZEROPAGE` over the whole chunk maps the shared zero page into its 512 entries (`_touch_zeros`, as QEMU's postcopy places a zero page, `postcopy_place_page_zero`), so its other pages do not fault one by one. Notebook 11 measures the lazy loads.

## Which write-protect backend does snaplab use, and why?"""),
    ("code", """from lab.spec import WP_BACKENDS, ExperimentSpec, compare_engines
from lab.run import run_experiment
COW = compare_engines()[1]
print('backends:', WP_BACKENDS)
auto = run_experiment(ExperimentSpec(ram_mib=64, engine=COW, repetitions=REPS))
tlb = run_experiment(ExperimentSpec(ram_mib=64, engine=COW, repetitions=REPS, wp_backend='unicorn-tlb'))
print('auto chose:', sorted({r['wp_backend_used'] for r in auto}), '| forced:', sorted({r['wp_backend_used'] for r in tlb}))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
print(teach.spread_table(auto + tlb, 'downtime_ms', by=('wp_backend',), digits=3))
print(teach.spread_table(auto + tlb, 'progress_during_save', by=('wp_backend',), digits=3))"""),
    ("md", """(`progress_during_save`: the guest's speed while the save ran, over its speed before it; 1 means unslowed. This guest is throttled to a fixed rate and does not make up for a stall, so every wait lowers the figure, and a value a little above 1 is the noise of the two rate estimates, not a faster guest: `bench/pacing_stall.py` holds the vCPU for a while and shows the stall simply lost.)

`auto` chose **userfaultfd**, because this kernel grants it (the first cell). The alternative, `unicorn-tlb`, is a fallback for hosts without userfaultfd: it switches Unicorn to a software TLB with a Python hook for the snapshot window and catches writes there (emulator/migration/engine.py `protector`; docs/deviations.md entry 31).

The project's feasibility probe measured both (docs/reference/unicorn-notes.md, TL;DR), and the trade is not one-sided:

* **Per write fault, the TLB fallback is far cheaper**: about 2.5 us per copy-on-write fault, copy included, against about 61-66 us end to end for a userfaultfd fault served by a Python thread. The probe's figure is what the faulting thread waits, so it compares with the busy writer's `writer_us_per_fault` above, not with `service_us_median`: the handler's own work is only part of it; the rest is the kernel's fault delivery, waking the handler thread, and waking the writer again. The 2.5 us is the probe's, not measured here (this notebook's TLB rows above measure a whole save, not one fault). The probe's 61-66 us is not this notebook's figure either: it was measured on another host, another day, with a handler that released the page and nothing else. The busy writer's `writer_us_per_fault` printed above is this host's, with this notebook's handler (which also copies the granule and times each step); in executions of this notebook it has come out up to about twice the probe's. Either way it is 25-50 times the TLB fallback's cost per fault.
* **Per instruction, userfaultfd is free and the TLB fallback is not**: with the hook every miss of Unicorn's software TLB costs a Python call (about 1.1 us) for the whole window, so guests that miss the TLB often dropped from 60 M to 3.5 M instructions per second in the probe, and the hook replaces the guest MMU (no guest paging). userfaultfd costs nothing until a protected page is written.
* **Arming**: the probe armed 64 MiB in 1.2 ms, on 4 KiB pages (its kernel had transparent huge pages in `madvise` mode and its mapping was not advised: "anon mmap gets 4 KiB pages", docs/reference/unicorn-notes.md section 5); on huge pages its second probe measured about 0.11 us per 2 MiB entry, 55 us per GiB (addendum section 1). snaplab's RAM and this notebook's scratch mapping are advised for huge pages, which is why `arm_ms` above is in hundredths of a millisecond.

Per-page `uc.mem_protect` was ruled out (30 ms per call, it splits regions). The two rows above are both measured here, on the default guest throttled to 100 MiB/s: the TLB fallback's downtime is the longer (compare the medians: its stop also switches Unicorn's TLB mode), both well under a millisecond. Its `progress_during_save` has come out at or above 1 in the executions so far (compare this run's table above), which a guest that never makes up a stall cannot reach by running faster: the fallback's window is short and its rate estimate noisy, and why it errs upwards was not established. So these rows do not rank the backends by guest speed; the probe's per-fault and per-instruction costs above do: guests with many writes per window favour the fallback's cheap faults, guests with many TLB misses favour userfaultfd, and only userfaultfd keeps guest paging, which is why it is the default and the TLB hook only the fallback.

## Exercises: predict, then measure

1. **Arming cost.** Predict how `arm_ms` changes from 64 MiB to 256 MiB with 2 MiB-aligned huge pages.
2. **Writes to the same page.** With 2000 writes to only 10 distinct pages (4 KiB granules), predict the number of faults.
3. **Zero fill by copy.** Would filling a missing range with `UFFDIO_COPY` from a zero buffer cost the same as `UFFDIO_ZEROPAGE`? Use the table above."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
arms = [us.write_fault_loop(2 << 20, size=mib << 20, writes=10, seed=rep) | {'mib': mib} for mib in (64, 256) for rep in range(REPS)]
print(teach.spread_table(arms, 'arm_ms', by=('mib',), digits=3))
a64, a256 = (teach.group_median(arms, 'arm_ms', mib=m) for m in (64, 256))
print(f"median 256 MiB - 64 MiB: {(a256 - a64) * 1e3:.1f} us, {(a256 - a64) * 1e3 / (128 - 32):.2f} us per extra 2 MiB entry")"""),
    ("code", """import ctypes
few = us.Scratch(64 << 20)
from emulator.uffd import UserFaultFD, UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFDIO_REGISTER_MODE_WP
u = UserFaultFD(UFFD_FEATURE_PAGEFAULT_FLAG_WP)
u.register(few.addr, few.size, UFFDIO_REGISTER_MODE_WP); u.writeprotect(few.addr, few.size, True)
import threading
pages = [few.addr + (i % 10) * 4096 for i in range(2000)]
t = threading.Thread(target=lambda: [ctypes.memset(a, 3, 1) for a in pages]); t.start()
faults = 0
while t.is_alive() or faults == 0:
    for f in u.read_faults():
        faults += 1
        u.writeprotect(f.address & ~4095, 4096, False)
t.join(); u.unregister(few.addr, few.size); u.close(); few.close()
print('faults:', faults)"""),
    ("md", """<details><summary>Worked solutions</summary>

1. It **grows with the size, but stays tiny**: a few hundredths of a millisecond for both (printed above), 256 MiB being only 128 huge-page entries to mark against 32. The line under the table divides the difference of the two medians by the 96 extra entries: a fraction of a microsecond per entry, of the same order as the probe's 0.11 us, on top of the system call's fixed cost, which dominates at these sizes. Read it with the spread: the 256 MiB row's IQR and min-max are about as wide as the difference of the medians, so three arms of each size give the order of the slope, not its value. With 4 KiB pages it would grow with the size: the first probe, whose mapping got 4 KiB pages, measured 1.2 ms per 64 MiB and 15 ms per GiB; its second probe, on huge pages, 55 us per GiB (docs/reference/unicorn-notes.md, TL;DR and addendum section 1); snaplab's copy-on-write save protects all of RAM before its stop at about 0.05 ms per GiB on the AMD EPYC host and 0.02 on the Xeon one, with huge pages (`UffdProtector.pre_arm`, `docs/deviations.md` 59), the same order as the figure per entry above; inside the stop it protects again only what the guest wrote meanwhile.
2. **10**: the first write to each page faults; the handler releases that page, so the other 1990 writes go straight through.
3. No: `UFFDIO_ZEROPAGE` maps the shared zero page into each 4 KiB entry without allocating or copying, while `UFFDIO_COPY` allocates a page for each entry and copies 4 KiB of zeros into it; both fill one 4 KiB entry at a time on this anonymous mapping, whatever the call's length (mm/userfaultfd.c `mfill_atomic`), so the difference is the allocation and the copy, at either step. Compare the two rows of the fill table at the same step.
</details>"""),
]
