"""The snaplab command's bad input, found by a new user's trial: one clear line before anything
is measured, nothing written where it should not be, and what was measured kept when a run is
stopped (Ctrl-C or SIGTERM)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import results
from lab.cli import main


def spec_file(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(("text", "said"), [
    ("[experiment]\ngap_s = -1\n", "spec field 'gap_s': -1 is not allowed; expected seconds"),
    ('[experiment]\nwarmup_s = "soon"\n', "spec field 'warmup_s': 'soon' is not allowed"),
    ("[experiment]\nrepetitions = true\n", "spec field 'repetitions': True is not allowed"),
    ("experiment = 5\n", "a spec is a table of fields"),
    ("", "the spec is empty"),
    ("[experiment\n", "not valid TOML"),
])
def test_a_bad_spec_is_one_line_naming_the_file_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          text: str, said: str) -> None:
    p = spec_file(tmp_path, text)
    assert main(["run", str(p), "--out", str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err
    assert said in err and str(p) in err and "Traceback" not in err
    assert not (tmp_path / "r.csv").exists()


def test_outputs_that_would_lose_results_are_refused_before_measuring(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    p = spec_file(tmp_path, "[experiment]\nram_mib = 64\nrepetitions = 1\n")
    assert main(["run", str(p), "--out", str(tmp_path / "x.json")]) == 2  # the metadata would overwrite it
    assert "give a path ending in .csv" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    assert main(["sweep", "--axis", "ram_mib=64", "--repetitions", "1", "--out", str(other)]) == 2
    assert "not a snaplab run/sweep results file: no column 'ram_mib'" in capsys.readouterr().err
    assert other.read_text() == "a,b\n1,2\n"  # left as it was
    assert main(["plot", str(other), "--png", str(tmp_path / "p.png")]) == 2
    assert "no column 'ram_mib'" in capsys.readouterr().err
    repro_csv = Path(__file__).resolve().parents[2] / "data" / "results" / "reproduction" / "runs.csv"
    assert main(["plot", str(repro_csv), "--png", str(tmp_path / "p.png")]) == 2
    assert "give its directory" in capsys.readouterr().err
    assert main(["plot", str(tmp_path), "--png", str(tmp_path / "p.png")]) == 2  # a directory without runs.csv
    assert "runs.csv" in capsys.readouterr().err
    assert main(["reference", "--qemu", "--ram", "100000"]) == 2  # before any fill file is written
    assert "expected sizes from 64 to 16384 MiB" in capsys.readouterr().err


def test_the_table_keeps_every_swept_field_apart() -> None:
    rows = [{"ram_mib": 128, "engine": "blocking", "workload": wl, "downtime_ms": d, "total_s": 0.1,
             "faults": 0, "vmstate_bytes": 1 << 20} for wl, d in
            (("idle", 11.4), ("idle", 7.3), ("dirty", 29.5), ("dirty", 48.2))]
    lines = results.table(rows).splitlines()
    assert "workload" in lines[0] and len(lines) == 3
    by_wl = {ln.split()[2]: float(ln.split()[3]) for ln in lines[1:]}
    assert by_wl == {"idle": pytest.approx(9.35), "dirty": pytest.approx(38.85)}  # not one pooled median


def test_sigterm_keeps_the_rows_measured_and_leaves_no_scratch(tmp_path: Path) -> None:
    """``timeout`` or ``kill`` in the middle of ``snaplab run``: the rows so far are in --out, the
    guest's scratch directory is gone, and the exit status says SIGTERM."""
    p = spec_file(tmp_path, "[experiment]\nram_mib = 64\nrepetitions = 1000\ngap_s = 0.05\nworkload = \"idle\"\n"
                            "engine = \"blocking\"\n")
    out = tmp_path / "r.csv"
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "run", str(p), "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    rows: list[dict[str, str]] = []
    while time.monotonic() < deadline and len(rows) < 2:  # until two snapshots were taken and saved
        time.sleep(0.2)
        if out.exists():
            with open(out, newline="") as f:
                rows = list(csv.DictReader(f))
        assert proc.poll() is None, proc.communicate()
    assert len(rows) >= 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) >= 2
    assert list((tmp_path / "tmp").iterdir()) == []  # the machine's scratch directory removed


def test_the_table_compares_the_ram_saved_not_the_layouts() -> None:
    """Pre-copy's VM state spans all of RAM (each page at its offset), the others' are compact:
    the column is the non-zero pages saved, the same for both; old files without that column
    fall back to the VM state's size, named so."""
    rows = [{"ram_mib": 256, "engine": eng, "downtime_ms": 1.0, "total_s": 0.1, "faults": 0,
             "vmstate_bytes": vm, "pages_written": 25600} for eng, vm in (("precopy", 256 << 20), ("cow", 100 << 20))]
    lines = results.table(rows).splitlines()
    assert "RAM saved MiB" in lines[0]
    assert [float(ln.split()[-2]) for ln in lines[1:]] == [100.0, 100.0]
    old = [{k: v for k, v in r.items() if k != "pages_written"} for r in rows]
    lines = results.table(old).splitlines()
    assert "vmstate MiB" in lines[0] and sorted(float(ln.split()[-2]) for ln in lines[1:]) == [100.0, 256.0]
