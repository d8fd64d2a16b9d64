"""Scratch directories of lab machines: a killed owner's is removed by the next maker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from lab import scratch


def test_a_killed_owners_directory_is_reaped_and_a_live_ones_is_kept(tmp_path: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from lab import scratch; "
            "d = scratch.make('snaplab-t-', Path(sys.argv[1])); print(d, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    killed = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)  # as nbval and Jupyter stop a kernel: no exit hook runs
    proc.wait(30)
    assert killed.is_dir()
    mine = scratch.make("snaplab-t-", tmp_path)  # the next maker removes the killed owner's
    assert not killed.exists() and mine.is_dir()
    reused = tmp_path / "snaplab-t-reused"  # this process's pid, another process's start time
    reused.mkdir()
    (reused / scratch.OWNER).write_text(f"{os.getpid()} 1\n")
    foreign = tmp_path / "snaplab-t-foreign"  # no owner file: not ours to judge
    foreign.mkdir()
    other = tmp_path / "snaplab-other-x"  # another kind
    other.mkdir()
    (other / scratch.OWNER).write_text(f"{os.getpid()} 1\n")
    assert scratch.reap("snaplab-t-", tmp_path) == 1
    assert not reused.exists() and mine.is_dir() and foreign.is_dir() and other.is_dir()


def test_the_tied_function_removes_the_directory_when_its_owner_is_collected(tmp_path: Path) -> None:
    class Owner:
        pass

    o = Owner()
    d = scratch.make("snaplab-t-", tmp_path)
    scratch.tie(o, d)
    assert d.is_dir()
    del o
    assert not d.exists()


def test_without_proc_a_directory_has_no_owner_file_and_is_never_reaped(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Where a process's start time cannot be read, nothing could tell its directory orphaned
    later: it gets no owner file (its owner still removes it), and reaping leaves it."""
    monkeypatch.setattr(scratch, "_start_time", lambda pid: None)
    d = scratch.make("snaplab-t-", tmp_path)
    assert d.is_dir() and not (d / scratch.OWNER).exists()
    assert scratch.reap("snaplab-t-", tmp_path) == 0 and d.is_dir()
