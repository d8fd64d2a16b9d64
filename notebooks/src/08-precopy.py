"""Notebook 08-precopy: Pre-copy: rounds, dirty rate against write bandwidth, convergence"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 8. Pre-copy: rounds, dirty rate against write bandwidth, and why some guests never converge

**Learning goals.** After this notebook you can
1. describe a pre-copy save round by round: copy everything while the guest runs, then copy again what it dirtied meanwhile, until the rest is small enough to copy with the guest stopped;
2. predict the rounds from three numbers (the guest's dirty rate `D`, the write bandwidth `W`, a fixed cost `c` per round) and the working set `S`, and check the prediction against measured rounds;
3. explain why a guest that dirties faster than a round can be written never converges, what decides the boundary here (a fixed cost per round, not the bandwidth), and what that costs in downtime.

**Prerequisites.** Notebooks 5 (the blocking save), 6 (userfaultfd) and 7 (copy-on-write); what a dirty page is.

**What to look at.** The bytes of each round (measured bars beside the model's line), whether they shrink under the threshold, the final round (written with the guest stopped: the downtime), and how the picture changes when `D` grows.

Lab functions used: `lab.precopy.precopy_rows`, `fit_rounds`, `first_round_s`, `model_rounds`."""),
    ("md", """## The mechanism, in QEMU and here

QEMU's live migration is pre-copy (`migration/ram.c`, `ram_save_iterate`): it sends all of RAM while the guest runs, with dirty logging on (KVM's dirty bitmap, or TCG's for an emulated guest), then the pages dirtied meanwhile, round after round, until what remains can be sent within `downtime-limit`; then it stops the guest and sends the rest. In QEMU 7.2's source: `migration_update_counters()` (`migration/migration.c`) sets `threshold_size = bandwidth * downtime_limit` from the bandwidth measured over the last period, `migration_iteration_run()` completes the migration once the pending bytes are below `threshold_size`, and `DEFAULT_MIGRATE_SET_DOWNTIME` is 300 (ms, same file; the parameter is `downtime-limit` in `qapi/migration.json`'s `MigrationParameters`, set with `migrate-set-parameters`). A guest that dirties faster than the link sends never gets there (one that dirties faster but only over a working set smaller than `bandwidth * downtime-limit` does: its pending bytes level off under the threshold); with the `auto-converge` capability (`qapi/migration.json`: "QEMU will automatically throttle down the guest to speed up convergence of RAM migration") `migration_trigger_throttle()` calls `mig_throttle_guest_down()` (`migration/ram.c`), which slows the vCPUs step by step.

QEMU 7.2's `savevm` does not use these rounds: it stops the guest first. snaplab's `precopy` save engine applies them to an internal snapshot: dirty tracking by userfaultfd's asynchronous write protection (`UFFD_FEATURE_WP_ASYNC` + the `PAGEMAP_SCAN` ioctl: no fault reaches user space; `emulator/migration/precopy.py`), rounds written into the snapshot's VM-state area, and the stop when a round is at most a byte threshold or after a round limit (both in the job's stats). Unlike QEMU it has no bandwidth estimate or downtime limit, and no auto-converge.

The model (derivation in `lab/precopy.py`): a round of `B` dirty bytes lasts `c + B / W`, and the next round is the distinct pages dirtied meanwhile, `S * (1 - exp(-D * (c + B / W) / S))`. With `D < W` the rounds shrink geometrically towards a floor near `D * c / (1 - D / W)`; with `D >= W` they stop shrinking and level off at a large fraction of the working set `S`. The engine converges only if that floor is under its threshold, so a fixed cost `c` per round can stop convergence as surely as a bandwidth `W` below `D`.

Round 0 is the exception: it writes all of RAM in large sequential writes, allocating the VM-state area in the image as it goes (`emulator/migration/precopy.py`, `_write_all`), while the later rounds rewrite scattered pages in place; so the model takes round 0's duration as measured (`first_s`: the median over the saves). `W` and `c` are fitted as a line through every later round of every save, the stop's round included: time against dirty bytes, by Theil-Sen, so one slow round does not tilt it (`fit_rounds`). Like the engine's stats, the model's last entry is the round the stop writes."""),
    ("code", """QUICK = True
RAM_MIB, WS_MIB, SEED, REPS = 256, 64, 1, 3
from lab.precopy import precopy_rows, fit_rounds, first_round_s, model_rounds
print(f'seed {SEED}: {RAM_MIB} MiB guest, the dirty workload over a {WS_MIB} MiB working set, {REPS} saves per rate')"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
import numpy as np
slow = precopy_rows(RAM_MIB, 100, WS_MIB, seed=SEED, repetitions=REPS)     # D = 100 MiB/s
from lab.precopy import convergence_limit
W, c = fit_rounds(slow)
T0 = first_round_s(slow)
npts = sum(len(r['rounds_mib']) - 1 for r in slow)
print(f'fitted from the {npts} rounds after round 0: ' + (f'W = {W / 2**20:.0f} MiB/s' if np.isfinite(W) else
      'W infinite (the rounds took no longer the more dirty bytes they held)') + f', c = {c * 1e3:.1f} ms per round')
print(f'round 0 ({RAM_MIB} MiB), median over saves: {T0 * 1e3:.0f} ms')
for r in slow:
    d = r['details']
    print('rounds (MiB dirty):', [round(x, 1) for x in r['rounds_mib']], ' written (MiB):', [round(x / 2**20, 1) for x in d['written_per_round']],
          ' ms:', [round(x * 1e3, 1) for x in d['round_s']], f" downtime {r['downtime_ms']:.1f} ms")
print(f"slowest round 0 / median round 0: {max(r['round0_s'] for r in slow) / T0:.1f}x")
LIMIT = convergence_limit(RAM_MIB * 2**20, W, c, WS_MIB * 2**20, 8 * 2**20, 10, first_s=T0)
print(f"the model stops converging (never a round under 8 MiB within 10) from D = {LIMIT / 2**20:.0f} MiB/s")"""),
    ("md", """**What a round costs.** Each save's lines above give its rounds' dirty MiB, the MiB they wrote and their milliseconds. Two things stand out. Round 0 of the same save, same guest and seed, took the times printed (tens of ms to about a tenth of a second at 256 MiB on this 2-core host), and its slowest repetition against the median is the ratio printed: round 1 is what the guest dirtied meanwhile, so a slow round 0 makes a bigger round 1. And a later round writes far more than its dirty bytes: the engine writes each run of dirty pages together with up to 16 clean pages between two dirty ones (`GAP_PAGES` in `emulator/migration/precopy.py`: one write instead of two), and pages dirtied at random over a 64 MiB working set leave few gaps longer than that, so a round of a few MiB dirty rewrites tens of MiB. Its time then depends little on its dirty bytes. The fit (first line) gives `c`, tens of milliseconds, what a round costs here whatever it holds, and a `W` that rests on a handful of rounds of a few MiB each, mostly on whichever of them was largest (when the rounds' times do not rise with their bytes, `W` comes out infinite): read `W` as a rough number. A round's time follows the MiB it *writes*, clean gaps included, more than its dirty MiB (compare the two lists of each save). The last line is the model's boundary with these two numbers."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
import matplotlib.pyplot as plt
def model_for(rows, d_mib_s, first_s=None):
    return model_rounds(RAM_MIB * 2**20, W, c, d_mib_s * 2**20, WS_MIB * 2**20, 8 * 2**20, 10,
                        first_s=first_round_s(rows) if first_s is None else first_s)
def show(rows, d_mib_s, ax, title):
    model = model_for(rows, d_mib_s)
    for i, r in enumerate(rows):  # one marker per round and save; the stop's round hollow
        x = [k + 0.12 * i - 0.12 for k in range(len(r['rounds_mib']))]
        ax.plot(x[:-1], r['rounds_mib'][:-1], 's', color='0.45', ms=5, label='measured round, guest running' if i == 0 else None)
        ax.plot(x[-1:], r['rounds_mib'][-1:], 's', mfc='white', mec='black', ms=7, label="measured, the stop's round" if i == 0 else None)
    w_txt = f'W={W / 2**20:.0f} MiB/s' if np.isfinite(W) else 'W infinite'
    ax.plot(range(len(model)), [m / 2**20 for m in model], 'k--o', mfc='none',
            label=f'model: D={d_mib_s} MiB/s, {w_txt}, c={c * 1e3:.0f} ms, round 0 {first_round_s(rows) * 1e3:.0f} ms (median)')
    ax.axhline(8, color='0.4', lw=0.8, ls=':', label='threshold (8 MiB)')
    ax.set_yscale('log'); ax.set_xlabel('round (0: all of RAM; the last: with the guest stopped)'); ax.set_ylabel('MiB dirty, saved in the round')
    ax.set_xticks(range(max(len(model), *(len(r['rounds_mib']) for r in rows))))
    ax.set_title(title, fontsize=10); ax.legend(fontsize=8, loc='upper right')
fig, ax = plt.subplots(figsize=(8, 4))
show(slow, 100, ax, f'D = 100 MiB/s over {WS_MIB} MiB, {RAM_MIB} MiB of RAM, {REPS} saves: converging')"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# each save beside the model run from that save's own round 0 (rounds 1.., MiB)
for r in slow:
    own = model_for(slow, 100, first_s=r['round0_s'])
    print(f"save {r['rep']}: measured {[round(x, 1) for x in r['rounds_mib'][1:]]}   model {[round(x / 2**20, 1) for x in own[1:]]}")"""),
    ("md", """What to see: round 1 holds what the guest dirtied during round 0, about `D` times round 0's duration (capped by the working set), so a save whose round 0 was slow has a bigger round 1, and may need one round more; the model fed with each save's own round 0 is printed beside it. From round 1 on, each round is the pages dirtied while the previous one was written, `D * (c + B / W)`: with the per-round cost `c` fitted above, that is about `D * c` whatever the round held, the floor. At 100 MiB/s the floor is a few MiB, under the threshold, so the save converges within a round or two, and the stop writes that last small round: the downtime. The fit comes from a handful of rounds of a few saves, in a narrow range of sizes: read the model against the measured rounds in the printed lines rather than as a law; a few 2 MiB chunks more or less of the guest's writes, or a round that happened to be slow, show at these sizes."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
fast = precopy_rows(RAM_MIB, 1000, WS_MIB, seed=SEED, repetitions=REPS)     # D = 1000 MiB/s
fig, ax = plt.subplots(figsize=(8, 4))
ran_out = [r['iterations'] == r['details']['max_rounds'] + 2 for r in fast]   # round 0, the iterative rounds, the final one
show(fast, 1000, ax, f"D = 1000 MiB/s over {WS_MIB} MiB: " + ('no save converged' if all(ran_out) else
                                                               f'{len(fast) - sum(ran_out)} of {len(fast)} saves converged'))
for r in fast:
    print('rounds (MiB):', [round(x, 1) for x in r['rounds_mib']], f"  downtime {r['downtime_ms']:.1f} ms")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# Timing claims (a burst of host load during one round can let a save converge): the test run
# does not compare these lines; read them on your run
limit = fast[0]['details']['max_rounds'] + 2      # round 0, the iterative rounds, the final one
print('the fast guest ran every save to the round limit:', all(r['iterations'] == limit for r in fast))
print("the fast guest's final round is more than twice the slow guest's:",
      np.median([r['rounds_mib'][-1] for r in fast]) > 2 * np.median([r['rounds_mib'][-1] for r in slow]))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
for name, rows in (('100 MiB/s', slow), ('1000 MiB/s', fast)):
    print(f"{name}: final round median {np.median([r['rounds_mib'][-1] for r in rows]):.1f} MiB dirty, "
          f"{np.median([r['details']['written_per_round'][-1] for r in rows]) / 2**20:.1f} MiB written "
          f"({np.median([r['details']['written_per_round'][-1] / r['details']['bytes_per_round'][-1] for r in rows]):.1f} per MiB dirty) in "
          f"{np.median([r['details']['round_s'][-1] for r in rows]) * 1e3:.1f} ms; "
          f"downtime median {np.median([r['downtime_ms'] for r in rows]):.1f} ms "
          f"(min-max {min(r['downtime_ms'] for r in rows):.1f}-{max(r['downtime_ms'] for r in rows):.1f})")
print(f"model's level at 1000 MiB/s: {model_for(fast, 1000)[-1] / 2**20:.1f} MiB; measured median of the last rounds: "
      f"{np.median([r['rounds_mib'][-1] for r in fast]):.1f} MiB")"""),
    ("md", """At 1000 MiB/s, above the model's boundary, the rounds stop shrinking and level off above the threshold: the engine gives up after its round limit, and the stop writes the last level, more than twice the slow guest's last round (the lines printed above check both on your run, and put the model's level beside the measured one: the model takes the guest's nominal 1000 MiB/s and the `W` and `c` fitted on the slow guest's rounds). Where the model's level is above the measured one, its inputs explain why: the guest kept most of its nominal rate (exercise 2 measures it: compare its printed rate with the nominal one), so the per-byte cost is the suspect. The slow guest's few MiB were scattered, and their rounds cost more per dirty byte than the fast guest's dense ones: compare this guest's last round (MiB dirty, and the milliseconds it took) with `c` and `W`.

**The longer last round, the shorter stop?** Compare the two downtimes printed above: the fast guest's stop can be the *shorter*, though its last round holds more dirty bytes. The MiB written and the milliseconds beside them say why: a guest dirtying 1000 MiB/s covers its working set densely, so its last round goes out as a few long runs, while the slow guest's few MiB are scattered, many short runs with clean gaps, so more writes for fewer dirty bytes (the MiB written per MiB dirty of each last round, printed for both). A round's time follows its writes, not its dirty bytes: the same reason the fitted `W` is a rough number. QEMU would keep iterating until its downtime limit is met unless auto-converge slows the guest down; snaplab's copy-on-write engine avoids the question altogether: it freezes RAM in one instant with write protection and saves a page's chunk before the guest's first write to it, so its stop does not depend on `D` (notebook 7)."""),
    ("md", """## Exercises: predict, then measure

1. **Three times the dirty rate.** With `D = 300 MiB/s`, predict from the fitted `W` (printed above) how many rounds run and how big the last one is; then compare `model_for(ex1, 300)` with the measured `precopy_rows(RAM_MIB, 300, WS_MIB)` (the cell below runs both).
2. **Where does it stop converging?** From the model, at which dirty rate do the rounds stop reaching the threshold? (The first cell printed it: `LIMIT`.) To check it, measure one rate below and one above it with `precopy_rows`, and the guest's own dirty rate during the save (pages stamped per second, from the lab port) to see whether it kept its nominal rate. The cell below does it at half and at twice `LIMIT` (two saves each), and closer in, at 0.8 and 1.25 times `LIMIT` (one save each: how sharp is the boundary?), and computes the guest's rate during each save's rounds from the lab-port samples the row keeps (`details['timeline']`: one iteration of the dirty workload stamps one 4 KiB page).
3. **A fixed cost per round** (a model exercise: the engine's per-round cost is not a setting, so there is nothing to measure). Suppose a round cost `c = 50 ms` (a dirty bitmap walked page by page in Python would). Predict the floor for `D = 100` and `150 MiB/s`, and whether each still reaches the 8 MiB threshold; the cell below computes it with `model_rounds(..., round_cost_s=0.05, ...)` and the fitted `W`.
4. **QEMU's rule on this host.** QEMU stops iterating when the pending bytes fit in `bandwidth * downtime_limit` (300 ms by default), with the bandwidth its migration stream reaches. Its recorded background snapshots on these hosts streamed at 176-395 MB/s into `exec:cat` (docs/reference/qemu-7.2-qmp.md, "Background snapshot"). Predict QEMU's threshold from that, whether the 1000 MiB/s guest would converge under QEMU's rule (compare the threshold with the guest's working set: pending bytes cannot exceed it), and how long QEMU's final stop would then last. The last cell computes it, and, for comparison, the threshold with the rate at which snaplab wrote the fast guest's rounds (MiB written over their time: a write into the image, clean gaps included, not a stream)."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
ex1 = precopy_rows(RAM_MIB, 300, WS_MIB, seed=SEED, repetitions=REPS)     # exercise 1: D = 300 MiB/s
m300 = model_for(ex1, 300)
print(f'D / W = {300 * 2**20 / W:.2f}, D * c = {300 * c:.1f} MiB, the floor D * c / (1 - D / W) = {300 * c / max(1e-9, 1 - 300 * 2**20 / W):.1f} MiB, '
      f'the model limit {LIMIT / 2**20:.0f} MiB/s')
print(f'model (W and c fitted above, round 0 {first_round_s(ex1) * 1e3:.0f} ms): {len(m300)} entries, last {m300[-1] / 2**20:.1f} MiB,',
      [round(x / 2**20, 1) for x in m300])
for r in ex1:
    print(f"measured: {r['iterations']} entries, last {r['rounds_mib'][-1]:.1f} MiB,", [round(x, 1) for x in r['rounds_mib']],
          f"round 0 {r['round0_s'] * 1e3:.0f} ms")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 2: dirty rates below the model's limit (LIMIT) and above it: two saves at 0.5x and 2x, one at 0.8x and 1.25x
def rate_during_rounds(r):      # MiB/s the guest stamped from the end of round 0 to the stop (one iteration = one 4 KiB page)
    t, it = np.array(r['details']['timeline']).T
    t0, t1 = r['round0_s'], (r['details']['stopped'] or (r['details']['job_s'],))[0]
    return float(np.diff(np.interp([t0, t1], t, it))[0]) * 4096 / 2**20 / (t1 - t0)
for k, n in (((0.5, 2), (0.8, 1), (1.25, 1), (2.0, 2)) if np.isfinite(LIMIT) else ()):  # (no limit: nothing to bracket)
    d = int(k * LIMIT / 2**20)
    print(f"D = {d} MiB/s (D / limit = {d * 2**20 / LIMIT:.2f}): model {[round(x / 2**20, 1) for x in model_for(slow, d)]}")
    for r in precopy_rows(RAM_MIB, d, WS_MIB, seed=SEED, repetitions=n):
        print(f"   measured {[round(x, 1) for x in r['rounds_mib']]}  reached the threshold: {r['iterations'] < limit}\\n"
              f"      the guest's rate during rounds 1..: {rate_during_rounds(r):.0f} MiB/s; "
              f"this save's own fit: c = {fit_rounds([r])[1] * 1e3:.0f} ms per round")
        d_, w_, t_ = (sum(r['details'][k][1:-1]) for k in ('bytes_per_round', 'written_per_round', 'round_s'))
        if t_ > 0:
            print(f"      rounds 1..: {d_ / 2**20:.1f} MiB dirty, {w_ / 2**20:.1f} MiB written (clean gaps included) in {t_ * 1e3:.0f} ms, "
                  f"{len(r['details']['round_s']) - 2} rounds: {t_ * 1e3 / max(1, len(r['details']['round_s']) - 2):.0f} ms per round")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 3: the model with c = 50 ms per round (W as fitted above)
for d in (100, 150):
    ratio = d * 2**20 / W
    floor = d * 2**20 * 0.05 / (1 - ratio) if ratio < 1 else float('inf')
    m = model_rounds(RAM_MIB * 2**20, W, 0.05, d * 2**20, WS_MIB * 2**20, 8 * 2**20, 10, first_s=T0)
    print(f'D = {d} MiB/s: D / W = {ratio:.2f}, floor {floor / 2**20:.1f} MiB, '
          f'model: {len(m) - 2} iterative rounds, the stop writes {m[-1] / 2**20:.1f} MiB, reaches 8 MiB: {m[-1] <= 8 * 2**20}')"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 4: QEMU's threshold, bandwidth x downtime-limit, with the bandwidth this host wrote the fast guest's rounds at
for qemu_mbs in (176, 395):   # QEMU 7.2's recorded stream rates, MB/s (1e6 bytes)
    thr = qemu_mbs * 1e6 * 0.3
    print(f"QEMU streaming at {qemu_mbs} MB/s: threshold {thr / 2**20:.0f} MiB against the working set's {WS_MIB} MiB; "
          f"converges: {'yes, whatever the rate' if thr >= WS_MIB * 2**20 else 'only if its pending bytes drop under it'}; a final stop sending up to {min(thr, WS_MIB * 2**20) / 2**20:.0f} MiB "
          f"takes up to {min(thr, WS_MIB * 2**20) / (qemu_mbs * 1e6) * 1e3:.0f} ms")
bw = np.median([sum(r['details']['written_per_round'][1:]) / sum(r['details']['round_s'][1:]) for r in fast])
print(f"snaplab wrote the fast guest's rounds at {bw / 2**20:.0f} MiB/s (median): the same rule would give {bw * 0.3 / 2**20:.0f} MiB; "
      f"the fast guest's level {np.median([r['rounds_mib'][-1] for r in fast]):.1f} MiB")"""),
    ("md", """<details><summary>Worked solutions (open after predicting)</summary>

1. With the fitted per-round cost `c`, every round after the first holds about what the guest dirties in `c`, `D * c` (capped by the working set; printed above the model's rounds), whatever the round before it held. At 300 MiB/s that floor is three times the 100 MiB/s guest's: whether it is under 8 MiB decides everything, and the model's limit (printed) says on which side 300 MiB/s lies. If it lies below the limit, the model converges after round 1 or 2; if above, it runs all 10 rounds and the stop writes the floor. Round 1 is again about `D` times round 0's duration, so a save whose round 0 was slow has a bigger round 1: compare each measured save's round-0 time with the model's. A measured save also leaves the model's line when one of its rounds was slower or faster than `c`, or when the guest did not keep its nominal 300 MiB/s while competing with the save for the two host cores (exercise 2 measures that). The model gives the shape (converging or levelling off, and at about which size), not each save's bytes; compare also the number of entries, the model's and each save's (printed): one round more or less is within what a slow round 0 explains.
2. The boundary is the model's `LIMIT`: where a round's new dirty bytes, `D * (c + B / W)` (capped by the working set), stop getting under the 8 MiB threshold. With `W` infinite it would be about `8 MiB / c` (solve `S * (1 - exp(-D * c / S)) = 8 MiB`); the finite `W` fitted here lowers it, because each round's bytes then lengthen the next round (compare `8 MiB / c` with the printed `LIMIT`: the gap is the bandwidth term). Mostly, though, the per-round cost sets it. The cell measured two rates on each side. Far below it (0.5x), the model converges within a round or two; compare the measured lists and the `reached the threshold` flags. Far above it (2x), the model levels off and never reaches the threshold; the measured saves should run to the round limit too. Close to it (0.8x and 1.25x) the model's rounds shrink slowly or level off just above the threshold, so a single slow round can tip a measured save either way: the boundary is a band, as wide as the spread of the per-round cost, not a line (compare the two close saves' flags and their own `c`). Two numbers per save test the model's inputs. First, the guest's rate during the rounds against the nominal `D`: a guest that could not keep its rate while the save competed with it dirties less, and levels off lower. Second, each save's own per-round cost against the fitted `c`, and its rounds' dirty MiB per millisecond: the rounds of a guest dirtying more go out as fewer, longer runs (fewer clean gaps to skip), so they can cost less *per dirty byte* than the slow guest's scattered rounds the fit came from (their per-round cost need not be lower: compare the printed `c` of each save with the fitted one): then the model's per-byte term overstates their rounds, and the real boundary can lie higher than the model's. The MiB written beside the MiB dirty show the clean gaps written through; the boundary comes from the fit, so fit `c` from saves like the ones you want to predict.
3. The floor is `D * c / (1 - D / W)` with `c = 0.05 s`; with `W` infinite it is simply `D * c`: 5 MiB at 100 MiB/s and 7.5 MiB at 150. A finite fitted `W` raises both a little (the printed lines use this run's: the higher one can come out just over 8 MiB), while the model's exact round, `S * (1 - exp(-D c / S))` with the working set's cap, stays a little under the floor: so 100 MiB/s converges at once, and whether 150 MiB/s does is a matter of a few hundred KiB (the printed `reaches 8 MiB`). At 170 MiB/s it would be over. So a per-round cost of tens of milliseconds moves the boundary down to rates a guest easily dirties: it is why snaplab finds dirty pages with one ioctl (`PAGEMAP_SCAN`), and why the clean gaps it writes through, which make its real per-round cost tens of milliseconds anyway, are what sets its boundary on this host.
4. QEMU's threshold is its stream's bandwidth times 300 ms: at the recorded 176-395 MB/s, about 50-113 MiB (printed). That is close to the 64 MiB working set: at the low end the guest's pending bytes, up to the whole working set, can stay just over it, and QEMU keeps iterating (unless auto-converge throttles the guest); at the high end they always fit, QEMU stops after the first round that fits and sends the rest inside the stop, up to the whole working set at its stream rate: a stop of a few hundred milliseconds (printed), not the tens of ms of snaplab's stop. QEMU accepts that longer stop (up to its 300 ms limit) where snaplab's fixed 8 MiB threshold insists on small rounds; snaplab's own write rate into the image (the last line) would give QEMU's rule a threshold larger than the working set, but that rate is not a migration stream's. Whether that is better depends on the downtime one wants; QEMU's auto-converge, which throttles the guest, is for guests that outrun even that threshold (in migration, where the link is usually far slower than this disk).
</details>"""),
]
