"""bench/bench_cow.py, the bench issue #19's copy-on-write goals are measured with: it runs end to
end at a tiny size and computes what it prints from its saves (not how fast they are: its
figures are the bench's business), and refuses bad arguments naming the field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_cow.py"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


def test_it_runs_at_a_small_size_and_its_ratio_is_the_medians() -> None:
    p = _run("--sizes", "64", "--runs", "2", "--ws-mib", "256", "--no-qemu")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    # the working set is capped at half of RAM, as the reproduction's
    head = re.search(r"^64 MiB, working set (\d+) MiB, (\d+) saves of each kind \(from steady state: (\d+) "
                     r"copy-on-write, (\d+) blocking; after (\d+) unmeasured of each", out, re.M)
    assert head is not None, out
    ws, runs, cow_steady, blk_steady, warmup = map(int, head.groups())
    assert (ws, runs, warmup) == (32, 2, 1)
    assert 0 <= cow_steady <= 2 and 0 <= blk_steady <= 2  # (a loaded host may miss steady state: said, not failed)
    totals = re.search(r"copy-on-write total ([\d.]+) \(([\d.]+)-([\d.]+)\) ms .* blocking save total ([\d.]+) "
                       r"\(([\d.]+)-([\d.]+)\) ms.*ratio of the medians ([\d.]+), each pair ([\d.]+)-([\d.]+)", out)
    assert totals is not None, out
    cow, cow_lo, cow_hi, blk, blk_lo, blk_hi, ratio, pair_lo, pair_hi = map(float, totals.groups())
    assert cow_lo <= cow <= cow_hi and blk_lo <= blk <= blk_hi
    # with two saves each the median is their midpoint, and the ratio is of the medians
    assert cow == pytest.approx((cow_lo + cow_hi) / 2, abs=0.1) and blk == pytest.approx((blk_lo + blk_hi) / 2, abs=0.1)
    assert ratio == pytest.approx(cow / blk, rel=0.01, abs=0.01)
    assert pair_lo <= pair_hi
    assert re.search(r"copy-on-write save \(rate from the command to the job's end over the second before\): "
                     r"(\d+|nan) \((\d+|nan)-(\d+|nan)\) %", out), out
    assert out.rstrip().splitlines()[-1].startswith("issue #19's goals:")


@pytest.mark.parametrize(("args", "field"), [
    (["--ws-mib", "-1"], "--ws-mib"),
    (["--sizes", "32"], "--sizes"),
    (["--sizes", "one"], "--sizes"),
    (["--runs", "0"], "--runs"),
    (["--warmup", "-1"], "--warmup"),
])
def test_bad_arguments_are_refused_naming_the_field(args: list[str], field: str) -> None:
    p = _run(*args, "--no-qemu", timeout=60)
    assert p.returncode == 2
    assert field in p.stderr and "Traceback" not in p.stderr
