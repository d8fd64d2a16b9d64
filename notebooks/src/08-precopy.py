"""Notebook 08-precopy: Pre-copy: rounds, dirty rate against write bandwidth, convergence"""

CELLS: list[tuple[str, str]] = [
    ("md", """# 8. Pre-copy: rounds, dirty rate against write bandwidth, and why some guests never converge

**Learning goals.** After this notebook you can
1. describe a pre-copy save round by round: copy everything while the guest runs, then copy again what it dirtied meanwhile, until the rest is small enough to copy with the guest stopped;
2. predict the rounds from three numbers (the guest's dirty rate `D`, the write bandwidth `W`, a fixed cost `c` per round) and the working set `S`, and check the prediction against measured rounds;
3. explain why a guest that dirties faster than the save writes never converges, and what that costs in downtime.

**Prerequisites.** Notebooks 5 (the blocking save), 6 (userfaultfd) and 7 (copy-on-write); what a dirty page is.

**What to look at.** The bytes of each round (measured bars beside the model's line), whether they shrink under the threshold, the final round (written with the guest stopped: the downtime), and how the picture changes when `D` grows.

Lab functions used: `lab.precopy.precopy_rows`, `fit_rounds`, `model_rounds`."""),
    ("md", """## The mechanism, in QEMU and here

QEMU's live migration is pre-copy (`migration/ram.c`, `ram_save_iterate`): it sends all of RAM while the guest runs, with dirty logging on (KVM's dirty bitmap, or TCG's for an emulated guest), then the pages dirtied meanwhile, round after round, until the expected downtime (`remaining bytes / bandwidth`) is under `downtime-limit` (300 ms by default, `migrate-set-parameters`); then it stops the guest and sends the rest. A guest that dirties faster than the link sends never gets there; QEMU's `auto-converge` capability then throttles the vCPUs.

QEMU 7.2's `savevm` does not use these rounds: it stops the guest first. snaplab's `precopy` save engine applies them to an internal snapshot: dirty tracking by userfaultfd's asynchronous write protection (`UFFD_FEATURE_WP_ASYNC` + the `PAGEMAP_SCAN` ioctl: no fault reaches user space; `emulator/migration/precopy.py`), rounds written into the snapshot's VM-state area, and the stop when a round is at most a byte threshold or after a round limit (both in the job's stats). Unlike QEMU it has no bandwidth estimate or downtime limit, and no auto-converge.

The model (derivation in `lab/precopy.py`): a round of `B` bytes lasts `c + B / W`, and the next round is the distinct pages dirtied meanwhile, `S * (1 - exp(-D * (c + B / W) / S))`. With `D < W` the rounds shrink geometrically towards a floor near `D * c / (1 - D / W)`; with `D >= W` they stop shrinking and level off at a large fraction of the working set `S`."""),
    ("code", """QUICK = True
RAM_MIB, WS_MIB, SEED, REPS = 256, 64, 1, 3
from lab.precopy import precopy_rows, fit_rounds, model_rounds
print(f'seed {SEED}: {RAM_MIB} MiB guest, the dirty workload over a {WS_MIB} MiB working set, {REPS} saves per rate')"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
slow = precopy_rows(RAM_MIB, 100, WS_MIB, seed=SEED, repetitions=REPS)     # D = 100 MiB/s
W, c = fit_rounds(slow)
stats = slow[0]['details']
print(f'fitted from the iterative rounds: W = {W / 2**20:.0f} MiB/s, c = {c * 1e3:.0f} ms per round')
for r in slow:
    print('rounds (MiB):', [round(x, 1) for x in r['rounds_mib']], f"  downtime {r['downtime_ms']:.1f} ms, total {r['total_s']:.2f} s")"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
import matplotlib.pyplot as plt
def show(rows, d_mib_s, ax, title):
    model = model_rounds(RAM_MIB * 2**20, W, c, d_mib_s * 2**20, WS_MIB * 2**20, 8 * 2**20, 10)
    for i, r in enumerate(rows):
        ax.bar([k + 0.25 * i - 0.25 for k in range(len(r['rounds_mib']))], r['rounds_mib'], 0.25, color='0.7', edgecolor='black',
               label='measured (one bar per save)' if i == 0 else None)
    ax.plot(range(len(model)), [m / 2**20 for m in model], 'k--o', label=f'model: D={d_mib_s} MiB/s, W={W / 2**20:.0f} MiB/s, c={c * 1e3:.0f} ms')
    ax.axhline(8, color='0.4', lw=0.8, ls=':', label='threshold (8 MiB)')
    ax.set_yscale('log'); ax.set_xlabel('round (0: all of RAM; the last: with the guest stopped)'); ax.set_ylabel('MiB dirty, saved in the round')
    ax.set_title(title, fontsize=10); ax.legend(fontsize=8)
fig, ax = plt.subplots(figsize=(8, 4))
show(slow, 100, ax, f'D = 100 MiB/s over {WS_MIB} MiB: converging')"""),
    ("md", """What to see: round 1 holds what the guest dirtied during round 0 (the longest round: all of RAM, capped by the working set); each next round is about `D / W` of the one before (the model's dashed line), so the rounds shrink geometrically until one is under the threshold, and the stop writes that last small round: the downtime. A fixed cost `c` per round would put a floor under the rounds, `D * c / (1 - D / W)`; here `c`, the dirty-log scan (one `PAGEMAP_SCAN` ioctl), is under a millisecond, so no floor shows. The measured rounds scatter around the model because a save's first round is not always the same length (the page cache, the host's other load)."""),
    ("code", """# NBVAL_IGNORE_OUTPUT
fast = precopy_rows(RAM_MIB, 1000, WS_MIB, seed=SEED, repetitions=REPS)     # D = 1000 MiB/s
fig, ax = plt.subplots(figsize=(8, 4))
show(fast, 1000, ax, f'D = 1000 MiB/s over {WS_MIB} MiB: never converging')
for r in fast:
    print('rounds (MiB):', [round(x, 1) for x in r['rounds_mib']], f"  downtime {r['downtime_ms']:.1f} ms")"""),
    ("code", """import numpy as np
limit = fast[0]['details']['max_rounds'] + 2      # round 0, the iterative rounds, the final one
print('the fast guest ran every save to the round limit:', all(r['iterations'] == limit for r in fast))
print("the fast guest's final round is more than twice the slow guest's:",
      np.median([r['rounds_mib'][-1] for r in fast]) > 2 * np.median([r['rounds_mib'][-1] for r in slow]))"""),
    ("code", """# NBVAL_IGNORE_OUTPUT
for name, rows in (('100 MiB/s', slow), ('1000 MiB/s', fast)):
    print(f"{name}: final round median {np.median([r['rounds_mib'][-1] for r in rows]):.1f} MiB, "
          f"downtime median {np.median([r['downtime_ms'] for r in rows]):.1f} ms "
          f"(IQR {np.percentile([r['downtime_ms'] for r in rows], 25):.1f}-{np.percentile([r['downtime_ms'] for r in rows], 75):.1f})")"""),
    ("md", """At 1000 MiB/s the rounds stop shrinking and level off well above the threshold: the engine gives up after its round limit, and the stop writes the last level, several times the slow guest's last round. The measured level can sit below the model's line: the model takes the guest's nominal 1000 MiB/s, and whether the guest keeps that rate while a save competes with it for the host is what exercise 2 measures. QEMU would keep iterating until its downtime limit is met unless auto-converge slows the guest down; snaplab's copy-on-write engine avoids the question altogether: it freezes RAM in one instant with write protection and copies a page before the guest's first write to it, so its stop does not depend on `D` (notebook 7)."""),
    ("md", """## Exercises: predict, then measure

1. **Three times the dirty rate.** With `D = 300 MiB/s` (about the fitted `W` on this project's machines), predict how many rounds run and how big the last one is. Compare `model_rounds(RAM_MIB * 2**20, W, c, 300 * 2**20, WS_MIB * 2**20, 8 * 2**20, 10)` with `precopy_rows(RAM_MIB, 300, WS_MIB)`.
2. **Where does it stop converging?** From the model, at which dirty rate do the rounds stop shrinking? Measure one rate below and one above it, and measure the guest's own dirty rate during the save (`m.lab.history()`: pages stamped per second) to see whether it kept its nominal rate.
3. **A fixed cost per round.** Suppose finding the dirty pages cost `c = 50 ms` per round (a dirty bitmap walked page by page in Python would). Predict the floor for `D = 100` and `150 MiB/s`, and whether each still reaches the 8 MiB threshold; check with `model_rounds(..., round_cost_s=0.05, ...)`."""),
    ("md", """<details><summary>Worked solutions (open after predicting)</summary>

1. With `D` close to `W` the ratio `D / W` is close to 1: the rounds shrink slowly (the model with `W = 298 MiB/s`: 63, 40, 30, 24, 20 ... 11 MiB) and never reach 8 MiB, so the engine runs all 10 rounds and the stop writes about 11 MiB.
2. In the model the rounds shrink only while `D < W`; at `D >= W` each round stays at a level set by the working set and the round's length, whatever the number of rounds. If the measured level is below the model's, the guest's dirty rate during the save was below its nominal rate: the stamps it reported while the rounds ran give the real `D`.
3. The floor `D * c / (1 - D / W)`: with `c = 0.05 s` and `W = 298 MiB/s`, about 7.5 MiB at 100 MiB/s (just under the threshold: the model stops after 4 rounds) and 15 MiB at 150 MiB/s (never under it: 10 rounds, a 12 MiB stop). A per-round cost, not only the bandwidth, decides whether a guest converges: it is why snaplab finds dirty pages with one ioctl and writes them in numpy-grouped runs.
</details>"""),
]
