"""Notebook 05-blocking-savevm: 4. Blocking savevm"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 5. Blocking savevm: what sets the length of the stop

**Learning goals.** After this notebook you can
1. list what a blocking save does while the guest is stopped: scan RAM for zero pages, write the non-zero pages into the qcow2 image, commit the snapshot's metadata; and what it does after RESUME (flush);
2. show by experiment that the stop grows with the **RAM in use** (the non-zero pages), and hardly with the RAM size;
3. predict the RAM in use of a running guest from its write rate, its working set and how long it ran, and so predict the stop;
4. compare with QEMU 7.2 like with like: bytes written per second of stop.

**Prerequisites.** Notebooks 1-3 (QMP jobs, STOP/RESUME, where the VM state goes).

**What to look at.** The `vmstate MiB` column (it is the RAM in use), the medians *and* their interquartile ranges, and the two panels of the figure: which one has a steep line?

**The guest.** The `dirty` workload writes one 8-byte stamp into each page it visits, picking pages at random in a working set (its size is a parameter; by default half of RAM). Run unthrottled, it has written every page of its working set long before the first save (it does millions of page writes per second), so the RAM in use is exactly the working set. Every other page of RAM is zero.

Lab functions used: `lab.teach.ram_in_use_sweep`, `lab.teach.spread_table`, `lab.teach.per_mib_costs`, `lab.teach.stop_figure`, `lab.run.run_experiment`."""),
    ("code", """QUICK = True
REPS = 5                                           # repetitions per point (medians and IQR below)
SIZES = [64, 128, 256] if QUICK else [256, 1024, 4096]   # RAM size, with the RAM in use fixed
IN_USE = [16, 32, 64] if QUICK else [64, 256, 1024]      # RAM in use, with the RAM size fixed
FIXED_RAM, FIXED_IN_USE = max(SIZES), IN_USE[1]
SEED = 1"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab import teach
from lab.spec import save_engines
BLOCKING = save_engines()[0]          # the registry's first engine is QEMU's savevm
rows = teach.ram_in_use_sweep(BLOCKING, SIZES, IN_USE, fixed_ram=FIXED_RAM, fixed_in_use=FIXED_IN_USE,
                              reps=REPS, seed=SEED)
print('downtime, STOP to RESUME (ms)')
print(teach.spread_table(rows, 'downtime_ms', by=('sweep', 'ram_mib', 'working_set_mib')))"""),
    ("code", """# the VM state each save wrote (MiB), per configuration: deterministic
sorted({(r['sweep'], r['ram_mib'], r['working_set_mib'], round(r['vmstate_mib'])) for r in rows})"""),
    ("md", """The VM state is the working set plus a few KiB of CPU and device state, whatever the RAM size: a 256 MiB guest with 32 MiB in use writes the same 32 MiB as a 64 MiB guest. Zero pages are not written; the stream records which pages are non-zero (a bitmap) and only those (docs/deviations.md entry 23). QEMU does not store zero pages either (shared/reference/qemu-7.2-qmp.md, performance section: "zero pages are not stored")."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# where the stopped time goes (ms): the zero scan reads all RAM, the writes only what is in use
for key in ('zero_scan_ms', 'write_ms', 'commit_ms'):
    print(key)
    print(teach.spread_table(rows, key, by=('sweep', 'ram_mib', 'working_set_mib')))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# each phase against what it reads or writes: least squares, ms per MiB
print(f"zero scan: {teach.slope(rows, 'ram_mib', 'zero_scan_ms'):.3f} ms per MiB of RAM")
print(f"writes:    {teach.slope(rows, 'vmstate_mib', 'write_ms'):.3f} ms per MiB in use")
print('whole stop, fitted against both:', {k: round(v, 3) for k, v in teach.per_mib_costs(rows).items()})"""),
    ("code", """def med(key, **where):
    return teach.group_median(rows, key, **where)
print('the zero scan grows with the RAM size (in use fixed):',
      med('zero_scan_ms', sweep='RAM size varies', ram_mib=max(SIZES)) > med('zero_scan_ms', sweep='RAM size varies', ram_mib=min(SIZES)))
print('the writes grow with the RAM in use (RAM size fixed):',
      med('write_ms', sweep='RAM in use varies', working_set_mib=max(IN_USE)) > med('write_ms', sweep='RAM in use varies', working_set_mib=min(IN_USE)))
print('every stop includes the zero scan, the writes and the commit:',
      all(r['downtime_internal_ms'] >= r['zero_scan_ms'] + r['write_ms'] for r in rows))"""),
    ("md", """**What happens, and why.** While the guest is stopped, the save reads every page of RAM once to find the zero ones (`zero_scan_ms`: it grows with the RAM size, but reading zeros is fast), then writes the non-zero pages into the image past the end of the virtual disk (`write_ms`: it grows with the RAM in use), then commits the qcow2 snapshot (`commit_ms`: small and constant). Both growths are checked above. Per MiB, a write costs more than a scan (the fitted slopes printed above: ms per MiB in use for the writes, per MiB of RAM for the scan), so the RAM in use sets most of the stop, and the RAM size adds its scan. A fit of the whole stop against both is printed too; on this shared two-core host its coefficients are noisy, which is why the phases are shown apart.

**The old version of this notebook** said "the stop grows with the RAM"; its table showed it shrinking from 128 to 256 MiB. Both were true to the RAM *in use*: it ran a throttled guest (100 MiB/s) for a fixed 0.3 s warm-up, so every size had a RAM in use of a few tens of MiB, set by warm-up time and rate rather than by the RAM size, and the differences between sizes were mostly noise. Exercise 2 measures that RAM in use."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
fig = teach.stop_figure(rows, qemu=teach.QEMU_RECORDED_SAVES)"""),
    ("md", """Left (linear scale from 0): with the RAM in use fixed, the medians move with the RAM size by about as much as their own spread (the bars); the one phase that grows steadily with the RAM size is the zero scan (its table above), while the writes are the same bytes at every size and differ only by noise on this shared two-core host (compare their IQRs). Right (log scales): with the RAM size fixed, the stop rises with what is written. QEMU 7.2's recorded blocking saves (grey, shared/reference/qemu-7.2-qmp.md: TCG, q35, OVMF idle, RAM filled with random bytes so that the RAM in use is 96-98 % of RAM, median of 3 runs on this host) lie on the right panel because the x axis is what both had to write.

**What QEMU does, and what snaplab does differently.** QEMU's `save_snapshot` stops the VM, writes the VM state through its migration stream, creates the snapshots, flushes the image, and only then resumes (migration/savevm.c; shared/reference/qemu-internals.md section 3.2). snaplab writes the same things with the guest stopped but resumes before the `fdatasync`, and concludes the job only after it (docs/deviations.md entry 24), so its stop holds no disk flush. The zero-page rule is the same. Not like with like, therefore: QEMU's grey points include a flush and an OVMF guest's device state; both sides save the same kind of content (non-zero pages)."""),
    ("md", """## Exercises: predict, then measure

1. **Twice the RAM in use.** With 256 MiB of RAM and 128 MiB in use (twice the largest above), predict the median stop from the table, then measure (3 repetitions).
2. **The old notebook's set-up.** A guest throttled to 100 MiB/s, working set half of RAM, saved after 0.3 s: predict the RAM in use at 64 MiB and at 512 MiB of RAM, then measure it (`vmstate_bytes`).
3. **A large, nearly empty guest.** 512 MiB of RAM with 16 MiB in use: which phase of the stop grows compared with 64 MiB of RAM and 16 MiB in use, and which stays?"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
from lab.run import run_experiment
from lab.spec import ExperimentSpec
ex1 = run_experiment(ExperimentSpec(ram_mib=256, engine=BLOCKING, working_set_mib=128, dirty_rate_mib_s=0,
                                    repetitions=3, seed=SEED))
print(teach.spread_table(ex1, 'downtime_ms', by=('ram_mib', 'working_set_mib')))"""),
    ("code", """ex2 = []
for mib in (64, 512):
    ex2 += run_experiment(ExperimentSpec(ram_mib=mib, engine=BLOCKING, dirty_rate_mib_s=100, warmup_s=0.3,
                                         repetitions=3, seed=SEED))
in_use = {mib: teach.group_median([{**r, 'mib': r['vmstate_bytes'] / 2**20} for r in ex2], 'mib', ram_mib=mib)
          for mib in (64, 512)}
print('RAM in use is under three quarters of RAM at both sizes:', all(v < 0.75 * mib for mib, v in in_use.items()))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
print({mib: round(v, 1) for mib, v in in_use.items()})
ex3 = []
for mib in (64, 512):
    ex3 += run_experiment(ExperimentSpec(ram_mib=mib, engine=BLOCKING, working_set_mib=16, dirty_rate_mib_s=0,
                                         repetitions=3, seed=SEED))
for key in ('zero_scan_ms', 'write_ms', 'downtime_ms'):
    print(key)
    print(teach.spread_table(ex3, key, by=('ram_mib', 'working_set_mib')))"""),
    ("md", """<details><summary>Worked solutions</summary>

1. The RAM size stays 256 MiB, so the scan stays; the writes double from the 64 MiB point (about twice its `write_ms`), so the stop grows by about one more `write_ms` of the 64 MiB point. The measurement is printed above, with its spread; on a shared 2-core host the IQR is wide, which is why the notebook shows five repetitions per point and not one.
2. The guest writes 100 MiB/s for 0.3 s plus the time to boot and start the first save: a few tens of MiB, and at most the working set (32 MiB at 64 MiB of RAM, 256 MiB at 512). So both sizes have a RAM in use far below their RAM size (printed above: a little more at 512 MiB, whose guest takes longer to boot and start), and the table's stop followed the RAM in use, not the RAM size.
3. The **zero scan** grows (it reads eight times as much RAM), the **writes** stay (the same 16 MiB in use); the stop grows only by the extra scan time.
</details>"""),
]
