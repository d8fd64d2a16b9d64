"""Notebook 08-precopy: Pre-copy: rounds, dirty rate against write bandwidth, convergence"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 8. Pre-copy: rounds, dirty rate against write bandwidth, and why some guests never converge

**Learning goals.** After this notebook you can
1. describe a pre-copy save round by round: copy everything while the guest runs, then copy again what it dirtied meanwhile, until the rest is small enough to copy with the guest stopped;
2. predict the rounds from three numbers (the guest's dirty rate `D`, the write bandwidth `W`, a fixed cost `c` per round) and the working set `S`, and check the prediction against measured rounds;
3. explain why a guest that dirties faster than the save writes never converges, and what that costs in downtime.

**Prerequisites.** Notebooks 5 (the blocking save), 6 (userfaultfd) and 7 (copy-on-write); what a dirty page is.

**What to look at.** The bytes of each round (measured bars beside the model's line), whether they shrink under the threshold, the final round (written with the guest stopped: the downtime), and how the picture changes when `D` grows.

Lab functions used: `lab.precopy.precopy_rows`, `fit_rounds`, `first_round_s`, `model_rounds`."""),
    ("md", """## The mechanism, in QEMU and here

QEMU's live migration is pre-copy (`migration/ram.c`, `ram_save_iterate`): it sends all of RAM while the guest runs, with dirty logging on (KVM's dirty bitmap, or TCG's for an emulated guest), then the pages dirtied meanwhile, round after round, until what remains can be sent within `downtime-limit`; then it stops the guest and sends the rest. In QEMU 7.2's source: `migration_update_counters()` (`migration/migration.c`) sets `threshold_size = bandwidth * downtime_limit` from the bandwidth measured over the last period, `migration_iteration_run()` completes the migration once the pending bytes are below `threshold_size`, and `DEFAULT_MIGRATE_SET_DOWNTIME` is 300 (ms, same file; the parameter is `downtime-limit` in `qapi/migration.json`'s `MigrationParameters`, set with `migrate-set-parameters`). A guest that dirties faster than the link sends never gets there; with the `auto-converge` capability (`qapi/migration.json`: "QEMU will automatically throttle down the guest to speed up convergence of RAM migration") `migration_trigger_throttle()` calls `mig_throttle_guest_down()` (`migration/ram.c`), which slows the vCPUs step by step.

QEMU 7.2's `savevm` does not use these rounds: it stops the guest first. snaplab's `precopy` save engine applies them to an internal snapshot: dirty tracking by userfaultfd's asynchronous write protection (`UFFD_FEATURE_WP_ASYNC` + the `PAGEMAP_SCAN` ioctl: no fault reaches user space; `emulator/migration/precopy.py`), rounds written into the snapshot's VM-state area, and the stop when a round is at most a byte threshold or after a round limit (both in the job's stats). Unlike QEMU it has no bandwidth estimate or downtime limit, and no auto-converge.

The model (derivation in `lab/precopy.py`): a round of `B` bytes lasts `c + B / W`, and the next round is the distinct pages dirtied meanwhile, `S * (1 - exp(-D * (c + B / W) / S))`. With `D < W` the rounds shrink geometrically towards a floor near `D * c / (1 - D / W)`; with `D >= W` they stop shrinking and level off at a large fraction of the working set `S`. Round 0 is the exception: it writes all of RAM, allocating the VM-state area in the image as it goes (`emulator/migration/precopy.py`, `_write_all`), while the later rounds rewrite pages in place; its speed is not `W`, so the model takes its duration as measured (`first_s`: the median over the saves), and `W` from the later rounds (for each save, its iterative rounds' bytes over their time; then the median over the saves: `fit_rounds`). Like the engine's stats, the model's last entry is the round the stop writes."""),
    ("code", """QUICK = True
RAM_MIB, WS_MIB, SEED, REPS = 256, 64, 1, 3
from lab.precopy import precopy_rows, fit_rounds, first_round_s, model_rounds
print(f'seed {SEED}: {RAM_MIB} MiB guest, the dirty workload over a {WS_MIB} MiB working set, {REPS} saves per rate')"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
import numpy as np
slow = precopy_rows(RAM_MIB, 100, WS_MIB, seed=SEED, repetitions=REPS)     # D = 100 MiB/s
W, c = fit_rounds(slow)
T0 = first_round_s(slow)
print(f'fitted from the iterative rounds (median over saves): W = {W / 2**20:.0f} MiB/s, c = {c * 1e3:.2f} ms per round')
print(f'round 0 ({RAM_MIB} MiB), median over saves: {T0 * 1e3:.0f} ms')
for r in slow:
    print('rounds (MiB):', [round(x, 1) for x in r['rounds_mib']], f"  round 0 {r['round0_s'] * 1e3:.0f} ms, downtime {r['downtime_ms']:.1f} ms, total {r['total_s']:.2f} s")
print(f"slowest round 0 / median round 0: {max(r['round0_s'] for r in slow) / T0:.1f}x")"""),
    ("md", """**How long a save takes varies, and why.** Round 0 writes all of RAM into the image while the guest runs, and what follows depends on how long that took: round 1 is what the guest dirtied meanwhile. On this host (a shared virtual machine with two cores) round 0 of the same save, same guest and seed, usually takes around a tenth of a second at 256 MiB, and its slowest repetition against the median is the ratio printed in the last line above. Before December 2026 it could take an order of magnitude more: those writes went through the host's page cache into a newly allocated part of the image file, and on this host every new page-cache page is expensive (the host is itself a virtual machine whose freed memory goes back to the hypervisor): `docs/deviations.md` 57 measured it and moved the VM-state writes of every engine, pre-copy's rounds included, around the page cache. Other work on a shared host can still slow a round. This is why the fit takes medians over saves and round 0's measured time: one slow save must not set the model."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
import matplotlib.pyplot as plt
def model_for(rows, d_mib_s, first_s=None):
    return model_rounds(RAM_MIB * 2**20, W, c, d_mib_s * 2**20, WS_MIB * 2**20, 8 * 2**20, 10,
                        first_s=first_round_s(rows) if first_s is None else first_s)
def show(rows, d_mib_s, ax, title):
    model = model_for(rows, d_mib_s)
    for i, r in enumerate(rows):
        ax.bar([k + 0.25 * i - 0.25 for k in range(len(r['rounds_mib']))], r['rounds_mib'], 0.25, color='0.7', edgecolor='black',
               label='measured (one bar per save)' if i == 0 else None)
    ax.plot(range(len(model)), [m / 2**20 for m in model], 'k--o',
            label=f'model: D={d_mib_s} MiB/s, W={W / 2**20:.0f} MiB/s, round 0 {first_round_s(rows) * 1e3:.0f} ms (median)')
    ax.axhline(8, color='0.4', lw=0.8, ls=':', label='threshold (8 MiB)')
    ax.set_yscale('log'); ax.set_xlabel('round (0: all of RAM; the last: with the guest stopped)'); ax.set_ylabel('MiB dirty, saved in the round')
    ax.set_xticks(range(max(len(model), *(len(r['rounds_mib']) for r in rows))))
    ax.set_title(title, fontsize=10); ax.legend(fontsize=8)
fig, ax = plt.subplots(figsize=(8, 4))
show(slow, 100, ax, f'D = 100 MiB/s over {WS_MIB} MiB, {RAM_MIB} MiB of RAM, {REPS} saves: converging')"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# each save beside the model run from that save's own round 0 (rounds 1.., MiB)
for r in slow:
    own = model_for(slow, 100, first_s=r['round0_s'])
    print(f"save {r['rep']}: measured {[round(x, 1) for x in r['rounds_mib'][1:]]}   model {[round(x / 2**20, 1) for x in own[1:]]}")"""),
    ("md", """What to see: round 1 holds what the guest dirtied during round 0, about `D` times round 0's duration (capped by the working set), so a save whose round 0 was slow has a bigger round 1, and may need one round more; the model fed with each save's own round 0 is printed beside it. From round 1 on, each round is the pages dirtied while the previous one was written, `D * (c + B / W)`: the rounds shrink by about `D / W` each until one is under the threshold, and the stop writes that last small round: the downtime. A fixed cost `c` per round would put a floor under the rounds, `D * c / (1 - D / W)`; here `c`, the dirty-log scan (one `PAGEMAP_SCAN` ioctl), is the fraction of a millisecond printed above, too small for a visible floor. Read the model against the measured rounds in the printed lines rather than as a fit: the later rounds are a few MiB, where a few 2 MiB chunks more or less of the guest's writes, or a round that happened to be slow, show."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
fast = precopy_rows(RAM_MIB, 1000, WS_MIB, seed=SEED, repetitions=REPS)     # D = 1000 MiB/s
fig, ax = plt.subplots(figsize=(8, 4))
show(fast, 1000, ax, f'D = 1000 MiB/s over {WS_MIB} MiB: never converging')
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
    print(f"{name}: final round median {np.median([r['rounds_mib'][-1] for r in rows]):.1f} MiB, "
          f"downtime median {np.median([r['downtime_ms'] for r in rows]):.1f} ms "
          f"(IQR {np.percentile([r['downtime_ms'] for r in rows], 25):.1f}-{np.percentile([r['downtime_ms'] for r in rows], 75):.1f})")"""),
    ("md", """At 1000 MiB/s the rounds stop shrinking and level off well above the threshold: the engine gives up after its round limit, and the stop writes the last level, more than twice the slow guest's last round (the two lines printed above check both on your run). The measured level can sit below the model's line: the model takes the guest's nominal 1000 MiB/s, and the bandwidth `W` fitted from the slow guest's small rounds; whether the guest keeps its rate while a save competes with it for the host, and how fast the bigger rounds are written, is what exercise 2 measures. QEMU would keep iterating until its downtime limit is met unless auto-converge slows the guest down; snaplab's copy-on-write engine avoids the question altogether: it freezes RAM in one instant with write protection and saves a page's chunk before the guest's first write to it, so its stop does not depend on `D` (notebook 7)."""),
    ("md", """## Exercises: predict, then measure

1. **Three times the dirty rate.** With `D = 300 MiB/s`, predict from the fitted `W` (printed above) how many rounds run and how big the last one is; then compare `model_for(ex1, 300)` with the measured `precopy_rows(RAM_MIB, 300, WS_MIB)` (the cell below runs both).
2. **Where does it stop converging?** From the model, at which dirty rate do the rounds stop shrinking? To check it, measure one rate below and one above it with `precopy_rows`, and the guest's own dirty rate during the save (pages stamped per second, from the lab port) to see whether it kept its nominal rate. The cell below does it at half and at twice the fitted `W` (two saves each), and computes the guest's rate during each save's rounds from the lab-port samples the row keeps (`details['timeline']`: one iteration of the dirty workload stamps one 4 KiB page).
3. **A fixed cost per round.** Suppose finding the dirty pages cost `c = 50 ms` per round (a dirty bitmap walked page by page in Python would). Predict the floor for `D = 100` and `150 MiB/s`, and whether each still reaches the 8 MiB threshold; the cell below computes it with `model_rounds(..., round_cost_s=0.05, ...)` and the fitted `W`."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
ex1 = precopy_rows(RAM_MIB, 300, WS_MIB, seed=SEED, repetitions=REPS)     # exercise 1: D = 300 MiB/s
m300 = model_for(ex1, 300)
print(f'D / W = {300 * 2**20 / W:.2f}')
print(f'model (W = {W / 2**20:.0f} MiB/s, round 0 {first_round_s(ex1) * 1e3:.0f} ms): {len(m300)} entries, last {m300[-1] / 2**20:.1f} MiB,',
      [round(x / 2**20, 1) for x in m300])
for r in ex1:
    print(f"measured: {r['iterations']} entries, last {r['rounds_mib'][-1]:.1f} MiB,", [round(x, 1) for x in r['rounds_mib']],
          f"round 0 {r['round0_s'] * 1e3:.0f} ms")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
# exercise 2: one dirty rate below the fitted W and one above it, two saves each
def rate_during_rounds(r):      # MiB/s the guest stamped from the end of round 0 to the stop (one iteration = one 4 KiB page)
    t, it = np.array(r['details']['timeline']).T
    t0, t1 = r['round0_s'], (r['details']['stopped'] or (r['details']['job_s'],))[0]
    return float(np.diff(np.interp([t0, t1], t, it))[0]) * 4096 / 2**20 / (t1 - t0)
for d in (int(W / 2**20 / 2), int(2 * W / 2**20)):
    print(f"D = {d} MiB/s (D / W = {d * 2**20 / W:.1f}): model {[round(x / 2**20, 1) for x in model_for(slow, d)]}")
    for r in precopy_rows(RAM_MIB, d, WS_MIB, seed=SEED, repetitions=2):
        print(f"   measured {[round(x, 1) for x in r['rounds_mib']]}  reached the threshold: {r['iterations'] < limit}\\n"
              f"      the guest's rate during rounds 1..: {rate_during_rounds(r):.0f} MiB/s; "
              f"this save's rounds 1.. written at {fit_rounds([r])[0] / 2**20:.0f} MiB/s")
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
    ("md", """<details><summary>Worked solutions (open after predicting)</summary>

1. The rounds shrink by about `D / W` each (printed above the model's rounds). The smaller that ratio, the fewer rounds before one is under 8 MiB; as it approaches 1 the rounds shrink slowly, and at 1 or more they never reach the threshold, so the engine runs all 10 rounds and the stop writes the last level. Round 1 is again about `D` times round 0's duration, so a save whose round 0 was slow (a slow host moment, as in the first section) has a bigger round 1, and may need one round more: compare each measured save's round-0 time with the model's. A measured save also leaves the model's line when one of its later rounds was written slower or faster than the median `W`, or when the guest did not keep its nominal 300 MiB/s while competing with the save for the two host cores (exercise 2); compare the measured lists with the model's: rounds that shrink faster than `D / W` are what a guest that does not keep its nominal rate during the save produces, and a round that outgrows the one before it was written slowly. The model gives the shape for a guest that keeps its nominal rate (shrinking by `D / W`, and whether it gets under 8 MiB within 10 rounds), not each save's bytes; where the measured rounds shrink much faster than the model's and converge in fewer rounds, the guest did not keep its rate during the save, which exercise 2 measures.
2. In the model the rounds shrink only while `D < W`: the boundary is `D = W`, the fitted value printed at the top. At `D >= W` each round stays at a level set by the working set and the round's length, whatever the number of rounds. The cell above measured one rate on each side. At `D = W / 2` the model's rounds halve each time and get under 8 MiB within a few rounds; compare the measured lists with the model's line and the `reached the threshold` flags. At `D = 2 W` the model's rounds level off near the working set's scale and never reach the threshold; the measured saves run to the round limit too (`reached the threshold: False`), but compare their level with the model's: it can sit well below it. Two numbers per save say why. First, the guest's rate during the rounds, against the nominal `D` at the head of its block: if they are close, the guest kept its rate and a lower level is not its doing. Second, the bandwidth at which the save wrote its rounds 1.., against the fitted `W`, for both pairs of saves: `W` was fitted from the slow guest's saves, whose only iterative round is a small one (printed in its rounds list), and the model uses that one value at every rate. Where a save wrote its rounds faster than `W`, its real `D / W` is smaller than the model's: in the executions so far both pairs wrote above the fitted `W`, so the saves labelled `D / W = 0.5` really ran at a lower ratio and those labelled 2 nearer 1 (divide each save's `D` by its printed bandwidth), where the model's rounds level off lower and only slowly approach the threshold, which is the shape their lists show. To check, put each save's own bandwidth in place of `W` in `model_rounds` (`lab/precopy.py`, the function `model_for` calls). Why would small rounds give a lower `W`? `W` divides the *dirty* bytes by the round's time, while a round also has a fixed part (finding the dirty pages, starting the writes) and writes up to 16 clean pages between two dirty ones in one run (`GAP_PAGES` in `emulator/migration/precopy.py`), so a small, sparse round spends more of its time on things `W` does not count. Each save's last line lets you test it: the MiB written beside the MiB dirty are the clean gaps, and if the milliseconds per round hardly change between the saves with small rounds and those with big ones, a fixed part per round, not the bytes, sets the round's length. The boundary is where `D` equals the bandwidth the rounds are actually written at, so fit `W` from saves like the ones you want to predict.
3. The floor is `D * c / (1 - D / W)` with `c = 0.05 s`: the cell prints it for both rates with this run's `W`, and whether the model's rounds still get under 8 MiB. The floor grows with `D` faster than linearly (the `1 / (1 - D / W)` term), so the higher rate can sit above the threshold where the lower one is below it, and then it runs all 10 rounds and the stop writes about the floor (the model's last round approaches it from below or above). A per-round cost, not only the bandwidth, decides whether a guest converges: it is why snaplab finds dirty pages with one ioctl and writes them in numpy-grouped runs.
</details>"""),
]
