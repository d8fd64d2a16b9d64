"""Two ways QEMU snapshots a running VM, done live on QEMU 7.2 and on snaplab: an internal
snapshot (``snapshot-save``: VM state and disks inside the qcow2 image) and a background
snapshot (``migrate-set-capabilities background-snapshot`` + ``migrate``: a stream of the VM
state to a file, the disks untouched), with what each stored and where.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from emulator.guest import WorkloadSpec
from lab.reproduce import (
    MIGRATE_BACKGROUND,
    Guest,
    background_snapshot,
    progress_rates,
    qemu_guest,
    rate_ratio,
    run_job,
    snaplab_guest,
    stops_ns,
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
        out["internal"] = {"downtime_ms": m[0], "total_s": m[1], **_progress(g, m[2], m[3]),
                           "vmstate_bytes": vmstate_bytes(g, "internal")}
        g.qmp.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "background-snapshot", "state": True}, {"capability": "events", "state": True}]})
        wait_steady(g, spec)
        stream = g.workdir / "background.bin"
        b = background_snapshot(g, stream)
        out["migrate"] = {"downtime_ms": b[0], "total_s": b[1], **_progress(g, b[2], b[3]),
                          "file_bytes": stream.stat().st_size}
        out["snapshots"] = _qemu_img("snapshot", "-l", "-U", str(disk))
        out["disk_after"] = _qemu_img("info", "-U", str(disk))
        out["disk_allocated_bytes"] = disk.stat().st_blocks * 512  # what the file system holds
    return out


def _progress(g: Guest, t0_ns: int, t1_ns: int) -> dict[str, Any]:
    """The guest during one operation (command ``t0`` to its end ``t1``, monotonic ns): its
    progress ratio; its rate in the second before (iterations a second); its samples from
    0.2 s before the command to 0.1 s after the end, as (seconds since the command, iterations
    since the command, the count at the command interpolated); the operation's end and its stops (STOP to RESUME), in seconds since
    the command, for :func:`lab.plot.two_ways_timelines`; and that count at the command (the
    dirty workload's iterations since boot: one stamped 4 KiB page each)."""
    before, during = progress_rates(g, t0_ns, t1_ns)
    deadline = time.monotonic() + 0.5  # (QEMU's samples reach the host in bursts)
    while time.monotonic() < deadline and not any(t >= t1_ns + 100_000_000 for t, _ in g.progress()[-4:]):
        time.sleep(0.01)
    samples = [(t, i) for t, i in g.progress() if t0_ns - 200_000_000 <= t <= t1_ns + 100_000_000]
    # the count at the command, interpolated between the samples around it (not the last
    # sample before it: that would credit the operation with up to one batch)
    i0 = float(np.interp(t0_ns, [t for t, _ in samples], [i for _, i in samples])) if samples else 0.0
    return {"progress": rate_ratio(before, during), "rate_before": before, "count_at_command": i0,
            "timeline": [((t - t0_ns) / 1e9, i - i0) for t, i in samples], "end_s": (t1_ns - t0_ns) / 1e9,
            "stops_s": [((a - t0_ns) / 1e9, (b - t0_ns) / 1e9) for a, b in stops_ns(list(g.qmp.events))]}


def two_ways_rows(system: str, reps: int = 3, **kw: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``reps`` runs of :func:`snapshot_two_ways` on ``system``, each on a freshly booted guest:
    one row per run and operation (``op`` "internal" or "background": downtime, total, guest
    progress, MiB stored, MiB the guest had written since boot when the command was sent), for
    medians with spread; and the last run's full result (its
    ``qemu-img`` listings and progress timelines: the last, as the first save of a process
    also pays one-time set-up, such as warming the copy buffers)."""
    rows: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    for rep in range(reps):
        r = snapshot_two_ways(system, **kw)
        last = r
        i, b = r["internal"], r["migrate"]
        rows.append({"system": system, "op": "internal", "rep": rep, "downtime_ms": i["downtime_ms"],
                     "total_s": i["total_s"], "progress": i["progress"], "stored_mib": i["vmstate_bytes"] / 2**20,
                     "written_before_mib": i["count_at_command"] * 4096 / 2**20})
        rows.append({"system": system, "op": MIGRATE_BACKGROUND, "rep": rep, "downtime_ms": b["downtime_ms"],
                     "total_s": b["total_s"], "progress": b["progress"], "stored_mib": b["file_bytes"] / 2**20,
                     "written_before_mib": b["count_at_command"] * 4096 / 2**20})
    return rows, last
