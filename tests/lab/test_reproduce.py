"""snaplab reproduce: the statistics against hand-computed values, the CSV schema and metadata of
a one-size end-to-end run against the real QEMU, bad input, and a run that fails part way."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emulator.errors import SnaplabError
from lab import repro_report, reproduce
from lab.cli import main
from lab.results import source_revision
from lab.stats import bootstrap_ci, fmt_with_spread, median, quartiles, summarize


def test_median_of_an_even_count_is_the_midpoint() -> None:
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([10.0, 20.0]) == 15.0
    assert math.isnan(median([]))


def test_quartiles_and_spread_by_hand() -> None:
    assert quartiles([1.0, 2.0, 3.0, 4.0]) == (1.75, 3.25)  # linear: 1 + 0.75*(2-1), 3 + 0.25*(4-3)
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)
    s = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.n, s.median, s.q1, s.q3, s.iqr, s.min, s.max) == (5, 3.0, 2.0, 4.0, 2.0, 1.0, 5.0)
    # with five values the bootstrap 95% CI of the median is the min-max, and says so
    assert (s.ci_lo, s.ci_hi) == (1.0, 5.0) and s.spread() == "IQR 2-4, min-max 1-5"
    nine = summarize([float(v) for v in range(1, 10)])  # with more values it is narrower
    assert 1.0 < nine.ci_lo < nine.median < nine.ci_hi < 9.0
    assert nine.spread() == f"IQR 3-7, 95% CI {nine.ci_lo:.3g}-{nine.ci_hi:.3g}"
    assert summarize([2.0, 1.0]).spread() == "min-max 1-2"  # fewer than five values: min-max
    assert summarize([1.0, float("nan"), 3.0]).n == 2  # nan (no measurement) is left out
    big = summarize([1086.4, 1072.0, 1119.0])  # from 1000 on, whole numbers, not 1.09e+03
    assert fmt_with_spread(big) == "1086 (min-max 1072-1119)"
    assert fmt_with_spread(summarize([0.2724, 0.25])) == "0.261 (min-max 0.25-0.272)"


def test_bootstrap_ci_of_the_median() -> None:
    vals = [1.0, 2.0, 3.0, 4.0, 100.0]
    lo, hi = bootstrap_ci(vals)
    assert (lo, hi) == bootstrap_ci(vals)  # a fixed seed: the same table every time
    assert 1.0 <= lo <= 3.0 <= hi <= 100.0
    assert bootstrap_ci([7.0] * 6) == (7.0, 7.0)
    assert all(math.isnan(x) for x in bootstrap_ci([1.0]))


@pytest.mark.parametrize(("kw", "text"), [
    ({"ram_mib": (8,)}, "--ram: 8 MiB is not allowed; expected sizes from 64 to 16384 MiB"),
    ({"ram_mib": ()}, "--ram: no size given"),
    ({"reps": 0}, "--reps: 0 is not allowed; expected 1 to 100"),
    ({"conditions": ("busy",)}, "--conditions: 'busy' is not allowed; expected idle-random, dirty"),
    ({"working_set_mib": 0}, "--ws: expected a positive working set in MiB"),
    ({"qemu_cache": "none"}, "--qemu-cache: 'none' is not allowed; expected direct, writeback"),
    ({"touched_ws": -1.0}, "--touched: -1.0 is not allowed; expected 0 to 50 working sets"),
    ({"host_noise_s": -1.0}, "host_noise_s: -1.0 is not allowed; expected 0 to 60 seconds"),
    ({"warm_mib": -1}, "--warm-mib: -1 is not allowed; expected 0 to 65536 MiB"),
    ({"conditions": ()}, "--conditions: none given; expected one or more of idle-random, dirty"),
    ({"ram_mib": (64, 1024)}, "--ram: 64 MiB is too small for the idle-random condition"),
])
def test_bad_input_names_the_field(kw: dict[str, Any], text: str) -> None:
    with pytest.raises(reproduce.ReproError, match=text.replace("(", r"\(").replace(")", r"\)")):
        reproduce.ReproSpec(**kw)


def test_cli_bad_input_and_missing_qemu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    assert main(["reproduce", "--ram", "64,abc", "--out", str(tmp_path / "x")]) == 2
    assert "--ram: '64,abc' is not a list of sizes" in capsys.readouterr().err
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["reproduce", "--ram", "128", "--ws", "16", "--reps", "1", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "qemu-system-x86_64 is not installed" in err and "--no-qemu" in err
    assert main(["reproduce", "--compare", str(tmp_path / "nothing"), "--no-qemu", "--ram", "128"]) == 2
    assert "a reproduction is a directory" in capsys.readouterr().err


def test_the_warm_is_as_asked_else_none_where_freed_memory_goes_back_else_the_rule(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert reproduce.ReproSpec(warm_mib=64).warm_bytes(1024) == (64 << 20, "--warm-mib")
    assert reproduce.ReproSpec(warm_mib=0).warm_bytes(1024) == (0, "--warm-mib")
    monkeypatch.setattr(reproduce, "reported_free_kib", lambda: 0)
    assert reproduce.ReproSpec().warm_bytes(1024) == ((3 * 1024 + 2048) << 20, "3 x RAM + 2 GiB")
    monkeypatch.setattr(reproduce, "reported_free_kib", lambda: 12345)
    n, why = reproduce.ReproSpec().warm_bytes(1024)
    assert n == 0 and "12345 KiB" in why and "hypervisor" in why
    assert main(["reproduce", "--warm-mib", "-5", "--no-qemu", "--out", str(tmp_path / "x")]) == 2
    assert "--warm-mib: -5 is not allowed" in capsys.readouterr().err


def test_a_run_that_fails_part_way_keeps_its_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    @contextlib.contextmanager
    def broken(*_: Any, **__: Any) -> Iterator[Any]:
        raise RuntimeError("qemu-system-x86_64 did not start: (simulated)")
        yield

    monkeypatch.setattr(reproduce, "qemu_guest", broken)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    spec = reproduce.ReproSpec(ram_mib=(64,), reps=1, conditions=("dirty",), working_set_mib=16, host_noise_s=0,
                               warm_mib=48)
    with pytest.raises(RuntimeError, match="simulated"):
        reproduce.reproduce(spec, tmp_path, log=lambda s: None)
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert rows and {r["system"] for r in rows} == {"snaplab"}  # the first block's rows are kept
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert [b["system"] for b in meta["blocks"]] == ["snaplab"]
    (block,) = meta["blocks"]  # the memory warmed before it: as asked, before its first row
    assert (block["warmed_bytes"], block["warm"]) == (48 << 20, "--warm-mib") and block["warm_s"] >= 0
    assert block["warmed_at"] < min(float(r["started_at"]) for r in rows)
    assert "host_noise" not in meta  # host_noise_s=0: no probe
    # every operation waited until the guest had written 7 working sets' worth of pages
    least = spec.min_iterations("dirty", 64)
    assert least == 7 * (16 << 20) // 4096
    assert all(int(r["guest_iterations"]) >= least for r in rows), [r["guest_iterations"] for r in rows]


def test_on_a_dask_cluster_a_pair_runs_on_a_timed_worker_and_a_failed_pair_keeps_its_rows(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    @contextlib.contextmanager
    def broken(*_: Any, **__: Any) -> Iterator[Any]:
        raise RuntimeError("qemu-system-x86_64 did not start: (simulated)")
        yield

    monkeypatch.setattr(reproduce, "qemu_guest", broken)  # the worker is a thread of this process
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    spec = reproduce.ReproSpec(ram_mib=(64,), reps=1, conditions=("dirty",), working_set_mib=16, touched_ws=1,
                               host_noise_s=0)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(SnaplabError, match="--resources timed=1"):
            reproduce.reproduce(spec, tmp_path / "a", log=lambda s: None, client=client)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                      resources={"timed": 1}) as cluster, Client(cluster) as client:
        with pytest.raises(reproduce.ReproError, match=r"1 of 1 \(size, condition\) pairs failed.*simulated"):
            reproduce.reproduce(spec, tmp_path / "b", log=lambda s: None, client=client)
    rows, meta = repro_report.load_runs(tmp_path / "b")
    assert rows and {r["system"] for r in rows} == {"snaplab"}  # measured before the QEMU block failed
    assert {r["host"] for r in rows} == {socket.gethostname()}
    assert [b["system"] for b in meta["blocks"]] == ["snaplab"]


def test_one_size_end_to_end_against_the_real_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-system-x86_64 is missing in CI (.ci/run installs qemu-system-x86)")
        pytest.skip("qemu-system-x86_64 is not installed")
    out = tmp_path / "repro"
    assert main(["reproduce", "--ram", "128", "--reps", "1", "--ws", "16", "--out", str(out)]) == 0
    with open(out / "runs.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == reproduce.COLUMNS
        raw = list(reader)
    rows, meta = repro_report.load_runs(out)
    have = {(r["system"], r["engine"], r["op"], r["workload"]) for r in rows}
    for wl in ("idle-random", "dirty"):
        for system in ("snaplab", "qemu"):
            assert {(system, "blocking", "save", wl), (system, "blocking", "load", wl),
                    (system, "background", "save", wl)} <= have
        assert {("snaplab", "cow", "save", wl), ("snaplab", "precopy", "save", wl),
                ("snaplab", "background", "load", wl), ("snaplab", "prefetch", "load", wl)} <= have
        assert ("snaplab", "ondemand", "load", wl) not in have  # it waits for job-complete: not in the reproduction
    assert not any(r["system"] == "qemu" and r["engine"] in ("cow", "precopy", "prefetch") for r in rows)
    assert not any(r["system"] == "qemu" and r["op"] == "load" and r["engine"] == "background" for r in rows)
    assert all(r["downtime_ms"] > 0 and r["total_s"] > 0 and r["vmstate_bytes"] > 0 for r in rows), raw
    assert all(r["steady"] for r in rows)  # both guests reached their configured pace
    paced = [r for r in rows if r["workload"] == "dirty" and r["op"] == "save"]
    assert paced and all(not math.isnan(r["progress_ratio"]) for r in paced)
    for r in paced:  # the ratio is the quotient of the two rates recorded beside it
        assert r["progress_ratio"] == pytest.approx(r["rate_during"] / r["rate_before"]), r
    assert not any(math.isnan(r["rate_before"]) for r in paced)
    for key in ("host", "kernel", "cpu", "memory", "storage", "page_cache", "versions", "definitions"):
        assert meta[key], key
    assert meta["versions"]["qemu"].startswith("QEMU emulator version")
    assert all(b["warm"] and b["warmed_bytes"] == reproduce.ReproSpec().warm_bytes(128)[0] for b in meta["blocks"]), meta["blocks"]
    assert meta["source"] == source_revision()  # the commit measured (this checkout's), and whether it was modified
    # the host's and Unicorn's own speed, probed before the first block, raw windows kept
    assert set(meta["host_noise"]) == {"host", "core", "cache", "unicorn"}
    assert all(len(meta["host_noise"][k]["rates_mups"]) == meta["host_noise"][k]["windows"] > 0
               for k in ("core", "cache", "unicorn"))
    assert len(meta["blocks"]) == 4 and any("qemu-system-x86_64" in b["command"] for b in meta["blocks"])
    for r in paced:  # the guest time lost, derived from the recorded ratio and total
        assert r["guest_lost_ms"] == pytest.approx((1 - r["progress_ratio"]) * r["total_s"] * 1e3), r
    for name in ("downtime", "total", "progress", "lost"):
        assert (out / f"{name}.png").stat().st_size > 10_000, name
    printed = capsys.readouterr().out
    # the goals are at 1 and 4 GiB: a 128 MiB run measures none of them, and says so
    goals = printed[printed.index("Issue #16's goals"):].splitlines()[1:9]
    assert len(goals) == 8 and all(g.endswith("not measured") for g in goals), goals
    assert main(["plot", str(out), "--png", str(tmp_path / "again" / "x.png"), "--committed"]) == 0
    assert "Issue #16's goals" in capsys.readouterr().out
    assert (tmp_path / "again" / "total.png").exists()
    # QEMU's image file node around the page cache by default, as snaplab's VM state
    qemu_cmd = next(b["command"] for b in meta["blocks"] if "qemu-system-x86_64" in b["command"])
    assert any('"cache": {"direct": true}' in arg for arg in qemu_cmd), qemu_cmd
    # both guests at the same share of their working set when measured
    least = reproduce.ReproSpec(working_set_mib=16).min_iterations("dirty", 128)
    assert all(r["guest_iterations"] >= least for r in rows if r["workload"] == "dirty")
    assert "QEMU / snaplab" in repro_report.compare_text(rows, rows, "itself")
    # QEMU's internal snapshot stores each page once: the background-snapshot capability is on
    # only around the migrate (with it on, QEMU 7.2's savevm sends the pages dirtied since its
    # last sync twice: twice the VM state on a first snapshot), and the idle guest's RAM holds
    # the same 64 MiB of random bytes on both.
    for wl in ("dirty", "idle-random"):
        size = {r["system"]: r["vmstate_bytes"] for r in rows
                if (r["workload"], r["op"], r["engine"]) == (wl, "save", "blocking")}
        assert size["snaplab"] <= size["qemu"] <= 1.15 * size["snaplab"], (wl, size)
    assert 64 << 20 <= size["snaplab"] < 80 << 20  # (idle-random's, the last of the loop)
    assert not any(r["excluded"] for r in rows if r["workload"] == "dirty")
    # The README's main job without QEMU: snaplab measured now, QEMU's rows from committed data.
    import lab.cli

    monkeypatch.setattr(lab.cli, "COMMITTED", out)
    capsys.readouterr()
    png = tmp_path / "compare.png"
    assert main(["compare", "--no-qemu", "--ram", "128", "--ws", "16", "--repetitions", "1",
                 "--out", str(tmp_path / "cmp"), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "from the committed reproduction" in text
    assert any(line.startswith("dirty") and " qemu " in line for line in text.splitlines())
    assert png.stat().st_size > 10_000


def test_guest_time_lost_by_hand(tmp_path: Path) -> None:
    # a 0.4 s operation at 0.9 of the rate before lost 40 ms; a 1.2 s one at 0.95, 60 ms;
    # noise above 1 comes out negative; a load (no progress ratio) has none
    assert repro_report.guest_lost_ms(0.9, 0.4) == pytest.approx(40.0)
    assert repro_report.guest_lost_ms(0.95, 1.2) == pytest.approx(60.0)
    assert repro_report.guest_lost_ms(1.02, 0.5) == pytest.approx(-10.0)
    assert math.isnan(repro_report.guest_lost_ms(math.nan, 0.5))
    # load_runs derives it for every row, and the table shows its median
    with open(tmp_path / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=reproduce.COLUMNS)
        w.writeheader()
        for rep, (ratio, total) in enumerate([(0.9, 0.4), (0.8, 0.5), (0.95, 0.6)]):
            w.writerow({"system": "snaplab", "engine": "background", "op": "save", "ram_mib": 256, "workload": "dirty",
                        "dirty_rate_mibs": 100, "working_set_mib": 128, "rep": rep, "downtime_ms": 0.3,
                        "total_s": total, "progress_ratio": ratio, "vmstate_bytes": 1 << 27, "steady": True})
    rows, _ = repro_report.load_runs(tmp_path)
    assert sorted(round(r["guest_lost_ms"], 6) for r in rows) == [30.0, 40.0, 100.0]
    line = next(x for x in repro_report.table(rows).splitlines() if x.startswith("dirty"))
    assert line.split()[-2] == "40"  # the median of 40, 100 and 30 ms, before the state MiB


def test_a_qemu_snapshot_that_stored_pages_twice_is_left_out_with_its_load() -> None:
    def row(system: str, op: str, rep: int, mib: int, wl: str = "idle-random") -> dict[str, Any]:
        return {"system": system, "engine": "blocking", "op": op, "workload": wl, "ram_mib": 256, "rep": rep,
                "vmstate_bytes": mib << 20, "downtime_ms": 10.0 * (rep + 1)}

    rows = [row("snaplab", "save", r, 192) for r in range(3)] + [row("snaplab", "load", r, 192) for r in range(3)]
    rows += [row("qemu", "save", 0, 386), row("qemu", "load", 0, 386)]  # every page stored twice
    rows += [row("qemu", "save", r, 193) for r in (1, 2)] + [row("qemu", "load", r, 193) for r in (1, 2)]
    rows += [row("snaplab", "save", 0, 200, "dirty"), row("qemu", "save", 0, 210, "dirty")]  # within 1.5x
    rows += [row("qemu", "save", 1, 310, "dirty"), row("qemu", "load", 1, 310, "dirty")]  # beyond
    repro_report.mark_excluded(rows)
    out = {(r["system"], r["op"], r["rep"], r["workload"]) for r in rows if r["excluded"]}
    assert out == {("qemu", "save", 0, "idle-random"), ("qemu", "load", 0, "idle-random"),
                   ("qemu", "save", 1, "dirty"), ("qemu", "load", 1, "dirty")}
    s = repro_report.summaries(rows, "downtime_ms")
    assert s[("idle-random", "save", "blocking", "qemu", 256)].n == 2
    assert ("idle-random", "save", "blocking", 256) in repro_report.ratios(rows)
    assert ("idle-random", "load", "blocking", 256) not in repro_report.ratios(rows)


def test_qemu_side_by_side_puts_each_runs_median_and_its_own_ratio_in_one_line() -> None:
    def rows(qemu_ms: list[float], ours_ms: list[float]) -> list[dict[str, Any]]:
        out = [{"system": system, "engine": "blocking", "op": "save", "workload": "dirty", "ram_mib": 256, "rep": i,
                "vmstate_bytes": 1 << 20, "downtime_ms": v}
               for system, vals in (("qemu", qemu_ms), ("snaplab", ours_ms)) for i, v in enumerate(vals)]
        return repro_report.mark_excluded(out)

    text = repro_report.qemu_side_by_side({"direct": rows([90, 100, 130], [9, 10, 11]),
                                           "writeback": rows([40, 50, 70, 80], [10, 10, 10, 10])})
    line = next(ln for ln in text.splitlines() if ln.startswith("dirty"))
    # medians 100 and 60 (the midpoint of 50 and 70); ratios against each run's own snaplab median
    assert "100 (" in line and "10.0x" in line and "60 (" in line and "6.0x" in line, text
    assert line.index("10.0x") < line.index("6.0x")


def test_steady_means_the_last_second_is_within_the_tolerance_of_the_configured_rate() -> None:
    """A guest still running 6% slow (as after a load or the page-cache drop) is not steady yet:
    its last second is the progress ratio's denominator, and a slow one scores above 1 later.
    A synthetic guest: 94% of its rate for 1.5 s, then its rate."""
    from emulator.guest import WorkloadSpec

    spec = WorkloadSpec("dirty", seed=1, rate=100 << 20, working_set=256 << 20)
    want = spec.rate / 4096
    t_start = time.monotonic_ns()
    t_fast = t_start + 1_500_000_000

    def its(t: int) -> float:
        slow = min(t, t_fast) - t_start
        return (0.94 * slow + max(0, t - t_fast)) * want / 1e9

    def progress() -> list[tuple[int, int]]:
        now = time.monotonic_ns()
        return [(t, int(its(t))) for t in range(t_start - 2_000_000_000, now, 10_000_000)]

    g = reproduce.Guest("synthetic", None, progress, Path("."))  # type: ignore[arg-type]
    assert reproduce.wait_steady(g, spec)
    now = time.monotonic_ns()
    before, _ = reproduce.progress_rates(g, now - 1, now)
    assert abs(before - want) <= reproduce.STEADY_TOLERANCE * want, before / want


def test_progress_over_a_common_window_by_hand() -> None:
    """snaplab: 0.2 s operations losing 40 ms (ratio 0.8); QEMU: 1.0 s losing 50 ms (0.95).
    Over QEMU's 1.0 s window snaplab's guest kept 1 - 0.040 = 0.96, QEMU's 0.95."""
    def row(system: str, rep: int, ratio: float, total: float) -> dict[str, Any]:
        return {"system": system, "engine": "background", "op": "save", "workload": "dirty", "ram_mib": 1024,
                "rep": rep, "vmstate_bytes": 1 << 28, "downtime_ms": 1.0, "total_s": total, "progress_ratio": ratio,
                "guest_lost_ms": repro_report.guest_lost_ms(ratio, total)}

    rows = [row("snaplab", i, 0.8, 0.2) for i in range(3)] + [row("qemu", i, 0.95, t) for i, t in enumerate((0.9, 1.0, 1.1))]
    rows[4]["progress_ratio"], rows[4]["guest_lost_ms"] = 0.95, 50.0  # the median QEMU run: 1.0 s, 50 ms
    rows[3]["guest_lost_ms"], rows[5]["guest_lost_ms"] = 45.0, 55.0
    repro_report.mark_excluded(rows)
    cw = repro_report.common_window_progress(rows)
    got = cw[("dirty", "save", "background", 1024)]
    assert got["window_s"] == pytest.approx(1.0)
    assert got["snaplab"] == pytest.approx(0.96) and got["qemu"] == pytest.approx(0.95)
    assert "Progress over a common window" in repro_report.table(rows)
    # a condition only one system ran has no common window
    assert len(repro_report.common_window_progress(rows[:3])) == 0


