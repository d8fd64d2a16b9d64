"""lab.precopy: the round model, and the pre-copy engine's rounds as the model reads them."""

from __future__ import annotations

import math

import numpy as np

from lab.precopy import convergence_limit, first_round_s, fit_rounds, model_rounds, precopy_rows

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


def test_the_fit_is_a_line_through_the_rounds_only_where_they_agree_on_one() -> None:
    def row(b: list[float], t: list[float]) -> dict:
        return {"details": {"bytes_per_round": b, "round_s": t, "scan_s": [0.001]}}
    # rounds with the guest running on t = 0.020 + B / (1000 MiB/s), by hand, + the median
    # scan; each save's last entry is the stop's round (0.5 s: left out, or the line breaks)
    rows = [row([256 * M, 10 * M, 2 * M, 1 * M], [0.1, 0.030, 0.022, 0.5]), row([256 * M, 6 * M, 1 * M], [0.3, 0.026, 0.5]),
            row([256 * M, 4 * M, 1 * M], [0.3, 0.024, 0.5])]
    w, c = fit_rounds(rows)
    assert math.isclose(w, 1000 * M) and math.isclose(c, 0.020 + 0.001)
    assert math.isclose(first_round_s(rows), 0.3)
    w0, c0 = fit_rounds(rows, per_byte=False)  # a constant cost per round: the rounds' median time
    assert w0 == float("inf") and math.isclose(c0, 0.025 + 0.001)  # median of 30, 22, 26, 24 ms
    w_all, _ = fit_rounds(rows, stop_round=True)
    assert w_all == float("inf")  # the stop's slow rounds break the line: 0.5 s for 1 MiB
    # one slow round (4 MiB in 0.5 s): two pairs of six fall, so no per-byte cost is claimed,
    # and c is the median round, 0.028 (by hand), + the scan
    slow = rows[:2] + [row([256 * M, 4 * M, 1 * M], [0.1, 0.5, 0.02])]
    w, c = fit_rounds(slow)
    assert w == float("inf") and math.isclose(c, 0.028 + 0.001)
    # rounds that take 20 ms whatever their size: no per-byte cost, c their time
    flat = [row([256 * M, 10 * M, 2 * M, 1 * M], [0.1, 0.020, 0.020, 0.3]), row([256 * M, 6 * M, 1 * M], [0.1, 0.020, 0.3])]
    w, c = fit_rounds(flat)
    assert w == float("inf") and math.isclose(c, 0.020 + 0.001)
    assert all(math.isnan(x) for x in fit_rounds([row([256 * M], [0.1])]))
    only_stop = [row([256 * M, 1 * M], [0.1, 0.02])]  # converged at once: no round with the guest running
    assert all(math.isnan(x) for x in fit_rounds(only_stop))
    assert math.isclose(fit_rounds(only_stop, stop_round=True)[1], 0.021)


def test_the_convergence_limit_is_where_the_models_rounds_stop_reaching_the_threshold() -> None:
    # no per-byte cost: every round after the first holds S * (1 - exp(-D c / S)), so the model
    # converges while that is at most the threshold: D* = -S ln(1 - thr / S) / c, by hand
    s, thr, c = 64 * M, 8 * M, 0.020
    want = -s * math.log(1 - thr / s) / c
    got = convergence_limit(256 * M, float("inf"), c, s, thr, 10, first_s=0.06)
    assert math.isclose(got, want, rel_tol=1e-6)
    assert len(model_rounds(256 * M, float("inf"), c, 0.99 * want, s, thr, 10, first_s=0.06)) < 12
    assert len(model_rounds(256 * M, float("inf"), c, 1.01 * want, s, thr, 10, first_s=0.06)) == 12
    assert math.isnan(convergence_limit(256 * M, float("nan"), c, s, thr, 10))  # no fit
    assert math.isnan(convergence_limit(256 * M, float("inf"), 0.0, s, thr, 10))  # converges at any rate


def test_precopy_rounds_are_dirty_bytes_and_a_slow_guest_converges() -> None:
    rows = precopy_rows(64, 20, 16, seed=3, repetitions=2)
    w, c = fit_rounds(rows, stop_round=True)
    assert w > 0 and c >= 0  # every save has a round after round 0: the stop's
    for r in rows:
        d = r["details"]
        assert d["bytes_per_round"][0] == 64 * M  # round 0: all of RAM
        assert len(d["bytes_per_round"]) == len(d["round_s"]) == len(d["written_per_round"]) == r["iterations"]
        assert len(d["writes_per_round"]) == r["iterations"]
        assert all((n > 0) == (w > 0) for n, w in zip(d["writes_per_round"], d["written_per_round"], strict=True))
        assert d["written_per_round"][0] == 64 * M  # round 0 writes all of RAM
        assert r["round0_s"] == d["round_s"][0] > 0
        assert all(b <= 16 * M + 2 * M for b in d["bytes_per_round"][1:])  # never more than the working set (+ code, stack)
        assert r["iterations"] < d["max_rounds"] + 2  # 20 MiB/s converges well before the round limit
        assert d["bytes_per_round"][-1] <= 16 * M  # the stop writes at most one working set
    assert np.all(np.isfinite([r["downtime_ms"] for r in rows]))
