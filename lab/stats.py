"""Summary statistics for repeated measurements: medians done right, and their spread.

The median of an even number of values is the midpoint of the two middle ones (not the upper
one); the spread is the interquartile range (linear interpolation between order statistics,
numpy's default, so it matches what a reader computes by hand), a bootstrap 95% confidence
interval of the median (percentile method, a fixed seed so tables are reproducible), and
min-max, which is what a table shows when there are fewer than five values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def median(values: Sequence[float]) -> float:
    """The median; the midpoint of the two middle values when there are an even number."""
    if not values:
        return float("nan")
    s = sorted(values)
    n = len(s)
    mid = n // 2
    return float(s[mid]) if n % 2 else (float(s[mid - 1]) + float(s[mid])) / 2


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """(first quartile, third quartile), linear interpolation between order statistics."""
    if not values:
        return float("nan"), float("nan")
    q1, q3 = np.percentile(np.asarray(values, dtype=float), [25, 75])
    return float(q1), float(q3)


def late_quantiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Quantiles (0-100, linear, so the median of an even count is the midpoint) of times to an
    event where NaN means "not within the watch": counted as later than every measured one
    (+inf), not dropped, since dropping a late load would make a policy look faster.  A
    quantile that falls on or between late loads is itself late: NaN."""
    if any(not 0 <= q <= 100 for q in qs):
        raise ValueError(f"late_quantiles: quantiles must be within 0..100, not {list(qs)}")
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return [float("nan")] * len(qs)
    v = np.sort(np.where(np.isnan(v), np.inf, v))
    out = []
    for q in qs:
        pos = (len(v) - 1) * q / 100.0
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        if not (np.isfinite(v[lo]) and np.isfinite(v[hi])):
            out.append(float("nan"))
        else:
            out.append(float(v[lo] + (v[hi] - v[lo]) * (pos - lo)))
    return out


def late_median(values: Sequence[float]) -> float:
    """:func:`late_quantiles`' median: NaN when half the loads or more were late."""
    return late_quantiles(values, [50])[0]


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap confidence interval of the median (nan for fewer than 2 values)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    a = np.asarray(values, dtype=float)
    draws = a[rng.integers(0, len(a), size=(resamples, len(a)))]
    meds = np.median(draws, axis=1)
    lo, hi = np.percentile(meds, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Summary:
    """n, median, quartiles, bootstrap CI of the median, min and max of one set of values."""

    n: int
    median: float
    q1: float
    q3: float
    ci_lo: float
    ci_hi: float
    min: float
    max: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def spread(self) -> str:
        """The spread a table shows: IQR and the CI from five values on, min-max below that.

        Where the bootstrap CI is the min-max (always with five values: a resampled median is
        the smallest value in 5.8% of the draws, more than the 2.5% a bound leaves out), it
        is printed as what it is, ``min-max``."""
        if self.n < 5:
            return f"min-max {_fmt(self.min)}-{_fmt(self.max)}"
        if (self.ci_lo, self.ci_hi) == (self.min, self.max):
            return f"IQR {_fmt(self.q1)}-{_fmt(self.q3)}, min-max {_fmt(self.min)}-{_fmt(self.max)}"
        return f"IQR {_fmt(self.q1)}-{_fmt(self.q3)}, 95% CI {_fmt(self.ci_lo)}-{_fmt(self.ci_hi)}"


def summarize(values: Sequence[float]) -> Summary:
    vals = [float(v) for v in values if not math.isnan(float(v))]
    if not vals:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan, nan, nan)
    q1, q3 = quartiles(vals)
    lo, hi = bootstrap_ci(vals)
    return Summary(len(vals), median(vals), q1, q3, lo, hi, min(vals), max(vals))


def _fmt(x: float) -> str:
    """Three significant digits, whole numbers from 1000 on (1090, not 1.09e+03)."""
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def fmt_with_spread(s: Summary) -> str:
    """``median (spread)``: the cell every table prints for a summary."""
    return f"{_fmt(s.median)} ({s.spread()})"
