"""Pre-copy, measured and modelled: the rounds of a dirty-logging save beside the geometric model.

A pre-copy save writes all of RAM while the guest runs (round 0), then, round after round, what
the guest dirtied meanwhile, until a round is small enough to finish with the guest stopped
(QEMU's live migration, migration/ram.c ``ram_save_iterate``; snaplab's engine:
emulator/migration/precopy.py).  With a write bandwidth ``W``, a fixed cost ``c`` per
round (finding the dirty pages, starting the writes) and a guest dirtying ``D`` bytes/s at
random over a working set of ``S`` bytes, a round of ``B`` bytes lasts ``c + B / W``, and the
next round holds the distinct pages dirtied meanwhile::

    B_next = S * (1 - exp(-D * (c + B / W) / S))      (about D * (c + B / W) while that is << S)

so the rounds shrink geometrically (ratio D / W) towards a floor of about ``D * c / (1 - D / W)``
when D < W, and stop shrinking near ``S`` when D >= W: such a guest never converges, and the
last round, done with the guest stopped, is big.  The engine stops iterating when a round is at
most its threshold or after its round limit (``threshold_bytes``, ``max_rounds`` in the stats).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lab.run import run_experiment
from lab.spec import ExperimentSpec, guest_runs, save_engines, write_protects


def precopy_engine() -> str:
    """The registry's pre-copy engine: the guest runs during the save, nothing write-protected."""
    return next(e for e in save_engines() if guest_runs(e) and not write_protects(e))


def model_rounds(first_bytes: float, write_bps: float, round_cost_s: float, dirty_bps: float, ws_bytes: float,
                 threshold: float, max_rounds: int) -> list[float]:
    """The rounds the model predicts: round 0 (``first_bytes``), then each next round from the
    last one's duration, until one is at most ``threshold`` (left for the stop) or
    ``max_rounds`` more were written; the last entry is what the stop writes."""
    rounds = [float(first_bytes)]
    for _ in range(max_rounds):
        last_s = round_cost_s + rounds[-1] / write_bps
        nxt = ws_bytes * (1.0 - math.exp(-dirty_bps * last_s / ws_bytes))
        rounds.append(nxt)
        if nxt <= threshold:
            return rounds
    return rounds


def fit_rounds(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(write bandwidth in dirty bytes saved per s, fixed cost per round in s), measured: the
    dirty bytes of every iterative round over the time spent writing them, and the median time
    to find a round's dirty pages (round 0, which writes all of RAM by another path, and the
    final round, written with the guest stopped, are left out)."""
    b = sum(x for r in rows for x in r["details"]["bytes_per_round"][1:-1])
    t = sum(x for r in rows for x in r["details"]["round_s"][1:-1])
    scans = [x for r in rows for x in r["details"]["scan_s"]]
    if not b or not t or not scans:
        return float("nan"), float("nan")
    return b / t, float(np.median(scans))


def precopy_rows(ram_mib: int, rate_mib_s: int, ws_mib: int, seed: int = 1, repetitions: int = 3) -> list[dict[str, Any]]:
    """``repetitions`` pre-copy saves of a dirty guest; each row has its rounds (bytes and
    seconds), the measured write bandwidth of its rounds, downtime and total."""
    spec = ExperimentSpec(ram_mib=ram_mib, engine=precopy_engine(), dirty_rate_mib_s=rate_mib_s,
                          working_set_mib=ws_mib, seed=seed, repetitions=repetitions, warmup_s=0.5)
    rows = run_experiment(spec)
    for r in rows:
        b, t = r["details"]["bytes_per_round"], r["details"]["round_s"]
        r["rounds_mib"] = [x / 2**20 for x in b]
        r["write_mib_s"] = (sum(b[:-1]) / sum(t[:-1])) / 2**20 if len(b) > 1 and sum(t[:-1]) > 0 else float("nan")
    return rows
