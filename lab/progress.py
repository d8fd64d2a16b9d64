"""A guest's progress between two instants, from its progress samples and its stops.

Both systems report progress in batches: a sample every few (tens of) milliseconds, none while
the guest is stopped.  Interpolating the iteration count linearly in wall time between the two
samples around a stop spreads the batch across the stop, so a short window that is mostly
stop (a blocking save of a small guest: 23 ms stopped in a 24 ms job) was credited with
progress the guest could not have made (measured: 0.42 of its rate before, where the stop
alone bounds it at 0.05).  The guest makes no progress while stopped, and the STOP and RESUME
events say when that was: so the count is interpolated in *running time* (wall time minus the
stopped time before it) instead.  With no stop in the window the two are the same.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np


def stops_monotonic_ns(events: Iterable[tuple[str, float]]) -> list[tuple[float, float]]:
    """[STOP, RESUME] intervals on the monotonic clock (ns) from ``(event name, wall-clock
    seconds)`` pairs in order, as QMP stamps its events on both systems; the offset between
    the two clocks is taken now.  A STOP not resumed yet makes no interval."""
    off = time.time_ns() - time.monotonic_ns()
    out: list[tuple[float, float]] = []
    stop: float | None = None
    for name, t in events:
        if name == "STOP" and stop is None:
            stop = t * 1e9 - off
        elif name == "RESUME" and stop is not None:
            out.append((stop, t * 1e9 - off))
            stop = None
    return out


def running_time(t: np.ndarray, stops: Sequence[tuple[float, float]]) -> np.ndarray:
    """``t`` minus the time spent in ``stops`` ([stop, resume] intervals, the same clock) before it."""
    r = np.asarray(t, dtype=np.float64).copy()
    for s, e in stops:
        if e > s:
            r -= np.clip(np.minimum(t, e) - s, 0.0, None)
    return r


def iterations_at(ts: np.ndarray, its: np.ndarray, at: Sequence[float],
                  stops: Sequence[tuple[float, float]] = ()) -> np.ndarray:
    """The iteration count at the instants ``at``, interpolated between the samples
    (``ts``, ``its``) in running time: flat through every stop."""
    return np.asarray(np.interp(running_time(np.asarray(at, dtype=np.float64), stops),
                                running_time(np.asarray(ts, dtype=np.float64), stops),
                                np.asarray(its, dtype=np.float64)), dtype=np.float64)


def rate(ts: np.ndarray, its: np.ndarray, start: float, end: float,
         stops: Sequence[tuple[float, float]] = (), per_second: float = 1e9) -> float:
    """Iterations per second over [start, end] (``per_second`` clock units a second; nan
    unless the samples cover the window)."""
    if len(ts) < 2 or ts[0] > start or ts[-1] < end or end <= start:
        return float("nan")
    a, b = iterations_at(ts, its, [start, end], stops)
    return float((b - a) / ((end - start) / per_second))
