"""Restore to full speed: every load policy on one snapshot, measured to the guest's full speed.

A guest whose RAM is full (random bytes everywhere) runs a workload that, after a restore,
touches a working set placed at a seeded random offset of RAM.  One snapshot is taken; each
load policy (the registry's load engines) then restores it ``runs`` times, policies
interleaved.  For every load, from the command on: when the guest resumed (RESUME), when it
first reported progress, when its progress rate first reached 50% and 90% of its rate in the
second before the command (the lab port's samples: each is one batch of page stamps), the
faults and how long each one stalled the guest, when RAM was all resident, the bytes read.

Definitions (the same for every policy):
- ``rate_before``: the guest's steady rate before the command: the median, over the
  ``settle_s`` before it (2 s), of its rate in 20 ms windows (1 ms grid).  A median of short windows, not
  a mean: the guest's rate wanders by +-25% from one half second to the next with nothing
  else running (measured: 1.2-2.4 M iterations/s at 4 GiB), and a reference taken in a fast
  half second would make "back to speed" wait for the next fast one.  On the Intel Xeon host
  it halved for seconds at a time with no snapshot at all (7.6 -> 4.0 M/s at 1 GiB), as a
  bare Unicorn loop does there too (lab/hostnoise.py, which measures it before an experiment;
  the cause was not found);
- ``rate_after``: the same median over the last second watched (from RESUME at the
  earliest).  Beside ``rate_before`` it shows a guest that ended the watch slower than it
  began: because its speed switched, or because the load's filler still runs then (a paced
  prefetch fill lasts tens of seconds; ``resident_s`` says);
- ``toX_ms``: command -> the first instant ``t`` at which the iterations over [t, t + window]
  reach X of ``rate_before`` (window 20 ms), found on a 1 ms grid of the interpolated samples;
  NaN if not within the watch (``horizon_s``), and then counted as later than every other load
  in medians and quartiles (:func:`late_quantiles`), never dropped;
- ``resume_ms``: command -> RESUME (the events' timestamps);
- ``first_instr_ms``: command -> the vCPU's first entry into the guest after RESUME (stamped
  on the vCPU thread just before its ``emu_start``: the first guest instruction; a lazy load's
  first instruction may fault at once);
- ``first_progress_ms``: command -> the first progress sample after RESUME (the guest's first
  finished batch);
- ``resident_s``: RESUME -> the last chunk of RAM in place (a blocking load: 0);
- the ``control`` rows (``RestoreSpec.control``, :data:`CONTROL`): in each run, the same watch
  with no load: the reference rate over the ``settle_s`` before an instant at which nothing is
  sent, then the same windows after it.  Its ``toX_ms`` is the wait from that one instant; the
  noise floor under every policy's figure is the distribution of that wait from every instant of
  the control watches (:func:`noise_floor`): with a single instant per run, five zeros can hide
  an undisturbed guest that spends hundreds of milliseconds under 90% now and then;
- the ``disk`` rows (``RestoreSpec.disk_floor``): in each run, with the guest running, a bare
  read of as many bytes as the working set's from the middle of the snapshot's image, one
  2 MiB chunk at a time (``serial_ms``: the reads of a load whose guest faults on one chunk
  after another) and with the prefetch policy's readers and groups (``parallel_ms``);
  lab/diskfloor.py, which says what they are not.  :func:`disk_summary` and
  :func:`disk_pairs` set the policies' times beside them.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emulator.block import BlockGraph, Qcow2Image
from emulator.guest import DATA_BASE, WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig
from lab.diskfloor import disk_floor
from lab.spec import load_engines, waits_for_complete
from lab.stats import late_median, late_quantiles

ENGINE_ARG = "__org.snaplab_engine"
WINDOW_NS = 20_000_000
GRID_NS = 1_000_000
WATCH_POLL_S = 1.0  # how often a load's watch reads the lab port's samples (its ring fills in ~7 s)
AFTER_NS = 1_000_000_000  # rate_after: the guest's rate over the last second a load is watched
CHUNK = 2 << 20
PACED_BATCH = 4096  # pages per batch of a paced guest (RestoreSpec.rate_mib_s)


@dataclass(frozen=True)
class RestoreSpec:
    """One restore experiment; ``seed`` fixes the RAM contents, the working set's place and
    the guest's page sequence."""

    ram_mib: int = 1024
    ws_mib: int = 64
    runs: int = 3
    seed: int = 1
    horizon_s: float = 5.0  # how long after the command progress is watched
    settle_s: float = 2.0  # the guest runs this long between loads; its rate over it is the reference
    policies: tuple[str, ...] = ()  # default: every load engine
    fill_random: bool = True  # RAM full of random bytes before boot (else only what the guest writes)
    control: bool = False  # also a watch with no load in each run (:data:`CONTROL`): the host's own noise floor
    # the guest's pace, MiB of page stamps a second (0: as fast as it runs).  Unpaced, its rate
    # wanders with the host's (+-25-40% over seconds here), and "90% of its rate before" with it;
    # paced below its slowest speed, its rate is the pace whenever nothing holds it up
    rate_mib_s: int = 0
    # in each run, a bare read of as many bytes as the working set's from the snapshot's image
    # (lab.diskfloor): the disk's own speed beside the loads' times to speed, in the same run
    disk_floor: bool = False

    def workload(self) -> WorkloadSpec:
        span = (self.ram_mib << 20) - DATA_BASE - (self.ws_mib << 20)
        rng = np.random.default_rng(self.seed)
        offset = int(rng.integers(0, max(span // CHUNK, 1))) * CHUNK
        # paced: batches of PACED_BATCH pages (a deadline every few ms at the paces used, several per
        # 20 ms window), each stamped as fast as the guest runs and then a sleep until its deadline
        return WorkloadSpec("dirty", seed=self.seed, working_set=self.ws_mib << 20, rate=self.rate_mib_s << 20,
                            pattern="random", batch_pages=PACED_BATCH if self.rate_mib_s else 64, ws_offset=offset)


def rate_between(samples: np.ndarray, t0_ns: int, t1_ns: int) -> float:
    """Guest iterations per second over [t0, t1] (host monotonic ns), from lab-port samples
    (rows: vclock, host_ns, iterations, ...) interpolated at both ends."""
    ts, its = samples[:, 1].astype(np.float64), samples[:, 2].astype(np.float64)
    keep = (ts >= t0_ns - 50e6) & (ts <= t1_ns + 50e6)
    if keep.sum() < 2:
        return float("nan")
    i0, i1 = np.interp([t0_ns, t1_ns], ts[keep], its[keep])
    return float((i1 - i0) / ((t1_ns - t0_ns) / 1e9))


def _window_rates(ts: np.ndarray, its: np.ndarray, start: float, stop: float) -> tuple[np.ndarray, np.ndarray]:
    """The grid (GRID_NS apart, from ``start`` while a whole WINDOW_NS fits before ``stop``) and the
    rate (iterations per second) over [t, t + WINDOW_NS] at each of its points, interpolated."""
    grid = np.arange(start, stop - WINDOW_NS, GRID_NS, dtype=np.float64)
    return grid, (np.interp(grid + WINDOW_NS, ts, its) - np.interp(grid, ts, its)) / (WINDOW_NS / 1e9)


def steady_rate(samples: np.ndarray, t0_ns: int, t1_ns: int) -> float:
    """The median over [t0, t1] of the guest's rate in WINDOW_NS windows on a GRID_NS grid
    (iterations per second).  The windows end at the last sample before ``t1``: the guest may
    not have reported in the last milliseconds (measured on a 2-core host: up to 200 ms
    without a sample before a command).  NaN unless the samples start by ``t0`` and cover at
    least half the span."""
    ts, its = samples[:, 1].astype(np.float64), samples[:, 2].astype(np.float64)
    keep = (ts >= t0_ns - 50e6) & (ts < t1_ns)  # after t1 the load may have reset the counter
    if keep.sum() < 2 or ts[keep][0] > t0_ns or ts[keep][-1] - t0_ns < (t1_ns - t0_ns) / 2:
        return float("nan")
    ts, its = ts[keep], its[keep]
    return float(np.median(_window_rates(ts, its, t0_ns, ts[-1])[1]))


def recovery_ms(samples: np.ndarray, cmd_ns: int, resume_ns: int, rate0: float,
                levels: tuple[float, ...] = (0.5, 0.9)) -> dict[str, float]:
    """Command -> first progress, and command -> the rate reaching each level of ``rate0``
    (see the module docstring); NaN where it was not reached within the samples."""
    ts, its = samples[:, 1].astype(np.float64), samples[:, 2].astype(np.float64)
    after = ts >= resume_ns
    out = {"first_progress_ms": float((ts[after][0] - cmd_ns) / 1e6) if after.any() else float("nan")}
    ts, its = ts[after], its[after]
    if len(ts) < 2 or not rate0 > 0:
        return out | {f"to{int(lv * 100)}_ms": float("nan") for lv in levels}
    grid, rate = _window_rates(ts, its, resume_ns, ts[-1])
    for lv in levels:
        hit = np.flatnonzero(rate >= lv * rate0)
        out[f"to{int(lv * 100)}_ms"] = float((grid[hit[0]] - cmd_ns) / 1e6) if len(hit) else float("nan")
    return out


def timeline(samples: np.ndarray, cmd_ns: int, resume_ns: int, rate0: float, step_ms: float = 5.0,
             span_ms: tuple[float, float] = (-200.0, 3000.0), interpolate: bool = False) -> dict[str, list[float]]:
    """The guest's progress rate as a fraction of ``rate0``, in ``step_ms`` bins from
    ``span_ms[0]`` to ``span_ms[1]`` after the command (0 while it is stopped: no samples; a
    bin after the command counts only samples after RESUME, as the load resets the counter;
    NaN after the last sample: the guest was no longer watched).  By default a bin counts the
    iterations between its first and its last sample; ``interpolate``: the iteration count is
    interpolated at the bin's edges instead, so a bin with one sample (or none, inside a
    stretch the guest ran through) is not read as a stall (for bins of 1 ms, where the
    progress between two bins' samples would be a large share)."""
    ts, its = samples[:, 1].astype(np.float64), samples[:, 2].astype(np.float64)
    edges = cmd_ns + np.arange(span_ms[0], span_ms[1] + step_ms, step_ms) * 1e6
    lo = np.where(edges[1:] > cmd_ns, np.maximum(edges[:-1], resume_ns), edges[:-1])
    if interpolate:
        before, after = ts < cmd_ns, ts >= resume_ns  # two counters: the load resets it
        done = np.zeros(len(lo))
        for part, sel in ((before, edges[1:] <= cmd_ns), (after, edges[1:] > resume_ns)):
            if part.sum() >= 2:
                t_p, i_p = ts[part], its[part]
                a = np.interp(np.clip(lo[sel], t_p[0], t_p[-1]), t_p, i_p)
                b = np.interp(np.clip(edges[1:][sel], t_p[0], t_p[-1]), t_p, i_p)
                done[sel] = b - a
    else:
        i0 = np.searchsorted(ts, lo, "left")
        i1 = np.searchsorted(ts, edges[1:], "left") - 1
        ok = (i1 > i0) & (i0 < len(ts))
        done = np.where(ok, its[np.clip(i1, 0, len(ts) - 1)] - its[np.clip(i0, 0, len(ts) - 1)], 0.0)
    frac = done / (step_ms / 1e3) / rate0 if rate0 > 0 else np.full(len(done), np.nan)
    frac = np.where(edges[1:] > ts[-1], np.nan, frac) if len(ts) else frac  # past the last sample: not watched
    return {"t_ms": ((edges[:-1] - cmd_ns) / 1e6).round(3).tolist(), "rate_frac": np.round(frac, 4).tolist()}


def stall_histogram(latencies_s: list[float]) -> dict[str, Any]:
    """Per-fault stalls: percentiles and counts in log-spaced bins (10 us .. 1 s)."""
    lat = np.asarray(latencies_s, dtype=np.float64)
    edges = np.logspace(-5, 0, 11)
    counts = np.histogram(np.clip(lat, edges[0], edges[-1]), bins=edges)[0] if len(lat) else np.zeros(10, int)

    def pct(q: float) -> float:
        return float(np.percentile(lat, q) * 1e3) if len(lat) else 0.0

    return {"stall_p50_ms": pct(50), "stall_p99_ms": pct(99), "stall_max_ms": pct(100),
            "stall_total_ms": float(lat.sum() * 1e3), "stall_bins_s": edges.tolist(),
            "stall_counts": counts.tolist()}


def _fill_random(m: Machine, seed: int) -> None:
    """Random bytes over every data page (the guest's code and stack below DATA_BASE stay)."""
    rng = np.random.default_rng(seed + 1)
    step = 64 << 20
    for addr in range(DATA_BASE, m.config.ram_size, step):
        n = min(step, m.config.ram_size - addr)
        m.ram.write(addr, rng.integers(0, 1 << 63, n // 8, dtype=np.int64).tobytes())


def _machine(spec: RestoreSpec, wd: Path) -> tuple[Machine, BlockGraph]:
    disk = wd / "disk0.qcow2"
    Qcow2Image.create(disk, 1 << 30).close()
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(disk), "node-name": "disk0-file"})
    g.add({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"})
    cfg = MachineConfig(ram_size=spec.ram_mib << 20, workload=spec.workload(),
                        disks=[DiskSpec("disk0", "disk0-dev")])
    return Machine(cfg, g), g


def _samples_since(m: Machine, t0_ns: int) -> np.ndarray:
    """The lab port's samples from ``t0_ns`` (host monotonic ns) on, and a few before: the
    last N, N doubled until the oldest is older (a fast guest reports ~100,000 a second, so
    a fixed N may not reach back over the settle span)."""
    n = 65536
    while True:
        got = m.lab.history_array(n)
        if len(got) < n or not len(got) or int(got[0, 1]) <= t0_ns:
            return got
        n *= 2


def _watch(m: Machine, mark: int, until_ns: int, before: int = 1 << 16) -> np.ndarray:
    """The lab port's samples from ``before`` samples ahead of its ``mark``-th (its count when
    the command was sent: the timeline starts 200 ms before it) until ``until_ns`` (host
    monotonic), read every WATCH_POLL_S on the way and joined.  Read once at the end, a long
    watch lost its start: the port keeps 2**20 samples, and the unthrottled guest rings up to
    ~140,000 times a second, so at 16 GiB (watched 11 s) the first seconds after RESUME were
    gone and "first progress" came out seconds late (found 2026-12-05 in bench_restore's
    16 GiB runs: late exactly when the guest ran fast)."""
    parts = []
    mark = max(mark - before, 0)
    while True:
        now = time.monotonic_ns()
        if now < until_ns:
            time.sleep(min(WATCH_POLL_S, (until_ns - now) / 1e9))
        rows, mark = m.lab.history_since(mark)
        parts.append(rows)
        if time.monotonic_ns() >= until_ns:
            return np.concatenate(parts)


def _load_once(m: Machine, policy: str, job: str, spec: RestoreSpec) -> dict[str, Any]:
    """One snapshot-load of 'base' with ``policy``, watched to the horizon.  One client per
    load, closed after it: a client left open stays subscribed, and every later event is
    encoded for it too, inside the next loads' command-to-RESUME path (measured at 1 GiB over
    ten loads: median 0.9 ms with one client, 1.2 ms with a new one left open per load)."""
    with m.qmp() as q:
        return _load_with(m, q, policy, job, spec)


def _load_with(m: Machine, q: Any, policy: str, job: str, spec: RestoreSpec) -> dict[str, Any]:
    q.events()
    before = _samples_since(m, time.monotonic_ns() - int((spec.settle_s + 0.2) * 1e9))  # not timed
    epoch_off = time.time() - time.monotonic()
    mark = m.lab.count
    cmd_ns = time.monotonic_ns()
    q.execute("snapshot-load", {"job-id": job, "tag": "base", "vmstate": "disk0", "devices": ["disk0"],
                                ENGINE_ARG: policy})
    # The guest is watched to the horizon (a paced fill can run for far longer than the lab
    # port's ring keeps samples).  On demand: faults only until then, then job-complete has
    # the rest filled.
    samples = _watch(m, mark, cmd_ns + int(spec.horizon_s * 1e9))
    info = q.wait_job(job, 3600, complete=waits_for_complete(policy))
    if "error" in info:
        raise RuntimeError(f"snapshot-load ({policy}) failed: {info['error']}")
    stats = q.execute("__org.snaplab_query-snapshot-stats", {"id": job})
    q.execute("job-dismiss", {"id": job})
    ev = {e.event: e.timestamp for e in q.events() if e.event in ("STOP", "RESUME")}
    resume_ns = int((ev["RESUME"] - epoch_off) * 1e9)
    row: dict[str, Any] = {"policy": policy, **_progress_fields(before, samples, cmd_ns, resume_ns, spec),
                           "resume_ms": (resume_ns - cmd_ns) / 1e6,
                           "first_instr_ms": ((int(stats["first-instruction-ns"]) - cmd_ns) / 1e6
                                              if stats.get("first-instruction-ns") else float("nan")),
                           "stopped_ms": (ev["RESUME"] - ev["STOP"]) * 1e3, **_load_fields(stats)}
    return row | stall_histogram(list(stats.get("fault-latency-s", [])))


def _progress_fields(before: np.ndarray, samples: np.ndarray, cmd_ns: int, resume_ns: int,
                     spec: RestoreSpec) -> dict[str, Any]:
    """A watch's progress figures (a load's or a control's): the rate before the command, over
    the last second watched, the times to speed (:func:`recovery_ms`) and the timelines."""
    rate0 = steady_rate(before, cmd_ns - int(spec.settle_s * 1e9), cmd_ns)
    after = samples[samples[:, 1] >= resume_ns]  # the load resets the counter: RESUME on only
    end_ns = int(after[-1, 1]) if len(after) else resume_ns
    return {"rate_before": rate0,
            # the last second watched: a host that slowed (lab/hostnoise.py) shows here
            "rate_after": (steady_rate(after, max(end_ns - AFTER_NS, int(after[0, 1])), end_ns)
                           if len(after) > 1 else float("nan")),
            **recovery_ms(samples, cmd_ns, resume_ns, rate0),
            # the whole watch, and its first 100 ms in 1 ms bins (a small guest is back within it)
            # (a paced guest reports a batch every few ms: its 5 ms bins are interpolated, or a bin
            # holding one report would read as a stall)
            "timeline": timeline(samples, cmd_ns, resume_ns, rate0, span_ms=(-200.0, spec.horizon_s * 1e3),
                                 interpolate=spec.rate_mib_s > 0),
            "timeline_fine": timeline(samples, cmd_ns, resume_ns, rate0, step_ms=1.0, span_ms=(-10.0, 100.0),
                                      interpolate=True)}


def _load_fields(stats: dict[str, Any]) -> dict[str, Any]:
    """A load's own figures from ``__org.snaplab_query-snapshot-stats`` (a control, which loads
    nothing, passes only ``total-s``: zeros and empty lists)."""
    return {"faults": int(stats.get("faults", 0)),
            "resident_s": float(stats.get("resident-s", 0.0)),
            "bytes_read": int(stats.get("bytes-read", stats.get("vmstate-bytes", 0))),
            "prefetched_chunks": int(stats.get("prefetched-chunks", 0)),
            "grouped_chunks": int(stats.get("grouped-chunks", 0)),  # of those, read with a neighbour in one read
            "prefetch_s": float(stats.get("prefetch-s", 0.0)),
            "prefetch_start_s": float(stats.get("prefetch-start-s", 0.0)),
            "recorded_chunks": int(stats.get("recorded-chunks", 0)),
            "recorded_set": list(stats.get("recorded-set", [])),
            "loading_set": list(stats.get("loading-set", [])),
            "total_s": float(stats["total-s"]),
            # the memory map (lab.plot.lazy_windows): ms after RESUME; each chunk as it
            # came in, [ms, chunk, 0 fault / 1 set / 2 rest, 1 if all zero]
            "fault_at_ms": [t * 1e3 for t in stats.get("fault-at-s", [])],
            "fault_chunk": list(stats.get("fault-chunk", [])),
            "fill_log": [[t * 1e3, c, by, z] for t, c, by, z in stats.get("fill-log", [])],
            "chunks": int(stats.get("chunks", 0))}


CONTROL = "control"
"""The policy name of a control row: the same watch with no command sent (:func:`_control_once`)."""


def _control_once(m: Machine, spec: RestoreSpec) -> dict[str, Any]:
    """The watch of a load, with no load: the same reference rate, the same windows, from an
    instant at which nothing is sent.  Its ``to90_ms`` is how long a guest that was never
    stopped takes to "reach" 90% of its rate before: 0 on a steady host; more where the host's
    or Unicorn's speed dropped by itself (lab/hostnoise.py) -- the noise floor under every
    policy's figure, measured in the same run."""
    before = _samples_since(m, time.monotonic_ns() - int((spec.settle_s + 0.2) * 1e9))
    mark = m.lab.count
    cmd_ns = time.monotonic_ns()
    samples = _watch(m, mark, cmd_ns + int(spec.horizon_s * 1e9))
    return {"policy": CONTROL, **_progress_fields(before, samples, cmd_ns, cmd_ns, spec),
            "resume_ms": 0.0, "first_instr_ms": 0.0, "stopped_ms": 0.0,
            **_load_fields({"total-s": 0.0})} | stall_histogram([])


def waits_to_level(row: dict[str, Any], level: float = 0.9, every_ms: float = 20.0,
                   min_left_ms: float = 500.0) -> np.ndarray:
    """From every ``every_ms`` of a watch after its command (its 5 ms ``timeline``), how long
    until a 20 ms window's rate reaches ``level`` of the rate before: ``toX_ms``'s rule, with
    the clock started at each instant instead of at the command (ms; inf where not reached
    within the watch).  Only starts with at least ``min_left_ms`` of the watch after them."""
    t = np.asarray(row["timeline"]["t_ms"], dtype=np.float64)
    f = np.asarray(row["timeline"]["rate_frac"], dtype=np.float64)[t >= 0]
    step = float(t[1] - t[0]) if len(t) > 1 else 5.0
    n = int(round(WINDOW_NS / 1e6 / step))  # bins per 20 ms window
    watched = int(np.count_nonzero(~np.isnan(f)))
    if watched < n:
        return np.zeros(0)
    win = np.convolve(f[:watched], np.ones(n) / n, mode="valid")  # the window starting at each bin
    # for each bin, the first bin at or after it whose window is at the level (inf: none)
    at = np.where(win >= level, np.arange(len(win), dtype=np.float64), np.inf)
    first = np.minimum.accumulate(at[::-1])[::-1]
    starts = np.arange(0, max(watched - int(min_left_ms / step), 0) + 1, max(int(every_ms / step), 1))
    starts = starts[starts < len(win)]
    return (first[starts] - starts) * step


def noise_floor(rows: list[dict[str, Any]], level: float = 0.9) -> dict[str, float]:
    """Over the control rows (:data:`CONTROL`), :func:`waits_to_level` from every start: how
    long an undisturbed guest takes to "reach" ``level`` of its rate before, from a random
    instant -- what a load's ``toX_ms`` is to be read against.  The share of starts that waited
    at least 60 and 200 ms, the median, 90th percentile and longest wait (ms)."""
    waits = np.concatenate([waits_to_level(r, level) for r in rows if r["policy"] == CONTROL] or [np.zeros(0)])
    if not len(waits):
        return {"starts": 0.0}
    return {"starts": float(len(waits)), "share_60ms": float(np.mean(waits >= 60)), "share_200ms": float(np.mean(waits >= 200)),
            "p50_ms": float(np.percentile(waits, 50)), "p90_ms": float(np.percentile(waits, 90)), "max_ms": float(np.max(waits))}


def restore_experiment(spec: RestoreSpec, progress: Callable[[dict[str, Any]], None] | None = None,
                       workdir: str | Path | None = None) -> dict[str, Any]:
    """Every policy loaded ``spec.runs`` times on one snapshot; returns the spec, the rows, the
    untimed first loads (``warm``: the first prefetch load records its loading set) and, with
    ``spec.disk_floor``, the disk's own reads in each run (``disk``: lab.diskfloor, or the
    error that kept one from being measured)."""
    policies = spec.policies or load_engines()
    with tempfile.TemporaryDirectory(prefix="snaplab-restore-", dir=workdir or "/var/tmp") as tmp:
        m, g = _machine(spec, Path(tmp))
        rows: list[dict[str, Any]] = []
        try:
            if spec.fill_random:
                _fill_random(m, spec.seed)
            m.start()
            m.snapshots.write_protector()  # one-time userfaultfd setup, not part of any load
            q = m.qmp()
            time.sleep(1.0 + spec.settle_s)
            q.execute("snapshot-save", {"job-id": "save", "tag": "base", "vmstate": "disk0", "devices": ["disk0"]})
            if "error" in (info := q.wait_job("save", 600)):
                raise RuntimeError(f"snapshot-save failed: {info['error']}")
            q.execute("job-dismiss", {"id": "save"})
            warm = []
            for p in policies:  # one untimed load each: the first prefetch load records the loading set
                time.sleep(spec.settle_s)
                warm.append(_load_once(m, p, f"warm-{p}", spec) | {"run": -1})
            names = (*policies, CONTROL) if spec.control else tuple(policies)  # the control rotates with them
            disk: list[dict[str, Any]] = []
            for run in range(spec.runs):
                if spec.disk_floor:  # with the guest running, as during the loads (every fill has ended)
                    try:
                        disk.append(disk_floor(Path(tmp) / "disk0.qcow2", spec.ws_mib << 20, seed=spec.seed + run,
                                               parallel_first=run % 2 == 0) | {"run": run})
                    except (OSError, ValueError, MemoryError) as err:  # a reference lost, not the run
                        disk.append({"run": run, "error": f"{type(err).__name__}: {err}"})
                order = names[run % len(names):] + names[:run % len(names)]
                for p in order:
                    time.sleep(spec.settle_s)
                    row = (_control_once(m, spec) if p == CONTROL else _load_once(m, p, f"load-{p}-{run}", spec)) | {"run": run}
                    rows.append(row)
                    if progress is not None:
                        progress(row)
            q.execute("quit")
        finally:
            m.close()
            g.close()
    return {"spec": asdict(spec) | {"ws_offset": spec.workload().ws_offset}, "rows": rows, "warm": warm,
            "disk": disk}


LATE_KEYS = ("first_progress_ms", "to50_ms", "to90_ms")  # times to an event NaN when it came after the watch


def has_reference(row: dict[str, Any]) -> bool:
    """Whether a load had a reference rate to measure its way back to (``rate_before`` > 0; a
    row without the field, as in a hand-made one, counts as having one)."""
    return bool(row.get("rate_before", 1.0) > 0)


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per policy: medians of the figures the bench prints.  Times to progress and to 50%/90% of
    the guest's speed count a load that did not get there within its watch as later than all the
    others (:func:`late_quantiles`), and ``to90_late`` says how many did not, of ``loads``; a
    load with no reference rate (:func:`has_reference`) is left out of those, as unknown rather
    than late, and counted in ``unknown``.  The
    other figures are medians of the loads that have them."""
    out: dict[str, dict[str, float]] = {}
    for p in dict.fromkeys(r["policy"] for r in rows):
        rs = [r for r in rows if r["policy"] == p]
        ref = [r for r in rs if has_reference(r)]  # without one, no toX at all: unknown, not late

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a figure no load has: NaN
            med = {k: (late_median([r[k] for r in (rs if k == "first_progress_ms" else ref)]) if k in LATE_KEYS
                       else float(np.nanmedian([r[k] for r in rs])))
                   for k in ("resume_ms", "first_instr_ms", "first_progress_ms", "to50_ms", "to90_ms", "faults",
                             "resident_s", "bytes_read", "stall_p99_ms")}
        q1, q3 = late_quantiles([r["to90_ms"] for r in ref], [25, 75])
        med["to90_iqr_ms"] = q3 - q1
        med["to90_late"] = float(sum(1 for r in ref if np.isnan(r["to90_ms"])))
        med["loads"] = float(len(ref))  # the loads the times to speed are over
        med["unknown"] = float(len(rs) - len(ref))
        out[p] = med
    return out


def disk_summary(disk: list[dict[str, Any]], summary: dict[str, dict[str, float]],
                 parallel: tuple[str, ...] = (), serial: tuple[str, ...] = ()) -> dict[str, float]:
    """The ``disk`` rows' medians and ranges (ms; rows with an ``error`` left out and counted in
    ``errors``) and, beside them, the median to90 of each policy of ``parallel`` over the
    parallel read (``<policy>_over_parallel``) and of each of ``serial`` over the serial one
    (the caller names them: the prefetch policy reads like the first, a faulting one like the
    second).  Ratios of medians from unpaired measurements: the reads ran once per run, not
    beside each load (:func:`disk_pairs` pairs them run by run)."""
    ok = [d for d in disk if "error" not in d]
    if not ok:
        return {"errors": float(len(disk))} if disk else {}
    out = {"mib": ok[0]["bytes"] / 2**20, "page_cache": float(any(d["page_cache"] for d in ok)),
           "errors": float(len(disk) - len(ok))}
    for names, way in ((parallel, "parallel"), (serial, "serial")):
        ms = [d[f"{way}_ms"] for d in ok]
        out |= {f"{way}_ms": float(np.median(ms)), f"{way}_min_ms": float(min(ms)), f"{way}_max_ms": float(max(ms))}
        out |= {f"{p}_over_{way}": summary[p]["to90_ms"] / out[f"{way}_ms"] for p in names if p in summary}
    return out


def disk_pairs(rows: list[dict[str, Any]], disk: list[dict[str, Any]], first: str, second: str) -> list[dict[str, float]]:
    """Run by run: the disk's reads of that run beside its loads of policies ``first`` (one that
    reads a loading set) and ``second`` -- ``first``'s set time (``prefetch_s``, RESUME -> set
    in: no look-ahead window) over the parallel read (``set_over_parallel``), ``second``'s
    to90 over ``first``'s (``to90_ratio``), and the serial over the parallel read."""
    out = []
    for d in disk:
        if "error" in d:
            continue
        by = {r["policy"]: r for r in rows if r.get("run") == d["run"]}
        if first not in by or second not in by:
            continue
        a, b = by[first], by[second]
        out.append({"run": float(d["run"]), "set_over_parallel": a["prefetch_s"] * 1e3 / d["parallel_ms"],
                    "to90_ratio": b["to90_ms"] / a["to90_ms"],
                    "serial_over_parallel": d["serial_ms"] / d["parallel_ms"]})
    return out


def table(summary: dict[str, dict[str, float]], cols: tuple[str, ...] = (
        "resume_ms", "first_progress_ms", "to50_ms", "to90_ms", "to90_iqr_ms", "to90_late", "faults",
        "stall_p99_ms", "resident_s"), digits: int = 1) -> str:
    """:func:`summarize`'s medians as a fixed-width text table, one policy per row; the control
    row (:data:`CONTROL`) shows "-" where a column is a load's (nothing resumed, faulted or filled)."""
    head = f"{'policy':>10} " + " ".join(f"{c:>17}" for c in cols)

    def cell(p: str, v: dict[str, float], c: str) -> str:
        return f"{'-':>17}" if p == CONTROL and c in LOAD_ONLY else f"{v[c]:>17.{digits}f}"

    lines = [head] + [f"{p:>10} " + " ".join(cell(p, v, c) for c in cols) for p, v in summary.items()]
    return "\n".join(lines)


LOAD_ONLY = ("resume_ms", "first_instr_ms", "faults", "stall_p99_ms", "resident_s", "bytes_read")
"""The columns that belong to a load, not to a control watch (:func:`table` prints "-")."""
