"""lab.precopy: the round model, and the pre-copy engine's rounds as the model reads them."""

from __future__ import annotations

import math

import numpy as np

from lab.precopy import first_round_s, fit_rounds, model_rounds, precopy_rows

M = 1 << 20


def test_the_model_shrinks_geometrically_below_the_write_bandwidth_and_not_above() -> None:
    r = model_rounds(256 * M, 300 * M, 0.0, 100 * M, 1 << 40, 8 * M, 10)
    ratios = [b / a for a, b in zip(r, r[1:], strict=False)]
    assert all(math.isclose(x, 1 / 3, rel_tol=1e-3) for x in ratios)  # D / W with a huge working set
    assert r[-1] <= 8 * M < r[-2]
    never = model_rounds(256 * M, 300 * M, 0.0, 1000 * M, 64 * M, 8 * M, 10)
    assert len(never) == 12 and min(never[1:]) > 60 * M  # round 0, 10 rounds, the stop: the working set each
    floor = model_rounds(256 * M, 300 * M, 0.05, 150 * M, 1 << 40, 1, 60)[-1]
    assert math.isclose(floor, 150 * M * 0.05 / (1 - 150 / 300), rel_tol=1e-3)
    # round 0's measured duration, when given, sets round 1: what the guest dirtied meanwhile
    first = model_rounds(256 * M, 300 * M, 0.0, 100 * M, 1 << 40, 8 * M, 10, first_s=0.1)
    assert math.isclose(first[1], 10 * M, rel_tol=1e-3)


def test_the_fit_is_a_median_over_saves() -> None:
    def row(b: list[float], t: list[float]) -> dict:
        return {"details": {"bytes_per_round": b, "round_s": t, "scan_s": [0.001]}}
    rows = [row([256 * M, 10 * M, 1 * M], [0.1, 0.02, 0.0]), row([256 * M, 10 * M, 1 * M], [0.1, 0.02, 0.0]),
            row([256 * M, 60 * M, 40 * M, 2 * M], [5.0, 3.0, 1.0, 0.0])]
    w, c = fit_rounds(rows)
    assert math.isclose(w, 500 * M) and math.isclose(c, 0.001)  # the slow save does not set W
    assert math.isclose(first_round_s(rows), 0.1)


def test_precopy_rounds_are_dirty_bytes_and_a_slow_guest_converges() -> None:
    rows = precopy_rows(64, 20, 16, seed=3, repetitions=2)
    w, c = fit_rounds(rows)
    iterative = sum(len(r["details"]["bytes_per_round"]) - 2 for r in rows)
    assert (w > 0 and c >= 0) if iterative else math.isnan(w)  # measured only from iterative rounds
    for r in rows:
        d = r["details"]
        assert d["bytes_per_round"][0] == 64 * M  # round 0: all of RAM
        assert len(d["bytes_per_round"]) == len(d["round_s"]) == len(d["written_per_round"]) == r["iterations"]
        assert d["written_per_round"][0] == 64 * M  # round 0 writes all of RAM
        assert r["round0_s"] == d["round_s"][0] > 0
        assert all(b <= 16 * M + 2 * M for b in d["bytes_per_round"][1:])  # never more than the working set (+ code, stack)
        assert r["iterations"] < d["max_rounds"] + 2  # 20 MiB/s converges well before the round limit
        assert d["bytes_per_round"][-1] <= 16 * M  # the stop writes at most one working set
    assert np.all(np.isfinite([r["downtime_ms"] for r in rows]))
