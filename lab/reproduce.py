"""``snaplab reproduce``: snaplab beside the real QEMU 7.2, same guest, same sizes, same definitions.

Both systems run snaplab's own guest program (on QEMU as the multiboot image of
emulator/qemu_guest.py), in the same conditions:

* ``idle-random``: the idle workload with RAM filled with random bytes through ``-device
  loader`` (QEMU's reference measurement, docs/reference/qemu-7.2-qmp.md);
* ``dirty``: the dirty workload at a stated rate over a stated working set (random pattern).

For each RAM size and condition, each system gets a fresh machine (memory warmed where that lasts, and the
page cache dropped, before each, systems alternated ABBA from one block to the next) and, once its
guest is in steady state (its progress rate at the configured rate, seen on its progress
channel; the idle guest halts, so it gets a fixed settle time), ``reps`` repetitions of:
blocking ``snapshot-save`` then ``snapshot-load`` of it; the background snapshot through
``migrate-set-capabilities background-snapshot`` + ``migrate`` to a file; and on snaplab its
own engines (every save engine whose guest runs, every load engine that resumes early).
Repetitions inside a machine are its documented warm state: the steady state is waited for
again before every operation.

Definitions, the same on both systems (docs/reproduction.md says what each includes):
``downtime_ms`` STOP -> RESUME from the QMP events' timestamps; ``total_s`` from the command
(host wall clock when sent) to the completion event's timestamp (the job's ``concluded``, or
MIGRATION ``completed``); ``progress_ratio`` the guest's progress rate between the command and
the completion / its rate in the second before (host-timestamped progress samples; saves of
the paced dirty guest only: the idle guest has no pace, and a load sets the counter back).

Every row is appended to ``runs.csv`` as soon as it is measured, so a run that fails part way
keeps what it measured; ``metadata.json`` says where and how.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from emulator.block import BlockGraph, Qcow2Image
from emulator.errors import SnaplabError
from emulator.guest import WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig
from lab import qemu as qemu_lab
from lab.hostnoise import describe, host_noise
from lab.progress import rate, stops_monotonic_ns
from lab.results import source_revision
from lab.spec import (
    engine_title,
    guest_runs,
    load_engines,
    resumes_early,
    save_engines,
    waits_for_complete,
)

CONDITIONS = ("idle-random", "dirty")
SYSTEMS = ("snaplab", "qemu")
MIGRATE_BACKGROUND = "background"  # QEMU's migrate + background-snapshot, on both systems (not an engine)
HOST_NOISE_S = 3.0  # lab/hostnoise.py's three probes, a second each, before the first block
MAX_WARM_MIB = 64 << 10  # --warm-mib's bound (64 GiB; the host's free memory less 2 GiB caps it anyway)

COLUMNS = ("system", "engine", "op", "ram_mib", "workload", "dirty_rate_mibs", "working_set_mib", "rep",
           "downtime_ms", "total_s", "progress_ratio", "vmstate_bytes", "steady", "started_at",
           "guest_iterations", "host", "rate_before", "rate_during")
QEMU_CACHES = ("direct", "writeback")  # cache.direct=on / off on QEMU's image file node
FULL_SIZES, FULL_REPS = (256, 1024, 4096), 5
QUICK_SIZES, QUICK_REPS = (256, 1024), 3
IDLE_SETTLE_S = 1.0
RECENT_SAMPLES = 4096  # progress samples a measurement reads: ~40 s at 100 reports a second
STEADY_TIMEOUT_S = 30.0
# How close to its configured rate the guest's last second must be to count as steady: that
# second is the progress ratio's denominator, so a loose tolerance lets a measurement start
# while the guest runs below its rate, and the ratio comes out too high.
STEADY_TOLERANCE = 0.03
TOUCHED_WS = 7.0  # working sets' worth of pages written before a measurement: 1 - e^-7 = 99.9% touched
MIN_RAM_MIB, MAX_RAM_MIB = 64, 16384
COMMAND_LINE = ""  # the snaplab command line that asked for this run (set by lab.cli), for the metadata
MIN_RANDOM_RAM_MIB = 128  # idle-random: lab.qemu.fill_files leaves 64 MiB of RAM without random bytes


class ReproError(SnaplabError, ValueError):
    """A bad ``snaplab reproduce`` argument; the message names it and what it accepts."""


@dataclass(frozen=True)
class ReproSpec:
    """What one reproduction measures (see the module docstring)."""

    ram_mib: tuple[int, ...] = FULL_SIZES
    reps: int = FULL_REPS
    conditions: tuple[str, ...] = CONDITIONS
    dirty_rate_mib_s: int = 100
    working_set_mib: int = 256
    seed: int = 1
    with_qemu: bool = True
    qemu_cache: str = "direct"
    touched_ws: float = TOUCHED_WS
    host_noise_s: float = HOST_NOISE_S  # lab/hostnoise.py's probes before the first block; 0: none
    warm_mib: int | None = None  # host memory touched and freed before each block; None: warm_bytes's default

    def __post_init__(self) -> None:
        for r in self.ram_mib:
            if not MIN_RAM_MIB <= r <= MAX_RAM_MIB:
                raise ReproError(f"--ram: {r} MiB is not allowed; expected sizes from {MIN_RAM_MIB} to {MAX_RAM_MIB} MiB")
        if not self.ram_mib:
            raise ReproError("--ram: no size given; expected sizes such as 256,1024,4096")
        if not 1 <= self.reps <= 100:
            raise ReproError(f"--reps: {self.reps} is not allowed; expected 1 to 100")
        if not self.conditions:
            raise ReproError(f"--conditions: none given; expected one or more of {', '.join(CONDITIONS)}")
        for c in self.conditions:
            if c not in CONDITIONS:
                raise ReproError(f"--conditions: {c!r} is not allowed; expected {', '.join(CONDITIONS)}")
        if "idle-random" in self.conditions and min(self.ram_mib) < MIN_RANDOM_RAM_MIB:
            raise ReproError(f"--ram: {min(self.ram_mib)} MiB is too small for the idle-random condition (its RAM "
                             f"holds random bytes all but 64 MiB of it); expected {MIN_RANDOM_RAM_MIB} MiB or more, "
                             "or --conditions dirty")
        if self.dirty_rate_mib_s <= 0:
            raise ReproError("--rate: expected a positive rate in MiB/s")
        if self.working_set_mib < 1:
            raise ReproError("--ws: expected a positive working set in MiB")
        if self.qemu_cache not in QEMU_CACHES:
            raise ReproError(f"--qemu-cache: {self.qemu_cache!r} is not allowed; expected {', '.join(QEMU_CACHES)}")
        if not 0 <= self.host_noise_s <= 60:
            raise ReproError(f"host_noise_s: {self.host_noise_s} is not allowed; expected 0 to 60 seconds")
        if not 0 <= self.touched_ws <= 50:
            raise ReproError(f"--touched: {self.touched_ws} is not allowed; expected 0 to 50 working sets")
        if self.warm_mib is not None and not 0 <= self.warm_mib <= MAX_WARM_MIB:
            raise ReproError(f"--warm-mib: {self.warm_mib} is not allowed; expected 0 to {MAX_WARM_MIB} MiB")

    def warm_bytes(self, ram_mib: int) -> tuple[int, str]:
        """The host memory to touch and free before a block of ``ram_mib``, and why: as asked;
        else none where this host gives freed memory back to its hypervisor (the warmth is
        gone within seconds, and the ratios did not move without it: docs/reproduction.md,
        "Warm memory"); else three
        times the guest's RAM and 2 GiB more (bench/bench_snapshot.py's rule)."""
        if self.warm_mib is not None:
            return self.warm_mib << 20, "--warm-mib"
        reported = reported_free_kib()
        if reported:
            return 0, (f"none: this host gives freed memory back to its hypervisor (free page reporting, "
                       f"{reported} KiB so far): a warm-up is cold again within seconds")
        return (3 * ram_mib + 2048) << 20, "3 x RAM + 2 GiB"

    def working_set(self, ram_mib: int) -> int:
        """The dirty workload's working set at this RAM size: as asked, or half of RAM where
        that does not fit (the rows record the one used)."""
        return min(self.working_set_mib, ram_mib // 2)

    def min_iterations(self, condition: str, ram_mib: int) -> int:
        """The guest iteration count (pages written) every measured operation of ``condition``
        waits for, the same on both systems: ``touched_ws`` working sets' worth, so both guests
        have touched the same share of their working set (the VM state's size depends on it;
        the random pattern draws pages with replacement).  The idle guest writes nothing: 0."""
        if condition != "dirty":
            return 0
        return int(self.touched_ws * (self.working_set(ram_mib) << 20) // 4096)

    def workload(self, condition: str, ram_mib: int) -> WorkloadSpec:
        if condition == "dirty":
            return WorkloadSpec("dirty", seed=self.seed, working_set=self.working_set(ram_mib) << 20,
                                rate=self.dirty_rate_mib_s << 20, pattern="random")
        return WorkloadSpec("idle", seed=self.seed)


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ReproError(f"--ram: {text!r} is not a list of sizes; expected MiB such as 256,1024,4096") from None


class QMP(Protocol):
    """What a measurement needs of a QMP connection (lab.qemu.RawQMP, or snaplab's in-process one)."""

    events: list[dict[str, Any]]

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any: ...

    def wait_event(self, pred: Any, timeout: float = 600) -> dict[str, Any]: ...


class SnaplabQMP:
    """snaplab's in-process QMP client with RawQMP's shape: events kept as QEMU's JSON."""

    def __init__(self, machine: Machine) -> None:
        self.client = machine.qmp()
        self.events: list[dict[str, Any]] = []

    def _pull(self) -> None:
        for e in self.client.events():
            sec = int(e.timestamp)
            self.events.append({"event": e.event, "data": e.data,
                                "timestamp": {"seconds": sec, "microseconds": round((e.timestamp - sec) * 1e6)}})

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        out = self.client.execute(name, args or {})
        self._pull()
        return out

    def wait_event(self, pred: Any, timeout: float = 600) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._pull()
            for i, e in enumerate(self.events):
                if pred(e):
                    return self.events.pop(i)
            time.sleep(0.002)
        raise TimeoutError("no such event")


@dataclass
class Guest:
    """One running system: its QMP, its progress samples (host monotonic ns, iterations)."""

    system: str
    qmp: QMP
    progress: Callable[[], list[tuple[int, int]]]
    workdir: Path
    argv: list[str] = field(default_factory=list)


def _ts(e: dict[str, Any]) -> float:
    return float(e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6)


def _rate(samples: list[tuple[int, int]], start_ns: int, end_ns: int,
          stops: list[tuple[float, float]] | None = None) -> float:
    """Iterations per second over [start, end], interpolated between samples in running time
    (flat through ``stops``, monotonic ns: lab/progress.py); nan without samples around it."""
    if len(samples) < 2:
        return float("nan")
    ts = np.array([s[0] for s in samples], dtype=np.float64)
    its = np.array([s[1] for s in samples], dtype=np.float64)
    return rate(ts, its, start_ns, end_ns, stops or [])


def stops_ns(events: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """[STOP, RESUME] intervals of a QMP event list, on the monotonic clock (lab/progress.py)."""
    return stops_monotonic_ns((e["event"], _ts(e)) for e in events)


def iterations_now(g: Guest) -> int:
    """The guest's iteration counter in its latest progress sample (0 before the first)."""
    last = g.progress()[-1:]
    return int(last[0][1]) if last else 0


def wait_steady(g: Guest, spec: WorkloadSpec, min_iterations: int = 0) -> bool:
    """Until the guest has run ``min_iterations`` iterations and its progress over the last
    second (the window a progress ratio compares with) runs forward at its configured rate,
    within ``STEADY_TOLERANCE`` (pages a second); the idle guest halts and has no rate: a
    fixed settle time."""
    if spec.rate == 0:
        time.sleep(IDLE_SETTLE_S)
        return True
    want = spec.rate / 4096
    end = time.monotonic() + STEADY_TIMEOUT_S + 2 * max(0, min_iterations - iterations_now(g)) / want
    while iterations_now(g) < min_iterations and time.monotonic() < end:
        time.sleep(0.05)
    if iterations_now(g) < min_iterations:
        return False
    deadline = time.monotonic() + STEADY_TIMEOUT_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = time.monotonic_ns()
        lo, hi = now - 1_100_000_000, now - 100_000_000
        samples = g.progress()
        window = [i for t, i in samples if lo <= t <= hi]
        forward = all(b >= a for a, b in zip(window, window[1:], strict=False))  # no load's rewind in it
        if forward and abs(_rate(samples, lo, hi) - want) <= STEADY_TOLERANCE * want:
            return True
    return False


def progress_rates(g: Guest, t0_ns: int, t1_ns: int) -> tuple[float, float]:
    """The guest's progress rate (iterations a second) in the second before ``t0`` and
    between ``t0`` and ``t1``, flat through the operation's stop (its STOP and RESUME events,
    still in the client's list); their quotient is the row's ``progress_ratio``."""
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline and not any(s[0] > t1_ns for s in g.progress()[-4:]):
        time.sleep(0.005)  # one sample past the window, so its end is interpolated
    samples = g.progress()
    stops = stops_ns(list(g.qmp.events)) if g.qmp is not None else []  # (a synthetic guest has no monitor)
    return _rate(samples, t0_ns - 1_000_000_000, t0_ns, stops), _rate(samples, t0_ns, t1_ns, stops)


def rate_ratio(before: float, during: float) -> float:
    """``progress_ratio``: the rate during the operation over the rate before it (nan without one)."""
    return during / before if before > 0 else float("nan")


def progress_ratio(g: Guest, t0_ns: int, t1_ns: int) -> float:
    return rate_ratio(*progress_rates(g, t0_ns, t1_ns))


def stopped_ms(events: list[dict[str, Any]]) -> float:
    """STOP -> RESUME in ms (the first STOP and the last RESUME); nan if the guest never stopped."""
    stops = [_ts(e) for e in events if e["event"] == "STOP"]
    resumes = [_ts(e) for e in events if e["event"] == "RESUME"]
    return (resumes[-1] - stops[0]) * 1e3 if stops and resumes else float("nan")


def run_job(g: Guest, cmd: str, args: dict[str, Any],
            concluded: Callable[[], object] | None = None) -> tuple[float, float, int, int]:
    """A snapshot job to its end: (downtime ms, total s, command monotonic ns, done monotonic ns).
    ``concluded`` is called once the job has concluded, before it is dismissed (what needs the
    job, such as ``__org.snaplab_query-snapshot-stats``)."""
    q = g.qmp
    q.events.clear()
    sent, t0 = time.time(), time.monotonic_ns()
    q.cmd(cmd, args)
    done = q.wait_event(lambda e: e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == args["job-id"]
                        and e["data"]["status"] == "concluded")
    t1 = time.monotonic_ns()
    info = [j for j in q.cmd("query-jobs") if j["id"] == args["job-id"]][0]
    if concluded is not None:
        concluded()
    q.cmd("job-dismiss", {"id": args["job-id"]})
    if "error" in info:
        raise RuntimeError(f"{g.system} {cmd} failed: {info['error']}")
    return stopped_ms(q.events), _ts(done) - sent, t0, t1


def background_snapshot(g: Guest, path: Path) -> tuple[float, float, int, int]:
    """migrate with background-snapshot to a file: (downtime ms, total s, command ns, done ns).

    The capability is on only for this migration: QEMU 7.2's ``savevm`` reads it too (its RAM
    setup skips the dirty-log start and first bitmap sync, ``ram_init_bitmaps()``), and an
    internal snapshot taken with it on stores pages twice (docs/reproduction.md).  The
    operation starts with the capability command: QEMU's check of it
    (``ram_write_tracking_compatible()``) registers all of RAM with a userfaultfd and closes it,
    walking every mapped page, with the QMP command holding the big lock the vCPU needs for its
    port I/O.  After a first background snapshot has mapped all of RAM (its populate-read),
    that command takes about 60 ms at 4 GiB here (1 ms before); left before the operation's
    start, that stall fell in the second the progress ratio divides by."""
    q = g.qmp
    q.events.clear()
    sent, t0 = time.time(), time.monotonic_ns()
    q.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "background-snapshot", "state": True}]})
    q.cmd("migrate", {"uri": f"exec:cat > {path}"})
    done = q.wait_event(lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in ("completed", "failed"))
    t1 = time.monotonic_ns()
    q.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "background-snapshot", "state": False}]})
    if done["data"]["status"] != "completed":
        raise RuntimeError(f"{g.system} background snapshot failed: {q.cmd('query-migrate')}")
    return stopped_ms(q.events), _ts(done) - sent, t0, t1


