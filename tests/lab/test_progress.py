"""lab.progress: a stop inside the window is not credited with progress."""

from __future__ import annotations

import numpy as np

from lab.progress import iterations_at, rate, running_time


def _guest() -> tuple[np.ndarray, np.ndarray]:
    """One iteration per ms of running; a sample every 20 ms; stopped over [101, 161], no
    sample then; the first sample after at 180 ms (120 ms of running)."""
    ts = np.array([0, 20, 40, 60, 80, 100, 180, 200], dtype=float)
    return ts, running_time(ts, [(101.0, 161.0)])


def test_running_time_subtracts_the_stops_before_each_instant() -> None:
    got = running_time(np.array([50.0, 101.0, 130.0, 161.0, 200.0]), [(101.0, 161.0), (300.0, 310.0)])
    assert got.tolist() == [50.0, 101.0, 101.0, 101.0, 140.0]


def test_a_window_that_is_mostly_stop_gets_only_its_running_part() -> None:
    ts, its = _guest()
    stops = [(101.0, 161.0)]
    # [105, 165]: the guest ran over [161, 165] only, 4 iterations (by hand)
    assert iterations_at(ts, its, [105.0, 165.0], stops).tolist() == [101.0, 105.0]
    assert rate(ts, its, 105.0, 165.0, stops, per_second=1000.0) == 4 / 0.060
    # linear in wall time it would have been (116.25 - 101.25) / 0.060: 3.75x too much
    assert np.interp([105.0, 165.0], ts, its).tolist() == [101.25, 116.25]


def test_without_a_stop_it_is_plain_interpolation_and_nan_outside_the_samples() -> None:
    ts, its = np.array([0.0, 10.0, 20.0]), np.array([0.0, 5.0, 20.0])
    assert rate(ts, its, 5.0, 15.0, per_second=1.0) == (12.5 - 2.5) / 10
    assert np.isnan(rate(ts, its, 5.0, 25.0, per_second=1.0))


def test_a_monitors_stop_and_resume_events_become_monotonic_intervals() -> None:
    import time

    from lab.reproduce import stops_ns

    def ev(name: str, t: float) -> dict[str, object]:
        sec = int(t)
        return {"event": name, "timestamp": {"seconds": sec, "microseconds": round((t - sec) * 1e6)}}

    now = time.time()
    got = stops_ns([ev("STOP", now - 2.0), ev("JOB_STATUS_CHANGE", now - 1.9), ev("RESUME", now - 1.5),
                    ev("STOP", now - 1.0)])  # (a stop not resumed yet is no interval)
    assert len(got) == 1
    mono = time.monotonic_ns()
    assert abs((got[0][1] - got[0][0]) / 1e9 - 0.5) < 1e-5
    assert abs((mono - got[0][0]) / 1e9 - 2.0) < 0.05
