"""lab.restore: the definitions of the restore figures, and one small run of every policy."""

from __future__ import annotations

import numpy as np
import pytest

from lab.restore import (
    CHUNK,
    CONTROL,
    RestoreSpec,
    _samples_since,
    rate_between,
    recovery_ms,
    restore_experiment,
    steady_rate,
    summarize,
    table,
    timeline,
)
from lab.spec import load_engines, resumes_early, waits_for_complete


def _samples(points: list[tuple[float, float]]) -> np.ndarray:
    """Lab-port rows (vclock, host_ns, iterations, ...) from (seconds, iterations) points."""
    arr = np.zeros((len(points), 6), dtype=np.uint64)
    for i, (t, it) in enumerate(points):
        arr[i, 1], arr[i, 2] = int(t * 1e9), int(it)
    return arr


def test_recovery_is_the_first_window_at_the_level() -> None:
    # 1000 it/s until t=1 (the command); stopped until 1.1 (RESUME); 200 it/s until 1.3; then 1000 it/s
    pts = [(t / 1000, t) for t in range(0, 1001)]
    base = 900
    pts += [(1.1 + k / 1000, base + 0.2 * k) for k in range(0, 201)]
    pts += [(1.3 + k / 1000, base + 40 + k) for k in range(1, 701)]
    s = _samples(pts)
    rate0 = rate_between(s, int(0.5e9), int(1e9))
    assert abs(rate0 - 1000) < 1
    r = recovery_ms(s, int(1e9), int(1.1e9), rate0)
    assert abs(r["first_progress_ms"] - 100) < 1.5
    # the 20 ms window first reaches 90% when at least 18 of its ms run at full speed: t = 1.3 - 2 ms
    assert 295 <= r["to90_ms"] <= 300
    assert 285 <= r["to50_ms"] <= 300
    tl = timeline(s, int(1e9), int(1.1e9), rate0, step_ms=50, span_ms=(-100, 500))
    assert tl["t_ms"][0] == -100 and tl["rate_frac"][0] > 0.9  # before the command: full speed
    assert tl["rate_frac"][2] == 0.0  # stopped
    assert 0.1 < tl["rate_frac"][5] < 0.3 and tl["rate_frac"][-1] > 0.9
    longer = timeline(s, int(1e9), int(1.1e9), rate0, step_ms=50, span_ms=(-100, 1500))
    frac = np.array(longer["rate_frac"])
    t = np.array(longer["t_ms"])
    assert np.isnan(frac[t >= 1000]).all() and not np.isnan(frac[t < 950]).any()  # the samples end at +1 s


def test_a_level_never_reached_is_nan() -> None:
    s = _samples([(t / 1000, t) for t in range(0, 1001)] + [(1.1 + k / 1000, 900 + 0.1 * k) for k in range(300)])
    r = recovery_ms(s, int(1e9), int(1.1e9), 1000.0)
    assert np.isnan(r["to90_ms"]) and np.isnan(r["to50_ms"])


