"""Notebook 08-precopy: Pre-copy: rounds, dirty rate against write bandwidth, convergence"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 8. Pre-copy: rounds, dirty rate against write bandwidth, and why some guests never converge

**Learning goals.** After this notebook you can
1. describe a pre-copy save round by round: copy everything while the guest runs, then copy again what it dirtied meanwhile, until the rest is small enough to copy with the guest stopped;
2. predict the rounds from the guest's dirty rate `D`, its working set `S` and what a round costs (a fixed cost `c` per round, and a per-byte cost `1 / W` where the rounds show one), and check the prediction against measured rounds;
3. explain why a guest that dirties faster than a round can be written never converges, what decides the boundary (the cost of a round: two models of it, a fixed cost, and a fixed cost plus a per-byte cost, can predict different boundaries, and the measured saves decide between them), and what that costs in downtime.

**Prerequisites.** Notebooks 1 (the downtime: STOP to RESUME), 5 (the blocking save), 6 (userfaultfd) and 7 (copy-on-write); what a dirty page is. The engine needs Linux 6.7 or later (`UFFD_FEATURE_WP_ASYNC` and the `PAGEMAP_SCAN` ioctl).

**What to look at.** The dirty bytes of each round (measured squares beside the model's line), whether they shrink under the threshold, the final round (written with the guest stopped: the downtime is that round plus the CPU and device state and the snapshot's creation), and how the picture changes when `D` grows.

Lab functions used: `lab.precopy.precopy_rows`, `fit_rounds`, `first_round_s`, `model_rounds`."""),
    ("md", """## The mechanism, in QEMU and here

QEMU's live migration is pre-copy (`migration/ram.c`, `ram_save_iterate`): it sends all of RAM while the guest runs, with dirty logging on (KVM's dirty bitmap, or TCG's for an emulated guest), then the pages dirtied meanwhile, round after round, until what remains can be sent within `downtime-limit`; then it stops the guest and sends the rest. In QEMU 7.2's source: `migration_update_counters()` (`migration/migration.c`) sets `threshold_size = bandwidth * downtime_limit` from the bandwidth measured over the last period, `migration_iteration_run()` completes the migration once the pending bytes are below `threshold_size`, and `DEFAULT_MIGRATE_SET_DOWNTIME` is 300 (ms, same file; the parameter is `downtime-limit` in `qapi/migration.json`'s `MigrationParameters`, set with `migrate-set-parameters`). A guest that dirties faster than the link sends never gets there (one that dirties faster but only over a working set smaller than `bandwidth * downtime-limit` does: its pending bytes level off under the threshold); with the `auto-converge` capability (`qapi/migration.json`: "QEMU will automatically throttle down the guest to speed up convergence of RAM migration") `migration_trigger_throttle()` calls `mig_throttle_guest_down()` (`migration/ram.c`), which slows the vCPUs step by step.

QEMU 7.2's `savevm` does not use these rounds: it stops the guest first (`save_snapshot()` in migration/savevm.c: `vm_stop`, then the whole state; docs/reference/qemu-internals.md section 3.2). snaplab's `precopy` save engine applies them to an internal snapshot: dirty tracking by userfaultfd's asynchronous write protection (`UFFD_FEATURE_WP_ASYNC` + the `PAGEMAP_SCAN` ioctl: no fault reaches user space; `emulator/migration/precopy.py`), rounds written into the snapshot's VM-state area, and the stop when a round is at most a byte threshold or after a round limit (both in the job's stats). Unlike QEMU it has no bandwidth estimate or downtime limit, and no auto-converge.

The model (derivation in `lab/precopy.py`; in one line: a guest writing `D` bytes a second at random over `S` bytes of pages leaves a given page clean for a time `t` with probability `exp(-D * t / S)`, so `S * (1 - exp(-D * t / S))` bytes are dirty after `t`): a round of `B` dirty bytes lasts `c + B / W`, and the next round is the distinct pages dirtied meanwhile, `S * (1 - exp(-D * (c + B / W) / S))`. With `D < W` the rounds shrink geometrically towards a floor near `D * c / (1 - D / W)`; with `D >= W` they stop shrinking and level off at a large fraction of the working set `S`. The engine converges only if that floor is under its threshold, so a fixed cost `c` per round can stop convergence as surely as a bandwidth `W` below `D`.

Round 0 is the exception: it writes all of RAM in large sequential writes, allocating the VM-state area in the image as it goes (`emulator/migration/precopy.py`, `_write_all`), while the later rounds rewrite scattered pages in place; so the model takes round 0's duration as measured (`first_s`: the median over the saves). For the later rounds the notebook's model takes a constant cost per round: `c` is the median time of the rounds written while the guest ran (after round 0, before the stop's) of the slow guest (100 MiB/s) and of a guest dirtying 200 MiB/s measured for this (its rounds are like those near the boundary), plus the median time of the scan that finds their dirty pages (`PAGEMAP_SCAN`), and `W` is infinite (no per-byte term), because a round rewrites most of the working set whatever it holds (the MiB written, printed below). A line through the same rounds, time against dirty bytes fitted by Theil-Sen so that one slow round does not tilt it (`fit_rounds`), is printed beside it with its own boundary: exercise 2 measures which of the two the engine follows, where they differ. The stop's round is left out of both: it is written with the guest stopped, from what the last scan found plus what was left over, as many short writes, so its cost differs from a running round's (the lists printed below show by how much). The fast guest's rounds (1000 MiB/s, its section below) are left out too: that guest competes hardest with the save for the host's two CPUs, and its rounds lie far from the boundary; its section compares their time with `c`. Like the engine's stats, the model's last entry is the round the stop writes."""),
    ("code", """RAM_MIB, WS_MIB, SEED, REPS = 256, 64, 1, 3
from lab.precopy import precopy_rows, fit_rounds, first_round_s, model_rounds, convergence_limit
print(f'seed {SEED}: {RAM_MIB} MiB guest, the dirty workload over a {WS_MIB} MiB working set, {REPS} saves per rate')"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
import os
import numpy as np
slow = precopy_rows(RAM_MIB, 100, WS_MIB, seed=SEED, repetitions=REPS)     # D = 100 MiB/s
mid = precopy_rows(RAM_MIB, 200, WS_MIB, seed=SEED, repetitions=REPS + 1)  # D = 200 MiB/s: rounds for the fit
fast = precopy_rows(RAM_MIB, 1000, WS_MIB, seed=SEED, repetitions=REPS)    # D = 1000 MiB/s (its own section below)
THR, MAX_ROUNDS = slow[0]['details']['threshold_bytes'], slow[0]['details']['max_rounds']   # the engine's
def running_rounds(rows):       # rounds written with the guest running: not round 0, not the stop's
    return sum(len(r['rounds_mib']) - 2 for r in rows)
W, c = fit_rounds(slow + mid, per_byte=False)      # the model: a constant cost per round
W_line, c_line = fit_rounds(slow + mid)             # a line through the same rounds, for comparison
def mibs(x):                    # a boundary, or 'none' (no fit, or a fixed cost not above 0)
    return f'{x / 2**20:.0f} MiB/s' if np.isfinite(x) else 'none'
T0 = first_round_s(slow)
print(f'host: {os.cpu_count()} CPUs; the engine stops iterating once a round holds at most {THR / 2**20:.0f} MiB dirty, '
      f'or after {MAX_ROUNDS} rounds')
print(f'from the rounds written with the guest running ({running_rounds(slow)} of the 100 MiB/s guest, '
      f'{running_rounds(mid)} of the 200 MiB/s one): the model, c = {c * 1e3:.1f} ms per round (their median, '
      f'with the median dirty-page scan), W infinite; a line through them: c = {c_line * 1e3:.1f} ms, '
      + (f'W = {W_line / 2**20:.0f} MiB/s' if np.isfinite(W_line) else 'W infinite (no per-byte cost)'))
print(f'round 0 ({RAM_MIB} MiB), median over the 100 MiB/s saves: {T0 * 1e3:.0f} ms')
for r in slow:
    d = r['details']
    print('rounds (MiB dirty):', [round(x, 1) for x in r['rounds_mib']], ' written (MiB):', [round(x / 2**20, 1) for x in d['written_per_round']],
          ' writes:', d['writes_per_round'], ' ms:', [round(x * 1e3, 1) for x in d['round_s']], f" downtime {r['downtime_ms']:.1f} ms")
print(f"slowest round 0 / median round 0: {max(r['round0_s'] for r in slow) / T0:.1f}x")
LIMIT = convergence_limit(RAM_MIB * 2**20, W, c, WS_MIB * 2**20, THR, MAX_ROUNDS, first_s=T0)
LIMIT_LINE = convergence_limit(RAM_MIB * 2**20, W_line, c_line, WS_MIB * 2**20, THR, MAX_ROUNDS, first_s=T0)
print(f"the model stops converging (never a round under {THR / 2**20:.0f} MiB within {MAX_ROUNDS}) from D = {mibs(LIMIT)}; "
      f"with the line instead: " + (f"from {mibs(LIMIT_LINE)}" if np.isfinite(LIMIT_LINE) else "none (its fixed cost is not above 0)"))"""),
    ("md", """**What a round costs.** Each save's lines above give its rounds' dirty MiB, the MiB they wrote, the separate writes they made and their milliseconds. Three things stand out. Round 0 of three saves of the same guest and seed took the times printed (the first entry of each `ms` list; they can differ by a factor of two or more), and the slowest against the median is the ratio printed: round 1 is what the guest dirtied meanwhile, so a slow round 0 makes a bigger round 1. And a later round writes far more than its dirty bytes: the engine writes each run of dirty pages together with up to 16 clean pages between two dirty ones (`GAP_PAGES` in `emulator/migration/precopy.py`: one write instead of two), and pages dirtied at random over a 64 MiB working set leave few gaps longer than that, so a round of a few MiB dirty rewrites tens of MiB. And a round's time depends on its number of separate writes, not only on its MiB: compare the stop's round (each save's last entry: the last few MiB the guest dirtied, scattered, so hundreds of short writes, four at a time: `WRITE_THREADS`) with a round written while the guest ran (more MiB, in fewer and longer writes). Not every pair of rounds shows it: a single round's time also varies with the host from one moment to the next, so compare medians over several saves, not two rounds. The model's `c` (printed) is the median cost of a running round whatever it holds; single rounds vary widely around it (exercise 2 prints each save's average). A line through the same rounds may find a per-byte cost too, and then a smaller fixed cost (or even one below zero: a line through a handful of rounds of similar sizes is fragile). If it does, the two predict different boundaries (the last line), and exercise 2's saves on both sides show which held; if it finds none (`W` infinite), the two coincide."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
import matplotlib.pyplot as plt
def model_for(rows, d_mib_s, first_s=None):
    return model_rounds(RAM_MIB * 2**20, W, c, d_mib_s * 2**20, WS_MIB * 2**20, THR, MAX_ROUNDS,
                        first_s=first_round_s(rows) if first_s is None else first_s)
def converged(rows):            # saves that reached the threshold before the round limit
    return sum(r['iterations'] < MAX_ROUNDS + 2 for r in rows)       # (round 0, the iterative rounds, the stop's)
def show(rows, d_mib_s, ax):
    model = model_for(rows, d_mib_s)
    for i, r in enumerate(rows):  # one marker per round and save, offset by save; the stop's round hollow
        x = [k + 0.12 * i - 0.12 for k in range(len(r['rounds_mib']))]
        ax.plot(x[:-1], r['rounds_mib'][:-1], 's', color='0.45', ms=5,
                label=f'measured round, guest running ({len(rows)} saves, side by side)' if i == 0 else None)
        ax.plot(x[-1:], r['rounds_mib'][-1:], 's', mfc='white', mec='black', ms=7, label="measured, the stop's round" if i == 0 else None)
    w_txt = f'W={W / 2**20:.0f} MiB/s' if np.isfinite(W) else 'W infinite'
    ax.plot(range(len(model)), [m / 2**20 for m in model], 'k--o', mfc='none',
            label=f'model: D={d_mib_s} MiB/s, {w_txt}, c={c * 1e3:.0f} ms, round 0 {first_round_s(rows) * 1e3:.0f} ms (median)')
    ax.axhline(THR / 2**20, color='0.4', lw=0.8, ls=':', label=f'threshold ({THR / 2**20:.0f} MiB)')
    ax.set_yscale('log'); ax.set_xlabel('round (0: all of RAM; the last: with the guest stopped)'); ax.set_ylabel('dirty MiB in the round (log)')
    ax.set_xticks(range(max(len(model), *(len(r['rounds_mib']) for r in rows))))
    ax.set_title(f'D = {d_mib_s} MiB/s over a {WS_MIB} MiB working set, {RAM_MIB} MiB of RAM, seed {SEED}: '
                 f'{converged(rows)} of {len(rows)} saves converged', fontsize=10)
    ax.legend(fontsize=8, loc='upper right')
fig, ax = plt.subplots(figsize=(8, 4))
show(slow, 100, ax)"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# each save beside the model run from that save's own round 0 (rounds 1.., MiB)
for r in slow:
    own = model_for(slow, 100, first_s=r['round0_s'])
    print(f"save {r['rep']}: measured {[round(x, 1) for x in r['rounds_mib'][1:]]}   model {[round(x / 2**20, 1) for x in own[1:]]}")"""),
    ("md", """What to see: round 1 holds what the guest dirtied during round 0, about `D` times round 0's duration (capped by the working set), so a save whose round 0 was slow has a bigger round 1, and may need one round more; the model fed with each save's own round 0 is printed beside it. From round 1 on, each round is the pages dirtied while the previous one was written, `D * (c + B / W)`: with the per-round cost `c` fitted above, that is about `D * c` whatever the round held, the floor. At 100 MiB/s the floor is a few MiB, under the threshold, so the save converges within a round or two, and the stop writes that last small round. That last round can hold a little more than the threshold, though the save "reached" it: the engine decides on the dirty bytes its scan found with the guest still running (`iterate` in emulator/migration/precopy.py; that scan's size is not in the rows), and the stop's round is that scan plus what the guest dirtied until the stop (`final`). The downtime (STOP to RESUME, as in notebook 1) is that round plus the CPU and device state and the snapshot's creation: compare each save's downtime with its last round's milliseconds in the lines printed above. The fit comes from a handful of rounds of two guests: read the model against the measured rounds in the printed lines rather than as a law; a few MiB more or less of the guest's writes, or a round that happened to be slow, show at these sizes."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# the 1000 MiB/s guest, measured in the first cell
def rate_during_rounds(r):      # MiB/s the guest stamped from the end of round 0 to the stop (one iteration = one 4 KiB page)
    t, it = np.array(r['details']['timeline']).T
    t0, t1 = r['round0_s'], (r['details']['stopped'] or (r['details']['job_s'],))[0]
    return float(np.diff(np.interp([t0, t1], t, it))[0]) * 4096 / 2**20 / (t1 - t0)
fig, ax = plt.subplots(figsize=(8, 4))
show(fast, 1000, ax)
for r in fast:
    print('rounds (MiB):', [round(x, 1) for x in r['rounds_mib']], f"  downtime {r['downtime_ms']:.1f} ms; "
          f"the guest's rate during rounds 1..: {rate_during_rounds(r):.0f} MiB/s")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
limit = MAX_ROUNDS + 2      # round 0, the iterative rounds, the final one
print('the fast guest ran every save to the round limit:', all(r['iterations'] == limit for r in fast))
print("the fast guest's final round is more than twice the slow guest's:",
      np.median([r['rounds_mib'][-1] for r in fast]) > 2 * np.median([r['rounds_mib'][-1] for r in slow]))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
for name, rows in (('100 MiB/s', slow), ('1000 MiB/s', fast)):
    print(f"{name}: final round median {np.median([r['rounds_mib'][-1] for r in rows]):.1f} MiB dirty, "
          f"{np.median([r['details']['written_per_round'][-1] for r in rows]) / 2**20:.1f} MiB written "
          f"({np.median([r['details']['written_per_round'][-1] / r['details']['bytes_per_round'][-1] for r in rows]):.1f} per MiB dirty) in "
          f"{np.median([r['details']['round_s'][-1] for r in rows]) * 1e3:.1f} ms "
          f"({np.median([r['details']['writes_per_round'][-1] for r in rows]):.0f} writes); "
          f"downtime median {np.median([r['downtime_ms'] for r in rows]):.1f} ms "
          f"(min-max {min(r['downtime_ms'] for r in rows):.1f}-{max(r['downtime_ms'] for r in rows):.1f})")
t_run = np.median([t for r in fast for t in r['details']['round_s'][1:-1]])   # the fast guest's running rounds, s
d_run = np.median([rate_during_rounds(r) for r in fast])                       # its rate during them, MiB/s
print(f"model's level at 1000 MiB/s: {model_for(fast, 1000)[-1] / 2**20:.1f} MiB (a round of c = {c * 1e3:.0f} ms); measured median "
      f"of the last rounds: {np.median([r['rounds_mib'][-1] for r in fast]):.1f} MiB; the fast guest's running rounds took "
      f"{t_run * 1e3:.0f} ms (median), at {d_run:.0f} MiB/s (median guest rate)")
print(f"the model's level with that round time and rate, S * (1 - exp(-D * t / S)): "
      f"{WS_MIB * (1 - np.exp(-d_run * t_run / WS_MIB)):.1f} MiB; measured median of the running rounds after round 1: "
      f"{np.median([x for r in fast for x in r['rounds_mib'][2:-1]]):.1f} MiB")"""),
    ("md", """(The guest's rate during the rounds comes from the lab port, an I/O port through which the guest reports its iteration count, stamped by the host's clock; one iteration of the dirty workload stamps one 4 KiB page. Each figure's model starts from that guest's own median round 0.)

At 1000 MiB/s, above the model's boundary, the rounds stop shrinking and level off above the threshold: the engine gives up after its round limit, and the stop writes the last level, more than twice the slow guest's last round (the lines printed above check both on your run). They also put the model's level beside the measured one. The model's level is the distinct pages the guest dirties in one round's time, `S * (1 - exp(-D * c / S))` (plus a per-byte term where `W` is finite), with the nominal `D` = 1000 MiB/s: so a gap between the two levels can come from a round's real time differing from `c` (the fast guest's running rounds' median time is printed) or from the guest not keeping its nominal rate while the save competes with it for the host's CPUs (its rate during the rounds is printed, per save above and as a median). The last printed line puts both measured figures into the same formula and sets the result beside the measured running rounds: read the figure too. If the figure shows the rounds holding a plateau near that value for several rounds and then falling lower for the last few (to the last rounds' level printed above), as they did when this was written, the model has no term for that late fall: a guest whose random writes keep hitting pages already dirtied in the same round would give one, and so would rounds that sped up; the recorded rounds do not say which.

**The longer last round, the shorter stop?** Compare the two downtimes printed above: the fast guest's stop can be the *shorter*, though its last round holds more dirty bytes. The MiB written and the milliseconds beside them say why: a guest dirtying 1000 MiB/s covers its working set densely, so its last round goes out as a few long runs, while the slow guest's few MiB are scattered, many short runs with clean gaps, so more writes for fewer dirty bytes (the MiB written per MiB dirty of each last round and its writes, printed for both). A round's time depends on its writes, not only on its dirty bytes: the reason the model takes a constant cost per round rather than a cost per dirty byte. QEMU would keep iterating until its downtime limit is met unless auto-converge slows the guest down; snaplab's copy-on-write engine avoids the question altogether: it freezes RAM in one instant with write protection and saves each 2 MiB chunk of RAM (the unit it write-protects and copies) before the guest's first write to it, so its stop does not depend on `D` (notebook 7)."""),
    ("md", """## Exercises: predict, then measure

1. **Three times the dirty rate.** With `D = 300 MiB/s`, predict from the fitted `c` and the model's boundary `LIMIT` (printed above) how many rounds run and how big the last one is; then compare `model_for(ex1, 300)` with the measured `precopy_rows(RAM_MIB, 300, WS_MIB)` (the cell below runs both).
2. **Where does it stop converging?** From the model, at which dirty rate do the rounds stop reaching the threshold? (The measuring cell, the second code cell, printed it: `LIMIT`.) To check it, measure one rate below and one above it with `precopy_rows`, and the guest's own dirty rate during the save (pages stamped per second, from the lab port) to see whether it kept its nominal rate. The cell below does it at half and at twice `LIMIT` (two saves each), and closer in, at 0.8 and 1.25 times `LIMIT` (one save each: how sharp is the boundary?), and computes the guest's rate during each save's rounds from the lab-port samples the row keeps. The lab port is an I/O port through which the guest reports its iteration count; the host stamps each report with its clock. `details['timeline']` holds (seconds after the command, iterations) pairs, and one iteration of the dirty workload stamps one 4 KiB page; `details['stopped']` holds the STOP and RESUME times, seconds after the command. Its last line sets every rate measured in this notebook beside `LIMIT`.
3. **A fixed cost per round** (a model exercise: the engine's per-round cost is not a setting, so there is nothing to measure). Suppose a round cost `c = 50 ms` (a dirty bitmap walked page by page in Python would). Predict the floor for `D = 100` and `150 MiB/s`, and whether each still reaches the 8 MiB threshold, and the boundary; the cell below computes them with `model_rounds(..., round_cost_s=0.05, ...)` and `convergence_limit`, without a per-byte term (`W` infinite).
4. **QEMU's rule on this host.** QEMU stops iterating when the pending bytes fit in `bandwidth * downtime_limit` (300 ms by default), with the bandwidth its migration stream reaches. QEMU 7.2's recorded background snapshots of a 256 MiB guest (docs/reference/qemu-7.2-qmp.md, "Background snapshot": a stream into `exec:cat`, not a pre-copy migration, but the same stream code) reported `ram.mbps` 1972-2102 Mbit/s in `query-migrate`, which `migration_update_counters()` computes from the same bytes and time as `threshold_size`; over the whole operation, file bytes over setup-to-completed time, they streamed 176-241 MB/s. Predict QEMU's threshold from that, whether the 1000 MiB/s guest would converge under QEMU's rule (compare the threshold with the guest's working set: pending bytes cannot exceed it), and how long QEMU's final stop would then last. The last cell computes it, and, for comparison, the threshold with the rate at which snaplab wrote the fast guest's rounds (MiB written over their time: a write into the image, clean gaps included, not a stream)."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
ex1 = precopy_rows(RAM_MIB, 300, WS_MIB, seed=SEED, repetitions=REPS)     # exercise 1: D = 300 MiB/s
m300 = model_for(ex1, 300)
print(f'D * c = {300 * c:.1f} MiB: the floor (the working set caps the rounds of the model below it), the model limit {LIMIT / 2**20:.0f} MiB/s')
print(f'model (W and c fitted above, round 0 {first_round_s(ex1) * 1e3:.0f} ms): {len(m300)} entries, last {m300[-1] / 2**20:.1f} MiB,',
      [round(x / 2**20, 1) for x in m300])
for r in ex1:
    print(f"measured: {r['iterations']} entries, last {r['rounds_mib'][-1]:.1f} MiB,", [round(x, 1) for x in r['rounds_mib']],
          f"round 0 {r['round0_s'] * 1e3:.0f} ms")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 2: dirty rates below the model's limit (LIMIT) and above it: two saves at 0.5x and 2x, one at 0.8x and 1.25x
seen = {100: slow, 200: mid, 300: ex1, 1000: fast}     # rate (MiB/s) -> saves
for k, n in (((0.5, 2), (0.8, 1), (1.25, 1), (2.0, 2)) if np.isfinite(LIMIT) else ()):  # (no limit: nothing to bracket)
    d = int(k * LIMIT / 2**20)
    print(f"D = {d} MiB/s (D / limit = {d * 2**20 / LIMIT:.2f}): model {[round(x / 2**20, 1) for x in model_for(slow, d)]}")
    seen[d] = precopy_rows(RAM_MIB, d, WS_MIB, seed=SEED, repetitions=n)
    for r in seen[d]:
        print(f"   measured {[round(x, 1) for x in r['rounds_mib']]}  reached the threshold: {r['iterations'] < limit}\\n"
              f"      the guest's rate during rounds 1..: {rate_during_rounds(r):.0f} MiB/s")
        d_, w_, t_ = (sum(r['details'][k][1:-1]) for k in ('bytes_per_round', 'written_per_round', 'round_s'))
        if t_ > 0:
            print(f"      rounds 1..: {d_ / 2**20:.1f} MiB dirty, {w_ / 2**20:.1f} MiB written (clean gaps included) in {t_ * 1e3:.0f} ms, "
                  f"{len(r['details']['round_s']) - 2} rounds: {t_ * 1e3 / max(1, len(r['details']['round_s']) - 2):.0f} ms per round")
print(f"the model's boundary {mibs(LIMIT)} (the line's: {mibs(LIMIT_LINE)}); saves that converged, per rate (MiB/s): "
      + ', '.join(f'{d}: {converged(rows)} of {len(rows)}' for d, rows in sorted(seen.items())))
ok = [d for d, rows in seen.items() if converged(rows) == len(rows)]      # every save converged
no = [d for d, rows in seen.items() if converged(rows) == 0]              # none did
lo, hi = max(ok, default=0), min((d for d in no if d > max(ok, default=0)), default=float('inf'))
def side(x):                    # where a predicted boundary lies against the measured bracket
    x = x / 2**20
    return 'inside it' if lo <= x <= hi else ('below it' if x < lo else 'above it') if np.isfinite(x) else 'none predicted'
print(f"measured: every save converged up to {lo} MiB/s, none from {hi} MiB/s; the model's boundary ({mibs(LIMIT)}) lies "
      f"{side(LIMIT)}, the line's ({mibs(LIMIT_LINE)}) {side(LIMIT_LINE)}")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 3: the model with c = 50 ms per round (W infinite, as the model's)
for d in (100, 150):
    ratio = d * 2**20 / W
    floor = d * 2**20 * 0.05 / (1 - ratio) if ratio < 1 else float('inf')
    m = model_rounds(RAM_MIB * 2**20, W, 0.05, d * 2**20, WS_MIB * 2**20, THR, MAX_ROUNDS, first_s=T0)
    print(f'D = {d} MiB/s: floor {floor / 2**20:.1f} MiB, model: round 1 (dirtied during round 0, '
          f'{T0 * 1e3:.0f} ms) {m[1] / 2**20:.1f} MiB, {len(m) - 2} iterative rounds, the stop writes {m[-1] / 2**20:.1f} MiB, '
          + (f'{(THR - m[-1]) / 2**20:.2f} MiB under the threshold' if m[-1] <= THR else 'never under the threshold'))
print(f"with c = 50 ms the model's boundary is {convergence_limit(RAM_MIB * 2**20, W, 0.05, WS_MIB * 2**20, THR, MAX_ROUNDS, first_s=T0) / 2**20:.0f} MiB/s")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 4: QEMU's threshold, bandwidth x downtime-limit (300 ms), with QEMU 7.2's recorded bandwidths (256 MiB guest)
for what, qemu_mbs in (('ram.mbps 1972 Mbit/s', 1972 / 8), ('ram.mbps 2102 Mbit/s', 2102 / 8),
                       ('file bytes / whole operation, lowest', 176)):   # MB/s (1e6 bytes)
    thr = qemu_mbs * 1e6 * 0.3
    print(f'{what}:', end=' ')
    print(f"QEMU streaming at {qemu_mbs:.0f} MB/s: threshold {thr / 2**20:.0f} MiB against the working set's {WS_MIB} MiB; "
          f"converges: {'yes, whatever the rate' if thr >= WS_MIB * 2**20 else 'only if its pending bytes drop under it'}; a final stop sending up to {min(thr, WS_MIB * 2**20) / 2**20:.0f} MiB "
          f"takes up to {min(thr, WS_MIB * 2**20) / (qemu_mbs * 1e6) * 1e3:.0f} ms")
bw = np.median([sum(r['details']['written_per_round'][1:]) / sum(r['details']['round_s'][1:]) for r in fast])
print(f"snaplab wrote the fast guest's rounds at {bw / 2**20:.0f} MiB/s (median): the same rule would give {bw * 0.3 / 2**20:.0f} MiB; "
      f"the fast guest's level {np.median([r['rounds_mib'][-1] for r in fast]):.1f} MiB")"""),
    ("md", """<details><summary>Worked solutions (open after predicting)</summary>

1. With the fitted per-round cost `c`, every round after the first holds about what the guest dirties in `c`, `D * c`, capped by the working set (the model's round is `S * (1 - exp(-D * c / S))`), whatever the round before it held. At 300 MiB/s that is three times the 100 MiB/s guest's: whether it is under the threshold decides everything, and `LIMIT` says on which side 300 MiB/s lies. Below the limit, the model converges after round 1 or 2; above it, it runs all the rounds and the stop writes its level. Round 1 is again about `D` times round 0's duration (capped), so a save whose round 0 was slow has a bigger round 1: compare each measured save's round-0 time with the model's. A measured save also leaves the model's line when one of its rounds was slower or faster than `c`, or when the guest did not keep its nominal 300 MiB/s while competing with the save for the host's CPUs (exercise 2 measures that). The model gives the shape (converging or levelling off, and at about which size), not each save's bytes; one round more or less is within what a slow round 0 explains.
2. The boundary is the model's `LIMIT`: where a round's new dirty bytes stop getting under the threshold. With `W` infinite the model's round is `S * (1 - exp(-D * c / S))`, so `LIMIT = -S * ln(1 - threshold / S) / c`, above `threshold / c` because the working set caps each round; with a finite `W` each round's bytes lengthen the next one, which lowers it. The cell measured rates on both sides and its last line lists, per rate, how many saves converged, beside both boundaries: the constant-cost model's and the line's. Where the line found a per-byte cost, its small fixed cost undervalues the rounds near the threshold, a few MiB dirty but scattered, written as many short writes, so its boundary can lie too high: the measured saves say which boundary held on your run (the cell's last line names the bracket the saves put the boundary in, and on which side of it each prediction lies) (the constant cost treats those rounds like the others, which also rewrite most of the working set). Where a rate below `LIMIT` failed, or one above it converged, the model's inputs were off for those saves, and the lines above each say which: the guest's rate during the rounds against the nominal `D` (a guest that could not keep its rate dirties less, and converges more easily), and the rounds' milliseconds against `c` (rounds faster than `c` move the real boundary up, in proportion: a boundary at `c` = 30 ms sits at two thirds of one at 20 ms). Close to the boundary (0.8x and 1.25x) the model's rounds shrink slowly or level off just above the threshold, so a single slow round can tip a measured save either way: the boundary is a band, as wide as the spread of the per-round cost, not a line. The MiB written beside the MiB dirty show the clean gaps written through: each running round rewrites most of the 64 MiB working set whatever it held dirty, hence a constant cost per round. An average hides which round was slow: what decides the stop is the round before it, so a save can converge with an average well above `c` if its last running round was short.
3. The floor is `D * c / (1 - D / W)` with `c = 0.05 s`; with `W` infinite, as here, it is simply `D * c`: 5 MiB at 100 MiB/s and 7.5 MiB at 150. But the floor is where the rounds would settle, not what the stop writes. Round 1 is what the guest dirtied during round 0 (about `D` times round 0's duration, capped by the working set; printed for both rates), and it decides the first step. Where it is under 8 MiB, the model converges at once and the stop writes round 1: the floor is never reached. Where it is over, one iterative round runs, and the next dirty set is `S * (1 - exp(-D * c / S))`, below the floor `D * c` because the working set caps it, and under the threshold by the margin printed (or not: then the rounds level off there). The boundary with `c = 50 ms` is printed too (about 171 MiB/s with `W` infinite: `-S * ln(1 - 8/64) / 0.05`). So a per-round cost of tens of milliseconds moves the boundary down to rates a guest easily dirties: it is why snaplab finds dirty pages with one ioctl (`PAGEMAP_SCAN`), and why the writes of a round, which make its real per-round cost tens of milliseconds anyway, are what sets its boundary on this host.
4. QEMU's threshold is its bandwidth times 300 ms. With its own estimate (`ram.mbps`, 1972-2102 Mbit/s, 246-263 MB/s) that is 71-75 MiB, more than the 64 MiB working set: the guest's pending bytes can never exceed the working set, so QEMU's rule is met at any dirty rate, and QEMU stops after the first round that fits and sends the rest inside the stop, up to the whole working set at its stream rate: a stop of up to about a quarter of a second (printed), not the tens of ms of snaplab's stop. With the lowest whole-operation rate (176 MB/s) the threshold, 50 MiB, is under the working set, and a guest that keeps most of its working set dirty would keep QEMU iterating (unless auto-converge throttles it): the 1000 MiB/s guest dirties nearly all of its 64 MiB within one such round, so under that rate it would not converge. QEMU accepts that longer stop (up to its 300 ms limit) where snaplab's fixed 8 MiB threshold insists on small rounds; snaplab's own write rate into the image (the last line) would give QEMU's rule a threshold larger than the working set, but that rate is not a migration stream's. Which is better depends on the downtime one wants; QEMU's auto-converge, which throttles the guest, is for guests that outrun even that threshold (in migration, where the link is usually far slower than this disk).
</details>"""),
]
