"""bench/bench_cow.py, the bench issue #19's copy-on-write goals are measured with: it runs end to
end at a tiny size (what it prints, not how fast: its figures are the bench's business) and
refuses bad arguments naming the field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_cow.py"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


def test_every_save_starts_from_steady_state_and_both_totals_are_printed() -> None:
    p = _run("--sizes", "64", "--runs", "2", "--ws-mib", "8", "--no-qemu")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    head = re.search(r"^64 MiB, working set (\d+) MiB, (\d+) saves of each kind \((\d+) from steady state", out, re.M)
    assert head is not None, out
    assert head.groups() == ("8", "2", "2")
    totals = re.search(r"copy-on-write total ([\d.]+) \(([\d.]+)-([\d.]+)\) s .* blocking save total ([\d.]+) "
                       r"\(([\d.]+)-([\d.]+)\) s.*ratio of the medians ([\d.]+), each pair ([\d.]+)-([\d.]+)", out)
    assert totals is not None, out
    cow, cow_lo, cow_hi, blk, blk_lo, blk_hi, ratio, pair_lo, pair_hi = map(float, totals.groups())
    assert cow_lo <= cow <= cow_hi and blk_lo <= blk <= blk_hi and pair_lo <= pair_hi
    assert ratio > 0
    progress = re.search(r"copy-on-write save \(rate from the command to the job's end over the second before\): "
                         r"(\d+) \((\d+)-(\d+)\) %", out)
    assert progress is not None, out
    assert int(progress.group(2)) <= int(progress.group(1)) <= int(progress.group(3))
    assert out.rstrip().splitlines()[-1].startswith("issue #19's goals:")


@pytest.mark.parametrize(("args", "field"), [
    (["--ws-mib", "-1"], "--ws-mib"),
    (["--sizes", "32"], "--sizes"),
    (["--sizes", "one"], "--sizes"),
    (["--runs", "0"], "--runs"),
])
def test_bad_arguments_are_refused_naming_the_field(args: list[str], field: str) -> None:
    p = _run(*args, "--no-qemu", timeout=60)
    assert p.returncode == 2
    assert field in p.stderr and "Traceback" not in p.stderr