def test_every_policy_restores_and_the_first_recording_is_used_next() -> None:
    spec = RestoreSpec(ram_mib=96, ws_mib=8, runs=1, seed=4, horizon_s=0.6, settle_s=0.3, control=True,
                       disk_floor=True)
    res = restore_experiment(spec)
    # the run's bare read of the working set's size from the snapshot's image (lab/diskfloor.py)
    assert [(d["run"], d["bytes"]) for d in res["disk"]] == [(0, 8 << 20)]
    assert res["disk"][0]["serial_ms"] > 0 and res["disk"][0]["parallel_ms"] > 0
    assert [r["policy"] for r in res["rows"]] == [*load_engines(), CONTROL]
    control = res["rows"][-1]  # the same watch with nothing sent: nothing stopped, nothing read
    assert control["resume_ms"] == 0.0 and control["faults"] == 0 and control["bytes_read"] == 0
    assert control["rate_before"] > 0
    # its watch starts at its own instant, with RESUME taken as that instant (nothing stopped)
    assert control["timeline"]["t_ms"][0] == -200.0 and control["stopped_ms"] == 0.0
    rows = res["rows"][:-1]
    ws = spec.workload()
    assert ws.ws_offset % CHUNK == 0 and ws.base + (8 << 20) <= 96 << 20
    want = set(range(ws.base // CHUNK, (ws.base + (8 << 20)) // CHUNK))
    recorded = [r for r in res["warm"] if r["recorded_set"]]
    assert len(recorded) == 1 and want <= set(recorded[0]["recorded_set"])  # the first restore records
    for r in rows:
        assert r["resume_ms"] <= r["first_progress_ms"]
        # the first instruction after RESUME was stamped, and it precedes the first progress
        assert r["resume_ms"] <= r["first_instr_ms"] <= r["first_progress_ms"]
        assert r["stopped_ms"] <= r["resume_ms"]
        # the guest ran to the end of the watch: its rate there is a rate (NaN only where the
        # samples had a gap at the window's start, which a loaded 2-CPU host can make)
        assert r["rate_before"] > 0 and not r["rate_after"] <= 0
        if not resumes_early(r["policy"]):
            assert r["faults"] == 0 and r["resident_s"] == 0.0
        else:
            assert r["bytes_read"] > 0
            if waits_for_complete(r["policy"]):
                # nothing is filled before job-complete, so the guest's progress took faults; a
                # filler may win every race on a busy host (then a background load has none)
                assert r["faults"] > 0
        if r["loading_set"]:
            assert r["loading_set"] == recorded[0]["recorded_set"]
    assert any(r["loading_set"] for r in rows)  # prefetch used what was recorded
    for r in rows:  # an on-demand load fills the rest only once told to, at the horizon
        if waits_for_complete(r["policy"]):
            assert r["resident_s"] >= spec.horizon_s - r["resume_ms"] / 1e3 - 0.01
    assert set(summarize(rows)) == set(load_engines())
    assert set(summarize(res["rows"])) == {*load_engines(), CONTROL}


def test_the_steady_rate_is_a_median_of_short_windows() -> None:
    # 1000 it/s for a second, except 100 ms at 3000 it/s: the mean over the span is 1200 it/s,
    # the steady rate (median of 20 ms windows) is 1000
    pts, it = [], 0.0
    for k in range(0, 1001):
        pts.append((k / 1000, it))
        it += 3.0 if 400 <= k < 500 else 1.0
    s = _samples(pts)
    assert abs(rate_between(s, 0, int(1e9)) - 1200) < 5
    assert abs(steady_rate(s, 0, int(1e9)) - 1000) < 5
    assert np.isnan(steady_rate(s, int(2e9), int(3e9)))  # no samples there


def test_the_steady_rate_needs_no_sample_right_at_the_command() -> None:
    # 1000 it/s for a second, then no sample in the last 200 ms before the command (a 2-core
    # host did this): the reference is still the rate, and a load's reset counter after the
    # command (iterations back to 0) is not part of it
    pts = [(k / 1000, float(k)) for k in range(0, 801)] + [(1.0 + k / 1000, float(k)) for k in range(1, 50)]
    s = _samples(pts)
    assert abs(steady_rate(s, 0, int(1e9)) - 1000) < 5
    assert np.isnan(steady_rate(s[:801], 0, int(2e9)))  # samples over less than half the span


def test_the_restore_figure_draws_a_policy_without_reference_as_absent() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from lab.plot import restore_figure

    t = {"t_ms": [0.0, 5.0, 10.0], "rate_frac": [0.5, 1.0, 1.0]}
    none = {"t_ms": [0.0, 5.0, 10.0], "rate_frac": [float("nan")] * 3}
    rows = [{"policy": "blocking", "timeline": none, "to50_ms": float("nan"), "to90_ms": float("nan")},
            {"policy": "prefetch", "timeline": t, "to50_ms": 1.0, "to90_ms": 6.0}]
    fig = restore_figure(rows)
    labels = [h.get_label() for h in fig.axes[0].get_legend().get_lines()]
    assert labels == ["blocking (no reference rate)", "prefetch"]


def test_the_samples_before_a_command_reach_back_over_the_settle_span() -> None:
    """A fast guest reports ~100,000 samples a second: a fixed count of the last samples (the
    old 200,000) did not always reach back 2 s, and the reference rate came out NaN."""

    class Lab:
        def __init__(self, ts: np.ndarray) -> None:
            self.rows = np.zeros((len(ts), 6), dtype=np.uint64)
            self.rows[:, 1] = ts

        def history_array(self, last: int | None = None) -> np.ndarray:
            return self.rows[-last:] if last else self.rows

    class M:
        def __init__(self, lab: Lab) -> None:
            self.lab = lab

    ts = np.arange(1_000_000, dtype=np.uint64) * 10_000  # 100,000 a second over 10 s
    got = _samples_since(M(Lab(ts)), int(ts[-1]) - 2_500_000_000)  # type: ignore[arg-type]
    assert int(got[0, 1]) <= int(ts[-1]) - 2_500_000_000 and len(got) < len(ts)
    few = ts[-1000:]
    assert len(_samples_since(M(Lab(few)), 0)) == 1000  # type: ignore[arg-type]


def test_a_late_load_counts_as_later_than_the_others_not_dropped() -> None:
    from lab.stats import late_median, late_quantiles

    nan = float("nan")
    # by hand: sorted 10, 20, 30, late -> median the midpoint of 20 and 30
    assert late_median([30.0, nan, 10.0, 20.0]) == 25.0
    assert late_median([30.0, 10.0, 20.0]) == 20.0  # what dropping the late load would give: 20, not 25
    # 10, 20, late, late: the median falls between 20 and a late load: it is late
    assert np.isnan(late_median([nan, 10.0, nan, 20.0]))
    q1, q3 = late_quantiles([10.0, 20.0, 30.0, 40.0, nan], [25, 75])
    assert q1 == 20.0 and q3 == 40.0  # positions 1 and 3 of 10, 20, 30, 40, late
    assert np.isnan(late_quantiles([10.0, 20.0, nan, nan, nan], [75])[0])
    assert np.isnan(late_median([]))
    with pytest.raises(ValueError, match="within 0..100"):
        late_quantiles([1.0], [-25])


def test_summarize_counts_late_loads_and_keeps_them_in_the_median() -> None:
    def row(p: str, to90: float) -> dict[str, float | str]:
        return {"policy": p, "resume_ms": 1.0, "first_instr_ms": 1.0, "first_progress_ms": 5.0, "to50_ms": 8.0,
                "to90_ms": to90, "faults": 3, "resident_s": 1.0, "bytes_read": 10, "stall_p99_ms": 1.0}

    s = summarize([row("background", v) for v in (100.0, 90.0, float("nan"), float("nan"), 95.0)]
                  + [row("prefetch", v) for v in (40.0, 50.0, 45.0)])
    assert s["background"]["to90_ms"] == 100.0  # 90, 95, 100, late, late
    assert s["background"]["to90_late"] == 2 and s["background"]["loads"] == 5
    assert np.isnan(s["background"]["to90_iqr_ms"])  # the third quartile is a late load
    assert s["prefetch"]["to90_ms"] == 45.0 and s["prefetch"]["to90_late"] == 0
    assert s["prefetch"]["to90_iqr_ms"] == 5.0  # 42.5 .. 47.5
    assert "to90_late" in table(s).splitlines()[0]
    # a load without a reference rate is unknown, not late: left out of the times to speed
    unknown = [row("prefetch", float("nan")) | {"rate_before": rb} for rb in (float("nan"), 0.0)]
    s2 = summarize([row("prefetch", v) for v in (40.0, 50.0, 45.0)] + unknown)
    assert s2["prefetch"]["to90_ms"] == 45.0 and s2["prefetch"]["to90_late"] == 0
    assert s2["prefetch"]["loads"] == 3 and s2["prefetch"]["unknown"] == 2


def test_the_restore_figure_marks_late_loads() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from lab.plot import restore_figure

    t = {"t_ms": [0.0, 5.0, 10.0], "rate_frac": [0.5, 1.0, 1.0]}
    rows = [{"policy": "background", "timeline": t, "to50_ms": 3.0, "to90_ms": v} for v in (6.0, float("nan"), 7.0)]
    rows += [{"policy": "prefetch", "timeline": t, "to50_ms": 1.0, "to90_ms": 6.0}]
    fig = restore_figure(rows)
    notes = [a.get_text() for a in fig.axes[1].texts]
    assert notes == ["1/3\nlate"]


def test_the_restore_figure_zooms_on_the_first_100_ms_and_draws_each_load() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from lab.plot import restore_figure

    t = {"t_ms": [0.0, 5.0, 10.0], "rate_frac": [0.5, 1.0, 1.0]}
    fine = {"t_ms": [0.0, 1.0, 2.0], "rate_frac": [0.0, 0.25, 1.0]}
    rows = [{"policy": "prefetch", "timeline": t, "timeline_fine": fine, "to50_ms": 1.0, "to90_ms": v} for v in (2.0, 4.0)]
    fig = restore_figure(rows, zoom=True)
    assert len(fig.axes) == 3
    assert fig.axes[1].get_lines()[0].get_ydata().tolist() == [0.0, 0.25, 1.0]  # the fine timeline, 1 ms bins
    dots = [ln for ln in fig.axes[2].get_lines() if ln.get_marker() == "o"]
    assert sorted(y for ln in dots for y in ln.get_ydata()) == [1.0, 1.0, 2.0, 4.0]  # every load's to50 and to90
    assert len(restore_figure([{k: v for k, v in r.items() if k != "timeline_fine"} for r in rows], zoom=True).axes) == 2


def test_a_long_watch_keeps_every_sample_though_the_ring_holds_fewer(monkeypatch: pytest.MonkeyPatch) -> None:
    # A guest that rings more often over a watch than the lab port's ring keeps samples: the
    # watch reads as it goes, so the first samples after the command are still there at the end.
    import types

    from emulator.devices.lab import LabPort
    from lab import restore

    lab = LabPort(lambda addr, n: bytes(n), lambda: 0, lambda code: None, keep=1024)
    clock = {"ns": 1_000_000_000}

    def ring(k: int) -> None:
        for _ in range(k):
            clock["ns"] += 1000
            lab.doorbell.append((0, clock["ns"], clock["ns"] // 1000, 0, 0, 0))

    def sleep(s: float) -> None:  # the guest rings 800 times while the watch sleeps
        ring(800)
        clock["ns"] += int(s * 1e9)

    ring(100)  # before the command
    monkeypatch.setattr(restore, "time", types.SimpleNamespace(monotonic_ns=lambda: clock["ns"], sleep=sleep))
    mark = lab.doorbell.count
    got = restore._watch(types.SimpleNamespace(lab=lab), mark, clock["ns"] + int(4.5e9), before=50)  # type: ignore[arg-type]
    ts = got[:, 1]
    assert len(got) == 50 + 5 * 800  # 50 before the command, then five reads of 800: more than the 1024 kept
    assert (np.diff(ts) > 0).all()  # in order, none twice
    assert len(lab.history_array()) == 1024  # a single read at the end would have had only these


def test_a_fine_timeline_interpolates_so_a_bin_with_one_sample_is_not_a_stall() -> None:
    """1000 iterations a second from RESUME (at 0), a sample every 2 ms: a 1 ms bin holds one
    sample at most, which counting between samples reads as 0 and interpolating at the bins'
    edges reads as the rate, by hand 1.0 of it."""
    from lab.restore import timeline

    pts = [(k * 0.002, k * 2) for k in range(0, 201)]  # (s, iterations)
    s = _samples(pts)
    counted = timeline(s, 0, 0, 1000.0, step_ms=1.0, span_ms=(0.0, 200.0))["rate_frac"]
    fine = timeline(s, 0, 0, 1000.0, step_ms=1.0, span_ms=(0.0, 200.0), interpolate=True)["rate_frac"]
    assert max(counted[:199]) == 0.0  # every bin has one sample or none
    assert np.allclose(fine[:199], 1.0)


def test_lazy_windows_draws_each_lazy_policy_and_counts_what_came_later() -> None:
    from lab import plot

    lazy = [p for p in load_engines() if p != "blocking"]
    # RESUME 1 ms after the command; chunk 0 by a fault at 0.5 ms after RESUME, chunk 1 by the
    # set at 3 ms, chunk 2 by the rest at 150 ms (after the 100 ms drawn), chunk 3 all zero
    rows = [{"policy": p, "resume_ms": 1.0, "to90_ms": 5.0, "faults": 1, "resident_s": 0.2, "chunks": 4,
             "timeline_fine": {"t_ms": [0.0, 1.0, 2.0], "rate_frac": [0.0, 0.5, 1.0]},
             "fault_at_ms": [0.4], "fault_chunk": [0],
             "fill_log": [[0.5, 0, 0, 0], [3.0, 1, 1, 0], [150.0, 2, 2, 0], [4.0, 3, 2, 1]]} for p in lazy]
    rows.append({"policy": "blocking", "fill_log": []})  # no map: left out
    fig = plot.lazy_windows(rows)
    assert len(fig.axes) == 2 * len(lazy)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("1 chunks came in later\n(all in 0.20 s after RESUME)") == len(lazy)


def test_the_noise_floor_waits_from_every_instant_of_a_control_watch() -> None:
    from lab.restore import noise_floor, waits_to_level
    t = list(np.arange(-200.0, 1000.0, 5.0))
    frac = [0.0 if x < 0 else (0.5 if 100 <= x < 300 else 1.0) for x in t]  # half speed from 100 to 300 ms
    row = {"policy": CONTROL, "timeline": {"t_ms": t, "rate_frac": frac}}
    w = waits_to_level(row, 0.9, every_ms=20.0, min_left_ms=500.0)
    # starts 0, 20, ..., 500 ms (at least 500 ms of the watch after each); from 100 on, the first
    # 20 ms window at full speed starts at 300
    assert list(w) == [0.0] * 5 + [200.0 - 20 * k for k in range(10)] + [0.0] * 11
    nf = noise_floor([row, {"policy": "prefetch", "timeline": {"t_ms": t, "rate_frac": [0.0] * len(t)}}])
    assert nf["starts"] == 26 and nf["max_ms"] == 200.0
    assert nf["share_200ms"] == pytest.approx(1 / 26) and nf["share_60ms"] == pytest.approx(8 / 26)


def test_the_table_leaves_a_loads_columns_blank_for_the_control() -> None:
    from lab.restore import table
    row = {"resume_ms": 0.8, "first_progress_ms": 10.0, "to50_ms": 20.0, "to90_ms": 30.0, "to90_iqr_ms": 5.0,
           "to90_late": 0.0, "faults": 12.0, "stall_p99_ms": 1.1, "resident_s": 2.0}
    lines = table({"prefetch": row, CONTROL: row | {"faults": 0.0}}).splitlines()
    assert lines[1].split()[1:] == ["0.8", "10.0", "20.0", "30.0", "5.0", "0.0", "12.0", "1.1", "2.0"]
    assert lines[2].split() == [CONTROL, "-", "10.0", "20.0", "30.0", "5.0", "0.0", "-", "-", "-"]


def test_a_paced_restore_guest_stamps_big_batches_and_its_watch_timeline_is_interpolated() -> None:
    from lab.restore import PACED_BATCH, _progress_fields

    spec = RestoreSpec(ram_mib=256, ws_mib=16, rate_mib_s=3000)
    w = spec.workload()
    assert w.rate == 3000 << 20 and w.batch_pages == PACED_BATCH
    assert RestoreSpec(ram_mib=256, ws_mib=16).workload().rate == 0  # unpaced by default
    # a batch of 4096 pages every 5.33 ms from 2 s before the command (at 0) to 1 s after it,
    # RESUME at 1 ms: the 5 ms bins hold one report or none, and still read as the pace
    period = PACED_BATCH * 4096 / (3000 << 20)
    pts = [(k * period, (k + 400) * PACED_BATCH) for k in range(-int(2 / period), int(1 / period))]
    s = _samples([(t + 2.0, it) for t, it in pts])  # host ns from 0
    before, after = s[s[:, 1] < int(2e9)], s
    row = _progress_fields(before, after, int(2e9), int(2e9) + 1_000_000, spec)
    frac = np.asarray(row["timeline"]["rate_frac"])
    t = np.asarray(row["timeline"]["t_ms"])
    watched = frac[(t >= 20) & (t < 900)]
    assert np.allclose(watched, 1.0, atol=0.05)  # (counted between reports, half the bins would read 0)
    # (synthetic samples, no clock: nothing held the guest back, so it is at 90% within the
    # first 20 ms window that starts after RESUME)
    from lab.restore import WINDOW_NS
    assert row["to90_ms"] <= 1.0 + WINDOW_NS / 1e6
