"""Scratch directories of the lab's machines (the dashboard's, a notebook session's).

Each holds an ``owner`` file naming the process that made it (pid and start time, so a
reused pid does not count).  The owner removes it when it closes the machine, when the
machine is collected, or at exit; an owner killed outright (a notebook kernel stopped with
SIGKILL, as nbval and Jupyter stop them) cannot, so the next process that makes a scratch
directory of the same kind removes those whose owner is gone (pytest's numbered temporary
directories and their lock files follow the same idea).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

OWNER = "owner"


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot): with the pid, names one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_gone(d: Path) -> bool:
    try:
        pid_s, start = (d / OWNER).read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False  # not ours to judge: no owner file (being made, or made elsewhere)
    if not os.path.isdir("/proc/self"):
        return False  # no /proc here: no process can be told gone
    return _start_time(pid) != start


def reap(prefix: str, root: Path | None = None) -> int:
    """Remove the ``prefix*`` directories under ``root`` (the temporary directory) whose owner
    process is gone; returns how many."""
    root = Path(root or tempfile.gettempdir())
    n = 0
    for d in root.glob(prefix + "*"):
        if d.is_dir() and _owner_gone(d):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def make(prefix: str, root: Path | None = None) -> Path:
    """A new scratch directory owned by this process, after removing the stale ones."""
    reap(prefix, root)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    start = _start_time(os.getpid())
    if start is not None:  # (without /proc, no owner file: never reaped, removed by its owner only)
        (d / OWNER).write_text(f"{os.getpid()} {start}\n")
    return d


def tie(owner: object, d: Path) -> Callable[[], None]:
    """The function that removes ``d``; it also runs when ``owner`` is collected, or at exit."""
    return weakref.finalize(owner, shutil.rmtree, str(d), True)