def vmstate_bytes(g: Guest, tag: str) -> int:
    for n in g.qmp.cmd("query-named-block-nodes"):
        if n["node-name"] == "disk0":
            for s in n["image"].get("snapshots", []):
                if s["name"] == tag:
                    return int(s["vm-state-size"])
    return 0


def measure_block(g: Guest, spec: ReproSpec, condition: str, ram: int,
                  emit: Callable[[dict[str, Any]], None]) -> None:
    """Every operation ``spec.reps`` times on one running guest; each row goes to ``emit``."""
    w = spec.workload(condition, ram)
    blocking_save, blocking_load = save_engines()[0], load_engines()[0]
    base = {"vmstate": "disk0", "devices": ["disk0"]}
    g.qmp.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})

    least = spec.min_iterations(condition, ram)
    host = socket.gethostname()

    def ready() -> tuple[bool, int]:
        """Steady, past the common iteration count; (steady, the iteration count now)."""
        steady = wait_steady(g, w, least)
        if not steady:
            print(f"  {g.system} {ram} MiB {condition}: the guest did not run steadily at "
                  f"{spec.dirty_rate_mib_s} MiB/s within {STEADY_TIMEOUT_S:.0f} s (too fast for this host?); "
                  "measured anyway, the row says steady=False", file=sys.stderr, flush=True)
        return steady, iterations_now(g)

    def row(engine: str, op: str, rep: int, at: tuple[bool, int], m: tuple[float, float, int, int], vm: int) -> None:
        # Progress has a meaning only for a paced guest, and only for a save: a load puts the
        # guest's counter back to the snapshot's (load metrics are the restore issue's).
        paced = condition == "dirty" and op == "save"
        before, during = progress_rates(g, m[2], m[3]) if paced else (float("nan"), float("nan"))
        emit({"system": g.system, "engine": engine, "op": op, "ram_mib": ram, "workload": condition,
              "dirty_rate_mibs": spec.dirty_rate_mib_s if condition == "dirty" else 0,
              "working_set_mib": spec.working_set(ram) if condition == "dirty" else 0, "rep": rep,
              "downtime_ms": m[0], "total_s": m[1], "progress_ratio": rate_ratio(before, during),
              "vmstate_bytes": vm, "steady": at[0], "started_at": time.time(), "guest_iterations": at[1],
              "host": host, "rate_before": before, "rate_during": during})

    ours_save = [e for e in save_engines()[1:] if guest_runs(e)] if g.system == "snaplab" else []
    ours_load = [e for e in load_engines()[1:] if resumes_early(e) and not waits_for_complete(e)] if g.system == "snaplab" else []
    for rep in range(spec.reps):
        tag = f"r{rep}"
        at = ready()
        row(blocking_save, "save", rep, at, run_job(g, "snapshot-save", {"job-id": f"s{rep}", "tag": tag, **base}),
            vmstate_bytes(g, tag))
        at = ready()
        row(blocking_load, "load", rep, at, run_job(g, "snapshot-load", {"job-id": f"l{rep}", "tag": tag, **base}),
            vmstate_bytes(g, tag))
        for eng in ours_load:
            at = ready()
            args = {"job-id": f"l{rep}-{eng}", "tag": tag, **base, "__org.snaplab_engine": eng}
            row(eng, "load", rep, at, run_job(g, "snapshot-load", args), vmstate_bytes(g, tag))
        run_job(g, "snapshot-delete", {"job-id": f"d{rep}", "tag": tag, "devices": ["disk0"]})
        for eng in ours_save:
            at = ready()
            t = f"{tag}-{eng}"
            m = run_job(g, "snapshot-save", {"job-id": f"s{rep}-{eng}", "tag": t, **base, "__org.snaplab_engine": eng})
            row(eng, "save", rep, at, m, vmstate_bytes(g, t))
            run_job(g, "snapshot-delete", {"job-id": f"d{rep}-{eng}", "tag": t, "devices": ["disk0"]})
        at = ready()
        out = g.workdir / f"migrate{rep}.bin"
        m = background_snapshot(g, out)
        row(MIGRATE_BACKGROUND, "save", rep, at, m, out.stat().st_size)
        out.unlink()


