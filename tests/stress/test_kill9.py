"""kill -9 at random points, CI-sized (issue #20, item 4): about 30 SIGKILLs of
``snaplab-system`` in the middle of saves with every engine, deletes, loads with every engine
(background fills included) and the guest's disk writes.  No image corrupted by the real
``qemu-img check`` (leaks allowed), every earlier snapshot listed and loadable with correct
content (tests/stress/kill9.py).  The 500-kill version with a summary is bench/kill9.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.stress.kill9 import run, scenarios, summary

KILLS = 30


def test_kill9_never_corrupts_an_image_or_loses_a_snapshot(tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (apt-get install -y qemu-utils)")
    tally = run(KILLS, seed=2026, root=tmp_path, reset_every=15, keep=tmp_path / "failed")
    report = summary(tally, 0)
    assert tally.kills == KILLS
    assert tally.bad() == 0, report
    # the kills landed inside the operations, not only after them
    assert tally.mid_op >= KILLS // 3, report
    assert sum(1 for s in scenarios() if tally.by_scenario[s]) >= len(scenarios()) // 2, report
