"""Two ways QEMU snapshots a running VM, done live on QEMU 7.2 and on snaplab: an internal
snapshot (``snapshot-save``: VM state and disks inside the qcow2 image) and a background
snapshot (``migrate-set-capabilities background-snapshot`` + ``migrate``: a stream of the VM
state to a file, the disks untouched), with what each stored and where.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emulator.guest import WorkloadSpec
from lab.reproduce import (
    MIGRATE_BACKGROUND,
    Guest,
    background_snapshot,
    progress_ratio,
    qemu_guest,
    run_job,
    snaplab_guest,
    vmstate_bytes,
    wait_steady,
)


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def running(system: str, ram_mib: int, spec: WorkloadSpec, workdir: Path) -> Iterator[Guest]:
    """The same guest program on ``system`` ("snaplab" or "qemu"), with a 1 GiB qcow2 disk0."""
    make = snaplab_guest if system == "snaplab" else qemu_guest
    with make(workdir, ram_mib, spec, []) as g:
        yield g


def snapshot_two_ways(system: str, ram_mib: int = 128, seed: int = 1, rate_mib_s: int = 50,
                      ws_mib: int = 32, workdir: str | Path | None = None) -> dict[str, Any]:
    """On one running guest: an internal snapshot (QEMU's blocking ``snapshot-save``), then a
    background snapshot to a file.  For each: downtime (STOP -> RESUME), total, the guest's
    progress rate during it over its rate before, and what was stored where, as
    ``qemu-img`` and the file system report it."""
    spec = WorkloadSpec("dirty", seed=seed, working_set=ws_mib << 20, rate=rate_mib_s << 20, pattern="random")
    out: dict[str, Any] = {"system": system, "ram_mib": ram_mib, "seed": seed}
    with tempfile.TemporaryDirectory(prefix=f"snaplab-{system}-", dir=workdir) as tmp, \
            running(system, ram_mib, spec, Path(tmp)) as g:
        disk = g.workdir / "disk0.qcow2"
        out["steady"] = wait_steady(g, spec)
        out["disk_before"] = _qemu_img("info", "-U", str(disk))
        out["disk_allocated_before"] = disk.stat().st_blocks * 512
        m = run_job(g, "snapshot-save", {"job-id": "int", "tag": "internal", "vmstate": "disk0", "devices": ["disk0"]})
        out["internal"] = {"downtime_ms": m[0], "total_s": m[1], "progress": progress_ratio(g, m[2], m[3]),
                           "vmstate_bytes": vmstate_bytes(g, "internal")}
        g.qmp.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "background-snapshot", "state": True}, {"capability": "events", "state": True}]})
        wait_steady(g, spec)
        stream = g.workdir / "background.bin"
        b = background_snapshot(g, stream)
        out["migrate"] = {"downtime_ms": b[0], "total_s": b[1], "progress": progress_ratio(g, b[2], b[3]),
                             "file_bytes": stream.stat().st_size}
        out["snapshots"] = _qemu_img("snapshot", "-l", "-U", str(disk))
        out["disk_after"] = _qemu_img("info", "-U", str(disk))
        out["disk_allocated_bytes"] = disk.stat().st_blocks * 512  # what the file system holds
    return out


def two_ways_rows(system: str, reps: int = 3, **kw: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``reps`` runs of :func:`snapshot_two_ways` on ``system``, each on a freshly booted guest:
    one row per run and operation (``op`` "internal" or "background": downtime, total, guest
    progress, MiB stored), for medians with spread; and the first run's full result (its
    ``qemu-img`` listings)."""
    rows: list[dict[str, Any]] = []
    first: dict[str, Any] = {}
    for rep in range(reps):
        r = snapshot_two_ways(system, **kw)
        first = first or r
        i, b = r["internal"], r["migrate"]
        rows.append({"system": system, "op": "internal", "rep": rep, "downtime_ms": i["downtime_ms"],
                     "total_s": i["total_s"], "progress": i["progress"], "stored_mib": i["vmstate_bytes"] / 2**20})
        rows.append({"system": system, "op": MIGRATE_BACKGROUND, "rep": rep, "downtime_ms": b["downtime_ms"],
                     "total_s": b["total_s"], "progress": b["progress"], "stored_mib": b["file_bytes"] / 2**20})
    return rows, first