# -- the two systems --------------------------------------------------------------------------------
def drop_caches() -> None:
    """Give clean page cache back to the free pool (root only), so each side starts alike."""
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def reported_free_kib() -> int:
    """KiB of freed memory this kernel has reported to its hypervisor so far (free page
    reporting, which the hypervisor then reclaims); 0 where the kernel does not say
    (``page_reporting``'s ``reported_kib`` is this project's VMs' kernel's, not upstream's)."""
    try:
        return int(Path("/sys/module/page_reporting/parameters/reported_kib").read_text())
    except (OSError, ValueError):
        return 0


def warm_memory(nbytes: int) -> int:
    """Touch and free ``nbytes`` of host memory (within what the host has free less 2 GiB), so
    neither system pays the host's first touch of new memory; returns the bytes touched.

    Where freed memory goes back to the hypervisor (free page reporting: this project's
    Firecracker VMs), the warmth lasts seconds only: docs/reproduction.md, "Warm memory"."""
    avail = next((int(ln.split()[1]) << 10 for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemAvailable")), nbytes)
    n = max(0, min(nbytes, avail - (2 << 30)))
    if n:
        a = np.ones(n, dtype=np.uint8)
        del a
    return n


def machine_guest(m: Machine, workdir: Path, argv: list[str]) -> Guest:
    """A running in-process Machine as a :class:`Guest`: its QMP, its lab port's latest
    progress samples (also for benches that build their own machine, bench/bench_cow.py)."""
    def recent() -> list[tuple[int, int]]:
        rows = m.lab.history_array(last=RECENT_SAMPLES)  # columns: vclock, host ns, iterations, ...
        return list(zip(rows[:, 1].tolist(), rows[:, 2].tolist(), strict=True))

    return Guest("snaplab", SnaplabQMP(m), recent, workdir, argv)


@contextlib.contextmanager
def snaplab_guest(w: Path, ram_mib: int, spec: WorkloadSpec, loaders: list[str]) -> Iterator[Guest]:
    """snaplab's Machine in this process, with ``loaders`` (:func:`lab.qemu.fill_files`'s)."""
    disk = w / "disk0.qcow2"
    Qcow2Image.create(disk, 1 << 30).close()
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(disk), "node-name": "disk0-file"})
    g.add({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"})
    files = [(a.split("file=")[1].split(",")[0], int(a.split("addr=")[1].split(",")[0], 16)) for a in loaders[1::2]]
    m = Machine(MachineConfig(ram_size=ram_mib << 20, workload=spec, disks=[DiskSpec("disk0", "disk0-dev")],
                              loaders=files), g)
    try:
        m.start()
        yield machine_guest(m, w, [f"snaplab in-process Machine: ram {ram_mib} MiB, workload {spec}, loaders {len(files)}"])
    finally:
        m.close()
        g.close()


@contextlib.contextmanager
def qemu_guest(w: Path, ram_mib: int, spec: WorkloadSpec, loaders: list[str],
               cache_direct: bool = True) -> Iterator[Guest]:
    """QEMU running the same guest program; ``cache_direct``: its image's file node with
    ``cache.direct=on`` (the VM state around the page cache, as snaplab's)."""
    with qemu_lab.running_guest(w, ram_mib, spec, loaders=loaders,
                                cache_direct=cache_direct) as (q, progress, argv):
        yield Guest("qemu", q, lambda: progress.history(last=RECENT_SAMPLES), w, argv)


def reproduce(spec: ReproSpec, out: Path, log: Callable[[str], None] = print, client: Any = None) -> Path:
    """Measure everything ``spec`` asks for into ``out/runs.csv`` + ``out/metadata.json``.

    ``client``: a ``dask.distributed.Client``: each (size, condition) pair of blocks, both
    systems in their ABBA order, runs on one worker holding the ``timed`` resource (one timed
    experiment at a time per host, both systems on the same host); its rows arrive when the
    pair ends, and a pair that fails keeps the rows it measured.  Without it, the pairs run
    here one after another and every row is written as soon as it is measured."""
    if spec.with_qemu and not shutil.which("qemu-system-x86_64"):
        raise ReproError("qemu-system-x86_64 is not installed: install Debian's qemu-system-x86 "
                         "(apt-get install qemu-system-x86), or pass --no-qemu")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "runs.csv"
    meta = metadata(spec, out)
    # the host's and Unicorn's own speed on the coordinating host, before any block (on a Dask
    # cluster the blocks run elsewhere: their hosts are in the rows)
    if spec.host_noise_s > 0:  # over the smallest size's working set, as its guest has
        probes = host_noise(spec.host_noise_s, spec.working_set(min(spec.ram_mib)))
        meta["host_noise"] = {"host": socket.gethostname(), **probes}
        log(f"the host's and Unicorn's own speed (lab/hostnoise.py): {describe(probes)}")
    systems = SYSTEMS if spec.with_qemu else SYSTEMS[:1]
    _write_json(out / "metadata.json", meta)  # now: a run stopped in its first block has it too
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()

        def emit(r: dict[str, Any]) -> None:
            writer.writerow(r)
            f.flush()

        # ABBA: the first system alternates from one size to the next, for every condition
        pairs = [(ram, condition, systems if (i + j) % 2 == 0 else tuple(reversed(systems)))
                 for i, ram in enumerate(spec.ram_mib) for j, condition in enumerate(spec.conditions)]
        if client is None:
            for ram, condition, order in pairs:
                for system in order:
                    log(f"{system}: {ram} MiB, {condition}")
                    meta["blocks"].append(_one_block(spec, system, ram, condition, emit))
                    _write_json(out / "metadata.json", meta)
        else:
            _on_dask(client, spec, pairs, emit, meta, out, log)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(out / "metadata.json", meta)
    return csv_path


def _pair_task(spec: ReproSpec, ram: int, condition: str, order: tuple[str, ...]) -> dict[str, Any]:
    """One Dask task: the blocks of one (size, condition), both systems in ``order``, on this
    worker; the rows measured, the blocks' metadata, and the error that stopped it (or "")."""
    rows: list[dict[str, Any]] = []
    blocks: list[dict[str, Any]] = []
    try:
        for system in order:
            blocks.append(_one_block(spec, system, ram, condition, rows.append))
    except Exception as e:  # noqa: BLE001 - reported to the client with the rows kept
        return {"rows": rows, "blocks": blocks, "error": f"{type(e).__name__}: {e}"}
    return {"rows": rows, "blocks": blocks, "error": ""}


def _on_dask(client: Any, spec: ReproSpec, pairs: list[tuple[int, str, tuple[str, ...]]],
             emit: Callable[[dict[str, Any]], None], meta: dict[str, Any], out: Path,
             log: Callable[[str], None]) -> None:
    from distributed import as_completed as dask_completed

    from lab.sweep import TIMED, check_timed_resource

    check_timed_resource(client)
    futures = [client.submit(_pair_task, spec, ram, cond, order, pure=False, resources={TIMED: 1})
               for ram, cond, order in pairs]
    failed = []
    for fut in dask_completed(futures):
        res = fut.result()
        for r in res["rows"]:
            emit(r)
        meta["blocks"].extend(res["blocks"])
        _write_json(out / "metadata.json", meta)
        hosts = sorted({r["host"] for r in res["rows"]}) or ["?"]
        log(f"pair done on {', '.join(hosts)}: {len(res['rows'])} rows" + (f"; failed: {res['error']}" if res["error"] else ""))
        if res["error"]:
            failed.append(res["error"])
    if failed:
        raise ReproError(f"{len(failed)} of {len(pairs)} (size, condition) pairs failed (their rows measured so far are kept "
                         f"in {out / 'runs.csv'}): {failed[0]}")


def _one_block(spec: ReproSpec, system: str, ram: int, condition: str,
               emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    start = (functools.partial(qemu_guest, cache_direct=spec.qemu_cache == "direct") if system == "qemu"
             else snaplab_guest)
    with tempfile.TemporaryDirectory(prefix="snaplab-repro-", dir="/var/tmp") as d:
        w = Path(d)
        # The fill files are written before the page cache is dropped, so no writeback of them
        # falls into either system's measurements.
        loaders = (qemu_lab.fill_files(w, ram, spec.seed, contiguous=system == "snaplab")
                   if condition == "idle-random" else [])
        t0 = time.monotonic()
        want, why = spec.warm_bytes(ram)
        warmed = warm_memory(want)
        warm_s = time.monotonic() - t0
        warmed_at = time.time()  # beside the rows' started_at: how long the warmth had to last
        drop_caches()
        with start(w, ram, spec.workload(condition, ram), loaders) as g:
            measure_block(g, spec, condition, ram, emit)
            return {"system": system, "ram_mib": ram, "workload": condition, "command": g.argv,
                    "warmed_bytes": warmed, "warm_s": round(warm_s, 3),
                    "warm": why, "warmed_at": warmed_at, "host": socket.gethostname()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def mount_fstype(path: str) -> str:
    """The file system type of the mount holding ``path`` (/proc/self/mounts: ``ext4``, not the
    ``ext2/ext3`` that ``stat -f`` names the whole ext family by)."""
    best, fstype = "", "unknown"
    real = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return fstype
    for ln in lines:
        parts = ln.split()
        if len(parts) >= 3:
            mnt = parts[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    return fstype


def metadata(spec: ReproSpec, out: Path) -> dict[str, Any]:
    """Where and how: host, kernel, CPU, memory, storage, versions, the command line."""
    from importlib import metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    qemu = ""
    if shutil.which("qemu-system-x86_64"):
        qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), "")
    usage = shutil.disk_usage("/var/tmp")
    fs = mount_fstype("/var/tmp")
    return {
        "spec": asdict(spec), "command": COMMAND_LINE or "(Python: lab.reproduce.reproduce with the spec above)",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
        "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(), "memory": mem,
        "storage": {"workdir": "/var/tmp", "filesystem": fs, "free_bytes": usage.free},
        "page_cache": "fill files written, then host memory touched and freed (each block's `warm` and "
                      "`warmed_bytes` say how much and why), os.sync() and /proc/sys/vm/drop_caches=3 before each block"
                      + ("" if os.access("/proc/sys/vm/drop_caches", os.W_OK) else " (NOT dropped: not root)")
                      + "; snaplab's VM state written and read around the page cache (O_DIRECT, docs/deviations.md 57), "
                      + ("QEMU's too (cache.direct=on on its image's file node)" if spec.qemu_cache == "direct" else
                         "QEMU's through it (its default, cache.direct=off)"),
        "versions": {"snaplab": version("snaplab"), "unicorn": version("unicorn"),
                     "python": platform.python_version(), "qemu": qemu},
        "source": source_revision(),  # the commit measured, and whether tracked files differed from it
        "definitions": {"downtime_ms": "STOP -> RESUME, QMP event timestamps",
                        "guest_iterations": "the guest's iteration counter (pages written) at the command; every "
                                            "dirty-condition operation waits for spec.touched_ws working sets' worth",
                        "total_s": "command sent (host wall clock) -> JOB_STATUS_CHANGE concluded or "
                                   "MIGRATION completed (event timestamp); the background snapshot's "
                                   "command is migrate-set-capabilities background-snapshot=on, then migrate",
                        "progress_ratio": "guest progress rate between command and completion / rate in "
                                          "the second before (host-timestamped progress samples)",
                        "rate_before": "guest iterations (pages written) a second in the second before the "
                                       "command; the guest counts as steady when it is within "
                                       f"{STEADY_TOLERANCE:.0%} of its configured rate",
                        "rate_during": "guest iterations a second between command and completion"},
        "engines": {"save": {name: engine_title(name) for name in save_engines()},
                    "load": {name: engine_title(name, "load") for name in load_engines()}},
        "blocks": [],
    }