def test_goals_are_judged_from_the_medians_and_unmeasured_ones_said() -> None:
    """Blocking save 600 vs 100 ms at 1 GiB (6x: met), 400 vs 100 ms at 4 GiB (4x: not met);
    background progress 0.90 (snaplab) vs 0.80 (QEMU) at 1 GiB (met), nothing at 4 GiB."""
    def row(system: str, engine: str, rep: int, mib: int, down: float, ratio: float = math.nan) -> dict[str, Any]:
        return {"system": system, "engine": engine, "op": "save", "workload": "dirty", "ram_mib": mib, "rep": rep,
                "vmstate_bytes": 1 << 28, "downtime_ms": down, "total_s": 1.0, "progress_ratio": ratio,
                "guest_lost_ms": repro_report.guest_lost_ms(ratio, 1.0)}

    blocking = [row("qemu", "blocking", i, 1024, d) for i, d in enumerate((500.0, 600.0, 9000.0))]
    blocking += [row("snaplab", "blocking", i, 1024, d) for i, d in enumerate((90.0, 100.0, 110.0))]
    blocking += [row("qemu", "blocking", i, 4096, 400.0) for i in range(3)] + [row("snaplab", "blocking", i, 4096, 100.0) for i in range(3)]
    bg = [row("qemu", "background", i, 1024, 20.0, p) for i, p in enumerate((0.7, 0.8, 0.99))]
    bg += [row("snaplab", "background", i, 1024, 0.2, p) for i, p in enumerate((0.85, 0.9, 0.91))]
    rows = repro_report.mark_excluded(blocking + bg)
    lines = repro_report.goals_text(rows).splitlines()

    def line(*words: str) -> str:
        found = [x for x in lines if all(w in x for w in words)]
        assert len(found) == 1, (words, lines)
        return found[0]

    assert line("dirty blocking", "1024 MiB").endswith("6.0x, met")
    assert line("dirty blocking", "4096 MiB").endswith("4.0x, NOT met")
    assert line("idle-random blocking", "1024 MiB").endswith("not measured")
    assert line("dirty background save downtime", "1024 MiB").endswith("100.0x, met")
    assert line("progress", "1024 MiB").endswith("0.900 vs 0.800, met")
    assert line("progress", "4096 MiB").endswith("not measured")
    # QEMU's progress above snaplab's: not met
    for r in rows:
        if r["engine"] == "background" and r["system"] == "qemu":
            r["progress_ratio"] = 0.95
    assert repro_report.goals_text(rows).splitlines()[-2].endswith("0.900 vs 0.950, NOT met")


