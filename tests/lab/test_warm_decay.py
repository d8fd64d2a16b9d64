"""bench/warm_decay.py: one line per wait, after the cold touch; bad input named."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "warm_decay.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=120)


def test_it_prints_the_cold_touch_then_one_line_per_wait() -> None:
    p = run("--mib", "4", "--waits", "0,0.2")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("free page reporting: ") and lines[1].startswith("cold touch of 4 MiB: ")
    waits = [float(m.group(1)) for ln in lines[2:] if (m := re.match(r"touched again +([\d.]+) s after", ln))]
    assert waits == [0.0, 0.2]


def test_bad_input_is_named() -> None:
    for args, text in ((("--mib", "0"), "--mib: 0 is not allowed"), (("--waits", "a,b"), "--waits: 'a,b' is not a list"),
                       (("--waits", "-1"), "--waits: '-1': expected seconds >= 0")):
        p = run(*args)
        assert p.returncode == 2 and text in p.stderr, (args, p.stderr)
