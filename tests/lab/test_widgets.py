"""The dashboard drives a live machine through QMP; bad input ends in its log, not in a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ipywidgets as w
import numpy as np
import pytest

from lab.spec import PATTERNS, load_engines, save_engines
from lab.widgets import LIVE_PERIOD_S, Dashboard

PNG = b"\x89PNG\r\n\x1a\n"
JOIN_S = 120


def finish(t: threading.Thread) -> None:
    t.join(JOIN_S)
    assert not t.is_alive(), f"{t.name} did not end within {JOIN_S} s"


@pytest.fixture
def dash() -> Iterator[Dashboard]:
    d = Dashboard()
    d.ram.value = 64
    yield d
    d.close()


def test_the_controls_come_from_the_registry_and_the_guest_spec(dash: Dashboard) -> None:
    assert [v for _, v in dash.engine.options] == list(save_engines())
    assert [v for _, v in dash.load_engine.options] == list(load_engines())
    assert list(dash.pattern.options) == list(PATTERNS)
    assert isinstance(dash.working_set, w.IntText) and isinstance(dash.ram, w.IntText)
    assert isinstance(dash.plot, w.Image) and bytes(dash.plot.value).startswith(PNG)


@pytest.mark.parametrize("engine", save_engines())
def test_take_load_delete_with_each_save_engine(dash: Dashboard, engine: str) -> None:
    dash.engine.value = engine
    dash.load_engine.value = load_engines()[-1]
    dash.working_set.value = 16
    dash.pattern.value = PATTERNS[0]
    assert dash.boot()
    before = bytes(dash.plot.value)
    finish(dash.save())
    assert bytes(dash.plot.value) != bytes(before) and bytes(dash.plot.value).startswith(PNG)
    finish(dash.load())
    finish(dash.delete())
    lines = dash.lines()
    text = "\n".join(lines)
    assert f"booted 64 MiB, dirty at 100 MiB/s, working set 16 MiB, {PATTERNS[0]}" in text
    assert "snapshot-save snap1: done downtime" in text and ", VM state " in text
    assert "snapshot-load snap1: done" in text and "snapshot-delete snap1: done" in text
    save = dash.results[0]  # the structured record of each job that succeeded
    assert [r["command"] for r in dash.results] == ["snapshot-save", "snapshot-load", "snapshot-delete"]
    assert save["engine"] == engine and save["vmstate_mib"] > 0
    assert save["before_stop_ms"] >= 0 and save["after_resume_ms"] >= 0  # the job's time outside its stop
    load = dash.results[1]
    assert load["progress"] != load["progress"]  # NaN: a load puts the counter back
    assert "STOP" in text and "RESUME" in text and "JOB_STATUS_CHANGE" in text
    # times are relative to the machine's start, not epoch seconds
    assert all(re.match(r"\+\d{1,4}\.\d{3} s ", line) for line in lines), lines
    assert dash.errors == []


@pytest.mark.parametrize("engine", load_engines())
def test_load_with_each_load_engine(dash: Dashboard, engine: str) -> None:
    dash.load_engine.value = engine
    assert dash.boot()
    finish(dash.save())
    finish(dash.load())
    assert "snapshot-load snap1: done" in dash.lines()[-1], dash.lines()
    assert dash.q.execute("query-status")["status"] == "running"
    assert dash.errors == []


def test_a_ram_size_the_machine_cannot_give_is_logged_and_keeps_the_old_machine(dash: Dashboard) -> None:
    assert dash.boot()
    old = dash.live
    dash.ram.value = 8
    assert not dash.boot()
    assert dash.live is old
    assert dash.errors == ["RAM 8 MiB: expected 16 to 65536 MiB"]  # in the field's unit
    assert dash.lines()[-1].endswith("boot: error: " + dash.errors[0])
    dash.ram.value = 70000 * 1024
    assert not dash.boot() and "expected 16 to 65536 MiB" in dash.errors[-1]
    dash.ram.value, dash.working_set.value = 128, 512  # a working set larger than RAM
    assert not dash.boot() and dash.errors[-1] == "working set 512 MiB: expected 0 (all of RAM) to the RAM size, 128 MiB"
    assert dash.live is old


def test_a_load_of_a_missing_tag_shows_qemus_error_and_continue_resumes(dash: Dashboard) -> None:
    assert dash.boot()
    dash.tag.value = "nope"
    finish(dash.load())
    assert dash.errors == ["Snapshot 'nope' does not exist in one or more devices"]
    assert "snapshot-load nope: error: Snapshot 'nope' does not exist" in dash.lines()[-1]
    assert dash.q.execute("query-status")["status"] == "restore-vm"  # QEMU leaves it stopped
    dash.cont()
    assert dash.q.execute("query-status")["status"] == "running"


def test_actions_before_boot_and_a_bad_workload_are_logged(dash: Dashboard) -> None:
    finish(dash.save())
    dash.cont()
    assert dash.errors == ["no machine: press boot first"] * 2
    dash.working_set.value = -1
    assert not dash.boot()
    assert dash.errors[-1] == "working set -1 MiB: expected 0 (all of RAM) to the RAM size, 64 MiB"


def _wait(what: str, cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)


def test_the_plot_redraws_by_itself_while_live_is_ticked(dash: Dashboard) -> None:
    assert dash.boot()
    n = dash.redraws
    png = bytes(dash.plot.value)
    _wait("two redraws without any action", lambda: dash.redraws >= n + 2)
    assert bytes(dash.plot.value) != png and bytes(dash.plot.value).startswith(PNG)
    dash.live_plot.value = False
    time.sleep(LIVE_PERIOD_S)  # a redraw already under way may still land
    n = dash.redraws
    time.sleep(3 * LIVE_PERIOD_S)
    assert dash.redraws == n, "redrawn while live plot is off"
    dash.live_plot.value = True
    _wait("redrawn again once ticked", lambda: dash.redraws > n)
    old = dash.live
    assert old is not None
    dash.close()
    assert old.closed.is_set()
    n = dash.redraws
    time.sleep(2 * LIVE_PERIOD_S)
    assert dash.redraws == n, "redrawn after the machine was closed"
    assert dash.errors == []


@pytest.mark.parametrize("make", ["lab.session:default_machine", "lab.widgets:live"])
def test_a_machine_nobody_closes_leaves_no_scratch_directory(make: str) -> None:
    """A notebook's kernel that exits without closing its machine (the dashboard's, or a
    session's) leaves nothing in /tmp: each leaked some 100 MiB per run before."""
    build = {"lab.session:default_machine": "from lab.session import default_machine as f; m = f(); m.machine.start()",
             "lab.widgets:live": "from lab.widgets import LiveMachine; from emulator.guest import WorkloadSpec; "
                                 "m = LiveMachine(32, WorkloadSpec('dirty', seed=1)); m.start()"}[make]
    out = subprocess.run([sys.executable, "-c", build + "; print(m.workdir, flush=True)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    workdir = Path(out.stdout.strip().splitlines()[-1])
    assert workdir.name.startswith("snaplab-") and not workdir.exists()


def test_a_killed_kernels_dashboard_directory_goes_with_the_next_dashboard_machine() -> None:
    """nbval and Jupyter stop a notebook's kernel with SIGKILL: no exit hook runs, so the
    dashboard machine's directory stays until the next dashboard machine is made."""
    import signal

    from emulator.guest import WorkloadSpec
    from lab.widgets import LiveMachine

    code = ("from lab.widgets import LiveMachine; from emulator.guest import WorkloadSpec; import time; "
            "m = LiveMachine(32, WorkloadSpec('dirty', seed=1)); m.start(); print(m.workdir, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    killed = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert killed.name.startswith("snaplab-dash-") and killed.is_dir()
    m = LiveMachine(32, WorkloadSpec("dirty", seed=1))
    try:
        assert not killed.exists() and m.workdir.is_dir()
    finally:
        m.close()
    assert not m.workdir.exists()


def test_a_load_that_puts_the_counter_back_is_no_stall_in_the_progress_figure() -> None:
    from lab.widgets import forward_progress

    assert forward_progress(np.array([0, 10, 20, 5, 15, 25])).tolist() == [0, 10, 20, 20, 30, 40]
    assert forward_progress(np.array([7])).tolist() == [7]
    assert forward_progress(np.zeros(0)).tolist() == []


def test_progress_over_a_job_is_its_rate_over_the_second_before() -> None:
    from lab.widgets import _progress

    t = np.array([0, 1, 2, 3], dtype=np.float64) * 1e9  # host ns; 100 iterations a second, then 50
    rows = np.zeros((4, 6), dtype=np.uint64)
    rows[:, 1], rows[:, 2] = t, [0, 100, 200, 250]
    assert _progress(rows, int(2e9), int(3e9)) == pytest.approx(0.5)
    assert _progress(rows, int(0.5e9), int(1e9)) != _progress(rows, int(0.5e9), int(1e9))  # no second before: NaN


def test_the_plot_title_names_the_guest_it_shows() -> None:
    from emulator.guest import WorkloadSpec
    from lab.widgets import conditions

    spec = WorkloadSpec("dirty", seed=3, working_set=64 << 20, rate=100 << 20, pattern="sequential")
    assert conditions(128, spec) == "128 MiB RAM, dirty 100 MiB/s over 64 MiB, sequential, seed 3"
    assert conditions(256, WorkloadSpec("dirty", seed=1)) == "256 MiB RAM, dirty unpaced over all RAM, random, seed 1"
    assert conditions(64, WorkloadSpec("idle", seed=0)) == "64 MiB RAM, idle, seed 0"


def test_the_dashboard_draws_its_machines_conditions(dash: Dashboard, monkeypatch: pytest.MonkeyPatch) -> None:
    import lab.widgets

    titles: list[str] = []
    real = lab.widgets.progress_png
    monkeypatch.setattr(lab.widgets, "progress_png", lambda *a: titles.append(a[4] if len(a) > 4 else "") or real(*a))
    dash.rate.value, dash.working_set.value = 50, 16
    assert dash.boot()
    dash.draw()
    assert titles[-1] == "64 MiB RAM, dirty 50 MiB/s over 16 MiB, random, seed 1"