def test_a_figure_names_the_host_by_its_cpu() -> None:
    meta = {"started": "2026-12-06T04:54:22+0000", "host": "vm", "cpu": "AMD EPYC", "spec": {"qemu_cache": "direct"}}
    assert repro_report.source_label(meta, True) == "committed data 2026-12-06 on AMD EPYC (vm), QEMU cache.direct=on"
    assert repro_report.source_label({"host": "box"}, False) == "measured ? on box, QEMU through the page cache"


def test_the_committed_figure_marks_each_points_min_and_max_and_explains_lazy_totals() -> None:
    data = Path(__file__).resolve().parents[2] / "data" / "results" / "reproduction"
    rows, meta = repro_report.load_runs(data)
    fig = repro_report.figure(rows, meta, committed=True, field="total_s")
    s = repro_report.summaries(rows, "total_s")
    from lab.spec import resumes_early
    lazy = [k for k in s if k[1] == "load" and k[3] == "snaplab" and resumes_early(k[2])]
    assert lazy
    ticks = {round(float(y), 9) for ax in fig.axes for coll in ax.collections for _, y in coll.get_offsets()}
    for k in lazy:  # every lazy-load point's fastest and slowest run drawn
        assert round(s[k].min, 9) in ticks and round(s[k].max, 9) in ticks
    assert "lazy load's total runs to the end of its fill" in " ".join(t.get_text() for t in fig.texts)
    # every load engine of the registry has its own style and a label that says it is a lazy load
    styles = {repro_report.series_style("snaplab", "load", e) for e in {k[2] for k in s if k[1] == "load"}}
    assert len(styles) == len({k[2] for k in s if k[1] == "load"})
    assert all(repro_report.series_label("snaplab", "load", k[2]).startswith("snaplab lazy load") for k in lazy)
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_the_progress_figure_adds_a_zoomed_panel_and_the_downtime_figure_says_what_each_background_stop_holds() -> None:
    import matplotlib.pyplot as plt

    data = Path(__file__).resolve().parents[2] / "data" / "results" / "reproduction"
    rows, meta = repro_report.load_runs(data)
    fig = repro_report.figure(rows, meta, committed=True, field="progress_ratio")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 2  # the dirty saves' panel, then the same zoomed
    zoomed = shown[1]
    assert zoomed.get_ylim() == pytest.approx(repro_report.ZOOM_PROGRESS)
    s = repro_report.summaries(rows, "progress_ratio")
    kept = {k[:4] for k, v in s.items() if min(w.median for kk, w in s.items() if kk[:4] == k[:4]) >= 0.8}
    labels = {t.get_text() for t in zoomed.get_legend().get_texts()} - {"min and max of the runs"}
    assert labels == {repro_report.series_label(k[3], k[1], k[2]) for k in kept}
    assert "snaplab blocking snapshot-save" not in labels  # its progress is near 0: out of the zoom
    plt.close(fig)
    fig = repro_report.figure(rows, meta, committed=True, field="guest_lost_ms")
    ax = [a for a in fig.axes if a.get_visible()][0]
    assert {2.0, 5.0, 10.0, 100.0} <= {float(t) for t in ax.get_yticks()}
    plt.close(fig)
    fig = repro_report.figure(rows, meta, committed=True)
    assert "inside only what was written since" in " ".join(t.get_text() for t in fig.texts)
    plt.close(fig)


def test_compare_text_says_not_run_where_one_run_has_no_such_ratio() -> None:
    data = Path(__file__).resolve().parents[2] / "data" / "results" / "reproduction"
    rows, _ = repro_report.load_runs(data)
    quick = [r for r in rows if r["ram_mib"] != 4096]  # as a --quick run: no 4096 MiB
    text = repro_report.compare_text(quick, rows, "committed")
    line = next(x for x in text.splitlines() if "save blocking" in x and "4096 MiB" in x and "dirty" in x)
    assert "now  not run" in line and "committed    10.0x" in line
    assert "nan" not in text
