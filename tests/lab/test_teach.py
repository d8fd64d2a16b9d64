"""The model and fit helpers notebook 5 teaches with (lab.teach), without timing anything."""

from __future__ import annotations

import math

import pytest

from lab import teach


def test_theil_sen_ignores_one_outlier() -> None:
    xs = [1, 2, 3, 4, 5, 6]
    ys = [3 + 2 * x for x in xs]
    ys[2] = 500.0  # one slow repetition
    a, b = teach.theil_sen(xs, ys)
    assert b == pytest.approx(2.0) and a == pytest.approx(3.0)
    with pytest.raises(ValueError, match="two different x"):
        teach.theil_sen([1, 1], [2, 3])


def test_stop_model_and_prediction() -> None:
    """The scan is fitted against the RAM it read (not the RAM size: chunks the page tables show
    as never written are not read), the writes against the RAM in use."""
    rows = [{"ram_mib": ram, "working_set_mib": use, "vmstate_mib": use, "scanned_mib": use + 2 * (ram // 64),
             "zero_scan_ms": 1 + 0.05 * (use + 2 * (ram // 64)), "write_ms": 2 + 0.5 * use, "commit_ms": 3.0}
            for ram in (64, 128, 256) for use in (16, 32) for _ in range(2)]
    rows[0] = {**rows[0], "zero_scan_ms": 90.0}  # a disturbed repetition: the fastest one counts
    m = teach.stop_model(rows)
    assert m["scan_ms_per_mib_read"] == pytest.approx(0.05) and m["write_ms_per_mib_in_use"] == pytest.approx(0.5)
    assert m["scan_ms"] == pytest.approx(1) and m["write_ms"] == pytest.approx(2)
    p = teach.predict_stop(m, 80, 64)
    assert p["zero_scan_ms"] == pytest.approx(1 + 0.05 * 80) and p["write_ms"] == pytest.approx(34)
    assert p["downtime_ms"] == pytest.approx(p["zero_scan_ms"] + p["write_ms"] + 3.0)


def test_ram_in_use_model() -> None:
    assert teach.ram_in_use_predicted(32, 0) == 0
    assert teach.ram_in_use_predicted(32, 52) == pytest.approx(32 * (1 - math.exp(-52 / 32)))
    assert teach.ram_in_use_predicted(256, 1) == pytest.approx(1, rel=0.01)  # few repeats in a large set
    assert teach.ram_in_use_predicted(16, 1000) == pytest.approx(16)


def test_written_before_save_and_rates() -> None:
    row = {"details": {"timeline": [(-0.2, 256), (-0.01, 512), (0.05, 1024)]}, "vmstate_bytes": 64 << 20,
           "total_s": 0.5, "downtime_ms": 250.0}
    assert teach.written_before_save_mib(row) == pytest.approx(2.0)
    assert teach.mib_per_s([row]) == [pytest.approx(128.0)]
    assert teach.mib_per_s([row], "downtime_ms") == [pytest.approx(256.0)]


def test_race_row_counts_answers_while_stopped() -> None:
    ev = {"STOP": 10.0, "RESUME": 10.5}
    answers = [(9.99, "running"), (10.1, "save-vm"), (10.2, "save-vm"), (10.6, "running")]
    r = teach._race_row("snaplab", 0, 9.98, 9.985, answers, ev, None, 1 << 20, t_sent=9.985)
    assert r["status_seen"] == "running" and r["answers_while_stopped"] == 2
    assert r["first_answer_while_stopped_ms"] == pytest.approx(100.0)
    assert r["status_sent_ms"] == pytest.approx(-15.0)  # sent before the stop: why it says running
    q = teach._race_row("QEMU 7.2", 0, 9.9, 10.6, [(10.6, "running")], ev, None, 1 << 20, t_sent=9.9)
    assert q["answers_while_stopped"] == 0 and not q["status_answered_before_resume"]
    assert q["status_sent_ms"] == pytest.approx(-100.0)


def test_undisturbed_takes_the_fastest_repetition() -> None:
    rows = [{"ram_mib": 64, "working_set_mib": 16, "vmstate_mib": 16.0, "zero_scan_ms": z, "write_ms": w, "commit_ms": 2.0}
            for z, w in ((5, 9), (6, 400), (7, 8))]
    (p,) = teach.undisturbed(rows)
    assert (p["zero_scan_ms"], p["write_ms"], p["n"]) == (5, 8, 3)


def test_the_scan_of_never_written_ram_is_timed_on_real_zero_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """A positive, finite cost per MiB, from the save's own scanner run over read-mapped memory
    never written (it finds no non-zero page there), once per repetition."""
    from emulator.migration.engines import save_blocking

    seen: list[tuple[int, int]] = []
    scan = save_blocking.nonzero_pages

    def spy(ram, threads=1):  # type: ignore[no-untyped-def]
        out = scan(ram, threads)
        seen.append((ram.size, int(out.sum())))
        return out

    monkeypatch.setattr(save_blocking, "nonzero_pages", spy)
    cost = teach.never_written_scan_ms_per_mib(mib=16, reps=2)
    assert 0 < cost < math.inf
    assert seen == [(16 << 20, 0), (16 << 20, 0)]


def test_cow_window_summary_counts_by_hand() -> None:
    # RESUME 2 ms after the command; the saver's first span at 3 ms, its front at the end at 9 ms;
    # faults at 0.5 and 1 ms (copied) and at 4 ms (waited); the guest's first sample after RESUME
    # 3 ms after it (2.005 s: 5 ms after the command)
    row = {"details": {"stopped": (0.001, 0.002), "job_s": 0.02,
                       "timeline": [(-0.5, 0), (0.0005, 100), (0.005, 150), (0.006, 250), (0.009, 300)],
                       "sweep": [(3.0, 0), (6.0, 8), (9.0, 16)], "chunks": 16,
                       "fault_at_ms": [0.5, 1.0, 4.0], "fault_chunk": [3, 9, 12],
                       "fault_latency_ms": [0.2, 0.3, 1.5], "fault_copy_ms": [0.15, 0.2, 0.0]}}
    s = teach.cow_window_summary(row)
    assert s["saver_start_ms"] == 3.0 and s["saver_end_ms"] == 9.0
    assert (s["faults"], s["faults_before_saver"], s["faults_copied"], s["faults_waited"]) == (3, 2, 2, 1)
    assert s["first_progress_ms"] == pytest.approx(3.0)
    # the last fault was served at 4 + 1.5 ms: the first sample after it, 7 ms after RESUME
    assert s["last_fault_served_ms"] == pytest.approx(5.5) and s["fault_ms_sum"] == pytest.approx(2.0)
    assert s["first_progress_after_faults_ms"] == pytest.approx(7.0)


def test_cow_window_summary_rates_by_stretch() -> None:
    # 1000 iterations a second before the command; flat while the faults are served (RESUME at
    # 2 ms, the last fault served 5.5 ms after it), then 1000 a second again
    row = {"details": {"stopped": (0.001, 0.002), "job_s": 0.02,
                       "timeline": [(-1.0, 0), (0.0, 1000), (0.002, 1002), (0.0075, 1002), (0.011, 1005.5), (0.02, 1014.5)],
                       "sweep": [(3.0, 0), (9.0, 16)], "chunks": 16, "fault_at_ms": [0.5, 4.0], "fault_chunk": [3, 9],
                       "fault_latency_ms": [0.2, 1.5], "fault_copy_ms": [0.15, 0.2]}}
    s = teach.cow_window_summary(row)
    assert s["rate_faults"] == pytest.approx(0.0, abs=1e-9)
    assert s["rate_saver"] == pytest.approx(1.0) and s["rate_writers"] == pytest.approx(1.0)
    row["details"]["sweep"] = [(3.0, 0), (5.9, 16)]  # the front at the end 0.4 ms after the last fault: no rate
    assert teach.cow_window_summary(row)["rate_saver"] != teach.cow_window_summary(row)["rate_saver"]


def test_typical_phases_pick_the_median_save_and_add_up() -> None:
    def row(ram: int, ws: int, rep: int, down: float, scan: float) -> dict:
        return {"ram_mib": ram, "working_set_mib": ws, "rep": rep, "downtime_ms": down, "zero_map_ms": 0.5,
                "zero_scan_ms": scan, "write_ms": 10.0, "commit_ms": 1.0}
    rows = [row(64, 16, 0, 30.0, 1.0), row(64, 16, 1, 20.0, 2.0), row(64, 16, 2, 25.0, 3.0),
            row(128, 16, 0, 40.0, 4.0), row(128, 16, 1, 14.0, 2.0)]  # even count: the lower middle
    typ = teach.typical_phases(rows)
    assert [(t["ram_mib"], t["rep"], t["n"]) for t in typ] == [(64, 2, 3), (128, 1, 2)]
    assert typ[0]["rest_ms"] == pytest.approx(25.0 - 0.5 - 3.0 - 10.0 - 1.0)
    assert typ[1]["rest_ms"] == pytest.approx(14.0 - 0.5 - 2.0 - 10.0 - 1.0)
    for t in typ:
        assert sum(t[k] for k, _ in teach.STOP_PHASES) == pytest.approx(t["downtime_ms"])
    fig = teach.phase_figure(rows)
    assert len(fig.axes[0].patches) == len(teach.STOP_PHASES) * 2


def test_engines_spread_points_draws_min_max_below_five_saves_and_the_iqr_from_five() -> None:
    """Three saves: the spread line runs from the lowest to the highest (an interquartile range
    of three values would be interpolated, drawing values no save had); five: the quartiles."""
    import numpy as np

    from lab import plot

    def spread_lines(vals: list[float]) -> tuple[list[tuple[float, ...]], list[str]]:
        rows = [{"engine": "cow", "downtime_ms": v, "total_s": v, "progress_during_save": v} for v in vals]
        fig = plot.engines_spread_points(rows, ["cow"], "test")
        out = []
        for ax in fig.axes:
            lines = [ln for ln in ax.get_lines() if len(ln.get_ydata()) == 2 and ln.get_linewidth() == 2]
            assert len(lines) == 1
            out.append(tuple(float(y) for y in lines[0].get_ydata()))
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        return out, labels

    three, labels = spread_lines([1.0, 2.0, 10.0])
    assert three == [(1.0, 10.0)] * 3 and any("min-max" in t for t in labels)
    five, labels = spread_lines([1.0, 2.0, 3.0, 4.0, 10.0])
    q1, q3 = np.percentile([1.0, 2.0, 3.0, 4.0, 10.0], [25, 75])
    assert five == [(q1, q3)] * 3 and "interquartile range" in labels
