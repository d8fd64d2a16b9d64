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
last round, done with the guest stopped, is big.  A floor above the engine's threshold stops
convergence too: on snaplab's engine a round writes its dirty pages with the clean gaps between
them, so its time hardly grows with its dirty bytes and ``c`` (tens of ms) sets the boundary
(:func:`fit_rounds`, :func:`convergence_limit`).  The engine stops iterating when a round is at
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
                 threshold: float, max_rounds: int, first_s: float | None = None) -> list[float]:
    """The rounds the model predicts, laid out as the engine's ``bytes_per_round``: round 0
    (``first_bytes``), then each next round from the last one's duration, until one is at most
    ``threshold`` (left for the stop, the last entry) or ``max_rounds`` more were written (then
    the last entry is what was dirtied during the last of them, written by the stop).
    Round 0 lasts ``first_s`` when given (it writes all of RAM by another path than the later
    rounds, so its duration is measured apart), else ``round_cost_s + first_bytes / write_bps``."""
    rounds = [float(first_bytes)]
    last_s = first_s if first_s is not None else round_cost_s + first_bytes / write_bps
    for _ in range(max_rounds):
        nxt = ws_bytes * (1.0 - math.exp(-dirty_bps * last_s / ws_bytes))
        rounds.append(nxt)
        if nxt <= threshold:
            return rounds
        last_s = round_cost_s + nxt / write_bps
    rounds.append(ws_bytes * (1.0 - math.exp(-dirty_bps * last_s / ws_bytes)))  # the stop's round
    return rounds


CONSISTENT = 0.75  # share of the rounds' pairwise slopes that must be positive for a finite W (fit_rounds)


def fit_rounds(rows: list[dict[str, Any]], stop_round: bool = False, per_byte: bool = True) -> tuple[float, float]:
    """(``W``, ``c``): a round's time against its dirty bytes, ``t = c + B / W``, fitted over
    every round written while the guest ran (after round 0, before the stop's) of every save,
    by Theil-Sen (the median of the slopes between every two rounds of different sizes, then
    the median intercept).
    ``c`` is what a round costs whatever its dirty bytes: finding them, and the clean pages
    written through between two dirty ones (``GAP_PAGES`` in emulator/migration/precopy.py):
    a few MiB of pages dirtied at random over a working set make a round rewrite most of it.
    The stop's round is left out unless ``stop_round``: it holds the last few MiB the guest
    dirtied, scattered, so it goes out as many short writes and costs more than a round the
    model predicts (notebook 8's 100 MiB/s guest, 2026-12-07: a stop's round wrote 7.8 MiB in
    29 ms, a round with the guest running 60 MiB in 25 ms).
    Where the rounds' times do not grow with their dirty bytes (fewer than :data:`CONSISTENT`
    of the pairs of rounds rise), ``W`` is infinite (no per-byte cost measurable at these
    sizes) and ``c`` their median time; ``per_byte`` False asks for that model whatever the
    rounds show (a round that rewrites most of the working set costs about the same whatever
    it holds).  The median scan (``scan_s``, timed apart from the writes) is added to ``c``.
    NaN without such rounds."""
    end = None if stop_round else -1
    pts = [(float(b), float(t)) for r in rows
           for b, t in zip(r["details"]["bytes_per_round"][1:end], r["details"]["round_s"][1:end], strict=True)]
    if not pts:
        return float("nan"), float("nan")
    # a round's time is its writes' (round_s) plus the scan that found its pages (scan_s)
    scans = [x for r in rows for x in r["details"].get("scan_s", [])]
    scan = float(np.median(scans)) if scans else 0.0
    if not per_byte:
        return float("inf"), float(np.median([t for _, t in pts])) + scan
    slopes = [(t2 - t1) / (b2 - b1) for i, (b1, t1) in enumerate(pts) for b2, t2 in pts[i + 1:] if b2 != b1]
    slope = float(np.median(slopes)) if slopes else 0.0
    # A per-byte cost only where the rounds agree on one: at least CONSISTENT of the pairs rise
    # with the bytes (a handful of rounds of similar sizes otherwise gives a slope from noise,
    # measured: 511 MiB/s from four rounds of 2-12 MiB, whose times fell as often as they rose).
    if slope <= 0 or sum(x > 0 for x in slopes) < CONSISTENT * len(slopes):
        return float("inf"), float(np.median([t for _, t in pts])) + scan
    return 1.0 / slope, float(np.median([t - b * slope for b, t in pts])) + scan


def convergence_limit(ram_bytes: float, write_bps: float, round_cost_s: float, ws_bytes: float, threshold: float,
                      max_rounds: int, first_s: float | None = None) -> float:
    """The lowest dirty rate (bytes/s) at which :func:`model_rounds` no longer gets a round
    under ``threshold`` within ``max_rounds``: the model's boundary between converging and
    not (bisection; the model's rounds grow with the rate)."""
    if math.isnan(write_bps) or not round_cost_s > 0 or not ws_bytes > threshold:
        return float("nan")  # no fit, or a model that converges at any rate

    def converges(d: float) -> bool:
        rounds = model_rounds(ram_bytes, write_bps, round_cost_s, d, ws_bytes, threshold, max_rounds, first_s)
        return len(rounds) < max_rounds + 2
    lo, hi = 1.0, 1e12
    if not converges(lo):
        return lo
    if converges(hi):
        return float("inf")
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if converges(mid) else (lo, mid)
    return hi


def first_round_s(rows: list[dict[str, Any]]) -> float:
    """The median duration of round 0 (all of RAM written while the guest runs) over the saves."""
    return float(np.median([r["details"]["round_s"][0] for r in rows]))


def precopy_rows(ram_mib: int, rate_mib_s: int, ws_mib: int, seed: int = 1, repetitions: int = 3) -> list[dict[str, Any]]:
    """``repetitions`` pre-copy saves of a dirty guest; each row has its rounds (bytes and
    seconds; ``round0_s``: how long round 0 took), the measured write bandwidth of its rounds,
    downtime and total."""
    spec = ExperimentSpec(ram_mib=ram_mib, engine=precopy_engine(), dirty_rate_mib_s=rate_mib_s,
                          working_set_mib=ws_mib, seed=seed, repetitions=repetitions, warmup_s=0.5)
    rows = run_experiment(spec)
    for r in rows:
        b, t = r["details"]["bytes_per_round"], r["details"]["round_s"]
        r["rounds_mib"] = [x / 2**20 for x in b]
        r["round0_s"] = t[0]
        r["write_mib_s"] = (sum(b[:-1]) / sum(t[:-1])) / 2**20 if len(b) > 1 and sum(t[:-1]) > 0 else float("nan")
    return rows
