"""Measurements the teaching notebooks make, each returning plain rows a notebook prints.

* :func:`spread_table`: n, median, interquartile range and min-max of repeated measurements;
* :func:`monitor_race_snaplab` / :func:`monitor_race_qemu`: a ``snapshot-save`` followed at once
  by ``query-status``, on snaplab and on the real QEMU 7.2, with the arrival time of each reply
  (when does the monitor answer while a save runs?);
* :func:`ram_in_use_sweep`: blocking saves where the RAM size and the RAM in use vary apart;
* :func:`saved_instants`: which instant each save engine's snapshot holds, told apart by the
  guest's own iteration counter in the loaded state against the progress samples it sent.

Engines are never spelled here: the callers pass the registry's names (``lab.spec``).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emulator.migration.engines import BlockingSave
from lab.progress import iterations_at
from lab.run import ENGINE_ARG, run_experiment
from lab.session import default_machine
from lab.spec import ExperimentSpec
from lab.stats import summarize


def spread_table(rows: Sequence[dict[str, Any]], key: str, by: Sequence[str] = ("ram_mib", "engine"),
                 scale: float = 1.0, digits: int = 2) -> str:
    """One line per group of ``by``: n, median, IQR (first to third quartile) and min-max of
    ``key`` (times ``scale``)."""
    groups: dict[tuple[Any, ...], list[float]] = {}
    by = [k for k in by if any(k in r for r in rows)]  # (rows without an engine, say: not grouped by it)
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(float(r[key]) * scale)
    head = [*(f"{k:>12}" for k in by), f"{'n':>3}", f"{'median':>10}", f"{'IQR':>21}", f"{'min-max':>21}"]
    lines = [" ".join(head)]
    f = f"{{:.{digits}f}}"
    for g, vals in groups.items():
        s = summarize(vals)
        lines.append(" ".join([*(f"{str(v):>12}" for v in g), f"{s.n:>3}", f"{f.format(s.median):>10}",
                               f"{f.format(s.q1) + ' - ' + f.format(s.q3):>21}",
                               f"{f.format(s.min) + ' - ' + f.format(s.max):>21}"]))
    return "\n".join(lines)


def group_median(rows: Sequence[dict[str, Any]], key: str, **where: Any) -> float:
    """The median of ``key`` over the rows whose fields equal ``where``."""
    return summarize([float(r[key]) for r in rows if all(r[k] == v for k, v in where.items())]).median


# -- when does the monitor answer? ------------------------------------------------------------------

def fill_random(m: Any, fill_mib: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    chunk = 16 << 20
    for off in range(16 << 20, (16 << 20) + (fill_mib << 20), chunk):
        m.ram.write(off, rng.integers(0, 256, chunk, dtype=np.uint8).tobytes())


def monitor_race_snaplab(ram_mib: int = 128, fill_mib: int = 64, reps: int = 3, seed: int = 1,
                         poll_s: float = 0.002) -> list[dict[str, Any]]:
    """snaplab: ``snapshot-save`` (QEMU's blocking engine, the default) of an idle guest with
    ``fill_mib`` MiB of random bytes, then ``query-status`` at once and again every ``poll_s``
    until the guest runs again; ``reps`` times.

    The client is in process (``Machine.qmp()``): ``query-status`` goes out when the
    ``snapshot-save`` reply has come back, whereas :func:`monitor_race_qemu` writes both
    commands at once to QEMU's socket.  Every ``query-status`` reply is timed against the STOP
    and RESUME events, so a row says how many answers came while the guest was stopped.

    Times are seconds from sending ``snapshot-save``; ``stopped_s`` is STOP to RESUME; the
    phases of the stop (``zero_scan_ms``, ``write_ms``, ``commit_ms``) and the flush after it
    (``flush_ms``) come from the engine's own statistics."""
    s = default_machine(ram_mib=ram_mib, seed=seed, workload="idle")
    m = s.machine
    rows: list[dict[str, Any]] = []
    try:
        fill_random(m, fill_mib, seed)
        m.start()
        q = m.qmp()
        time.sleep(0.2)
        for rep in range(reps):
            q.events()
            job = f"race{rep}"
            t0 = time.time()
            q.execute("snapshot-save", {"job-id": job, "tag": job, "vmstate": "disk0", "devices": ["disk0"]})
            t_save = time.time()
            answers: list[tuple[float, str]] = []
            while time.time() - t0 < 300:
                status = q.execute("query-status")["status"]
                answers.append((time.time(), status))
                if status != "save-vm" and any(a[1] == "save-vm" for a in answers):
                    break
                if status != "save-vm" and len(answers) > 1 and "concluded" in _job_status(q, job):
                    break
                time.sleep(poll_s)
            info = q.wait_job(job, 300)
            ev = {e.event: e.timestamp for e in q.events() if e.event in ("STOP", "RESUME")}
            st = q.execute("__org.snaplab_query-snapshot-stats", {"id": job})
            q.execute("job-dismiss", {"id": job})
            row = _race_row("snaplab", rep, t0, t_save, answers, ev, info.get("error"), st["vmstate-bytes"],
                            t_sent=t_save)  # (the first query-status goes out once the save's reply is in)
            row.update({"zero_scan_ms": st.get("zero-scan-s", math.nan) * 1e3, "write_ms": st.get("write-s", math.nan) * 1e3,
                        "commit_ms": st.get("commit-s", math.nan) * 1e3, "flush_ms": st.get("flush-s", math.nan) * 1e3,
                        "total_s": st.get("total-s", math.nan),
                        "scanned_mib": st.get("scanned-bytes", math.nan) / 2**20})  # (the rest known zero)
            rows.append(row)
            time.sleep(0.2)
    finally:
        s.close()
    return rows


def random_fill_saves(ram_mib: int, fill_mib: int, reps: int = 5, seed: int = 1) -> list[dict[str, Any]]:
    """Blocking saves of an idle guest whose RAM holds ``fill_mib`` MiB of random bytes (QEMU's
    recorded condition), as rows like :func:`lab.run.run_experiment`'s: ``ram_mib``,
    ``working_set_mib`` (= ``fill_mib``), ``vmstate_bytes``, ``downtime_ms``, ``total_s`` and the
    phases.  Measured with :func:`monitor_race_snaplab`, whose ``query-status`` polling does not
    enter the save."""
    out = []
    for r in monitor_race_snaplab(ram_mib=ram_mib, fill_mib=fill_mib, reps=reps, seed=seed):
        out.append({**{k: r[k] for k in ("rep", "zero_scan_ms", "write_ms", "commit_ms", "flush_ms", "total_s", "scanned_mib")},
                    "ram_mib": ram_mib, "working_set_mib": fill_mib, "vmstate_bytes": r["vmstate_mib"] * 2**20,
                    "vmstate_mib": r["vmstate_mib"], "downtime_ms": r["stopped_s"] * 1e3})
    return out


def _job_status(q: Any, job: str) -> str:
    return " ".join(str(j.get("status")) for j in q.execute("query-jobs") if j.get("id") == job)


def monitor_race_qemu(ram_mib: int = 128, reps: int = 3, settle: float = 2.0) -> list[dict[str, Any]]:
    """The real QEMU 7.2 (TCG, q35, OVMF), RAM from 16 MiB on filled with random bytes by
    ``-device loader`` (lab.qemu): ``snapshot-save`` and ``query-status`` written in one
    ``sendall``, each reply timed as it arrives; ``reps`` times in one QEMU process.  Only one
    ``query-status`` is sent: QEMU reads the next command only after the save (its monitor and
    the save share the main loop), so polling would measure nothing more."""
    from lab.qemu import QemuLost

    try:
        return _monitor_race_qemu(ram_mib, reps, settle)
    except QemuLost as err:  # said, and run once more in a fresh QEMU (its rows only)
        print(f"QEMU 7.2 went away during the run, which is run again in a fresh QEMU: {err}")
        return _monitor_race_qemu(ram_mib, reps, settle)


def _monitor_race_qemu(ram_mib: int, reps: int, settle: float) -> list[dict[str, Any]]:
    from lab.qemu import running

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="snaplab-race-") as tmp, running(Path(tmp), ram_mib, settle) as q:
        for rep in range(reps):
            job = f"race{rep}"
            save = {"execute": "snapshot-save", "id": "save",
                    "arguments": {"job-id": job, "tag": job, "vmstate": "disk0", "devices": ["disk0"]}}
            status = {"execute": "query-status", "id": "status"}
            q.events.clear()
            t0 = time.time()
            q.s.sendall((json.dumps(save) + "\n" + json.dumps(status) + "\n").encode())
            got: dict[str, tuple[float, Any]] = {}
            while len(got) < 2:
                msg = q.line()
                if "event" in msg:
                    q.events.append(msg)
                else:
                    got[str(msg.get("id"))] = (time.time(), msg.get("return", msg.get("error")))
            q.wait_event(lambda e, j=job: e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {"status": "concluded", "id": j})
            info = [j for j in q.cmd("query-jobs") if j["id"] == job][0]
            q.cmd("job-dismiss", {"id": job})
            ev = {e["event"]: q.ts(e) for e in q.events if e["event"] in ("STOP", "RESUME")}
            vm = _qemu_vmstate_bytes(Path(tmp) / "disk0.qcow2", job)
            rows.append(_race_row("QEMU 7.2", rep, t0, got["save"][0], [(got["status"][0], got["status"][1]["status"])],
                                  ev, info.get("error"), vm, t_sent=t0))  # (sent with the save)
            time.sleep(0.5)
    return rows


def _qemu_vmstate_bytes(path: Path, tag: str) -> int:
    import subprocess

    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return next(int(s["vm-state-size"]) for s in json.loads(out).get("snapshots", []) if s["name"] == tag)


def _race_row(who: str, rep: int, t0: float, t_save: float, answers: Sequence[tuple[float, str]],
              ev: dict[str, float], error: Any, vmstate: int, t_sent: float) -> dict[str, Any]:
    """One repetition of the race: ``answers`` are the (arrival time, status) of every
    ``query-status`` reply; each is placed against the STOP and RESUME events, and so is
    ``t_sent``, when the first ``query-status`` was sent."""
    stop, resume = ev.get("STOP", math.nan), ev.get("RESUME", math.nan)
    t_status, status = answers[0]
    during = [t for t, st in answers if stop < t < resume and st == "save-vm"]
    return {"who": who, "rep": rep, "job error": error, "vmstate_mib": vmstate / 2**20,
            "stopped_s": resume - stop,
            "save_reply_s": t_save - t0, "status_reply_s": t_status - t0,
            "status_after_stop_ms": (t_status - stop) * 1e3, "status_sent_ms": (t_sent - stop) * 1e3,
            "status_seen": status, "statuses_seen": sorted({st for _, st in answers}),
            "status_answered_before_resume": t_status < resume,
            "answers_while_stopped": len(during),
            "first_answer_while_stopped_ms": (during[0] - stop) * 1e3 if during else math.nan}


# -- what sets a blocking save's stop? --------------------------------------------------------------

def ram_in_use_sweep(engine: str, ram_sizes: Sequence[int], in_use: Sequence[int], *, fixed_ram: int,
                     fixed_in_use: int, reps: int = 3, seed: int = 1) -> list[dict[str, Any]]:
    """Two sweeps of ``engine`` saves on the dirty guest, unthrottled, so that its working set
    is all written before the first save: RAM size varies with the RAM in use fixed
    (``fixed_in_use`` MiB written), then the RAM in use varies with the RAM size fixed."""
    rows: list[dict[str, Any]] = []
    plan = [("RAM size varies", mib, fixed_in_use) for mib in ram_sizes] + \
           [("RAM in use varies", fixed_ram, ws) for ws in in_use]
    for sweep, mib, ws in plan:
        spec = ExperimentSpec(ram_mib=mib, engine=engine, working_set_mib=ws, dirty_rate_mib_s=0,
                              seed=seed, repetitions=reps, warmup_s=0.6)
        for r in run_experiment(spec):
            rows.append({**r, "sweep": sweep, "vmstate_mib": r["vmstate_bytes"] / 2**20})
    return rows


def theil_sen(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """A robust line ``y = a + b x``: ``b`` is the median of the slopes between every pair of
    points with different x (Theil-Sen), ``a`` the median of ``y - b x``.  One outlier moves
    it far less than least squares."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    i, j = np.triu_indices(len(x), 1)
    keep = x[j] != x[i]
    if not keep.any():
        raise ValueError("theil_sen needs at least two different x values")
    b = float(np.median((y[j] - y[i])[keep] / (x[j] - x[i])[keep]))
    return float(np.median(y - b * x)), b


def undisturbed(rows: Sequence[dict[str, Any]], keys: Sequence[str] = ("zero_scan_ms", "write_ms", "commit_ms"),
                by: Sequence[str] = ("ram_mib", "working_set_mib")) -> list[dict[str, Any]]:
    """One point per configuration: the fastest repetition's time for each of ``keys`` (other
    processes can only add time, so the minimum is the best estimate of the cost itself; Python's
    ``timeit`` documentation argues the same), the median VM state written and the median RAM
    the scan read (``scanned_mib``, where the rows have it)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    return [{**dict(zip(by, g, strict=True)), **{k: min(float(r[k]) for r in rs) for k in keys},
             "vmstate_mib": summarize([float(r["vmstate_mib"]) for r in rs]).median, "n": len(rs),
             **({"scanned_mib": summarize([float(r["scanned_mib"]) for r in rs]).median}
                if all("scanned_mib" in r for r in rs) else {})}
            for g, rs in groups.items()]


def stop_model(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The two-term model of a blocking save's stop, fitted phase by phase over the undisturbed
    points (:func:`undisturbed`) with Theil-Sen: ``zero_scan_ms = scan_ms + scan_ms_per_mib_read *
    MiB read`` (``scanned_mib``: the RAM not known zero from the page tables), ``write_ms =
    write_ms + write_ms_per_mib_in_use * MiB in use``, and the commit's median over the
    configurations."""
    pts = undisturbed(rows)
    a_s, b_s = theil_sen([p["scanned_mib"] for p in pts], [p["zero_scan_ms"] for p in pts])
    a_w, b_w = theil_sen([p["vmstate_mib"] for p in pts], [p["write_ms"] for p in pts])
    return {"scan_ms": a_s, "scan_ms_per_mib_read": b_s, "write_ms": a_w, "write_ms_per_mib_in_use": b_w,
            "commit_ms": summarize([float(p["commit_ms"]) for p in pts]).median}


def predict_stop(model: dict[str, float], read_mib: float, in_use_mib: float) -> dict[str, float]:
    """The stop the two-term model predicts, by phase (ms), for ``read_mib`` MiB of RAM scanned
    (what the page tables do not show as never written) and ``in_use_mib`` MiB written out."""
    scan = model["scan_ms"] + model["scan_ms_per_mib_read"] * read_mib
    write = model["write_ms"] + model["write_ms_per_mib_in_use"] * in_use_mib
    return {"zero_scan_ms": scan, "write_ms": write, "commit_ms": model["commit_ms"],
            "downtime_ms": scan + write + model["commit_ms"]}


def never_written_scan_ms_per_mib(mib: int = 256, reps: int = 5) -> float:
    """What a zero-page scan would cost per MiB of RAM never written, were it read as QEMU reads
    every page (:meth:`BlockingSave.never_written_scan_s`: the save's own scanner over
    read-mapped memory never written), the fastest of ``reps`` runs, in ms per MiB."""
    return BlockingSave.never_written_scan_s(mib << 20, reps) * 1e3 / mib


def ram_in_use_predicted(working_set_mib: float, written_mib: float) -> float:
    """MiB of a working set touched after ``written_mib`` MiB of page writes, each to a page
    drawn uniformly at random (with repeats): ``ws * (1 - exp(-written / ws))``."""
    return working_set_mib * (1.0 - math.exp(-written_mib / working_set_mib))


def written_before_save_mib(row: dict[str, Any]) -> float:
    """MiB the dirty guest had stamped (one 4 KiB page per iteration) when the save was sent:
    its iteration counter at the last progress sample before the command (``details.timeline``)."""
    before = [it for t, it in row["details"]["timeline"] if t <= 0]
    return (max(before) if before else 0) * 4096 / 2**20


# -- which instant does a snapshot hold? ------------------------------------------------------------

PROMPT_MS = 25.0
"""A stop this soon after the command is "at the request": the command's own handling takes a
few ms (1-5 ms measured for the blocking and copy-on-write engines), while an engine that copies
RAM before its stop needs tens of ms for 128 MiB."""


def saved_instants(engines: Sequence[str], *, ram_mib: int = 128, reps: int = 3, seed: int = 7,
                   dirty_rate_mib_s: int = 50, gap_s: float = 0.3) -> list[dict[str, Any]]:
    """Save with each engine ``reps`` times on one running guest, then load each snapshot and
    read the guest's iteration counter (R13) from it.  The guest reports its counter every 256
    iterations through the lab port, with the host's monotonic time, so the saved counter is
    bracketed by two samples: the last one below it (``lo``) and the first one above it (``hi``).

    Times in a row are milliseconds from sending ``snapshot-save``: ``stop_ms``/``resume_ms``
    (the STOP and RESUME events), ``end_ms`` (the job concluded), ``saved_lo_ms``/``saved_hi_ms``.
    Each row also keeps the save's rounds where its engine has them (pre-copy): ``rounds_mib``
    (dirty MiB per round, round 0 first) and ``round0_ms``."""
    s = default_machine(ram_mib=ram_mib, seed=seed, dirty_rate_mib_s=dirty_rate_mib_s)
    m = s.machine
    todo: list[dict[str, Any]] = []
    try:
        m.start()
        q = m.qmp()
        m.snapshots.write_protector()  # one-time userfaultfd set-up, outside every measurement
        time.sleep(0.5)
        wall_minus_mono = time.time() - time.monotonic()
        for rep in range(reps):
            for eng in engines:
                q.events()
                tag = f"{eng}-{rep}"
                t0 = time.monotonic()
                q.execute("snapshot-save", {"job-id": tag, "tag": tag, "vmstate": "disk0", "devices": ["disk0"],
                                            ENGINE_ARG: eng})
                info = q.wait_job(tag, 300)
                t1 = time.monotonic()
                st = q.execute("__org.snaplab_query-snapshot-stats", {"id": tag}) if info.get("error") is None else {}
                q.execute("job-dismiss", {"id": tag})
                ev = {e.event: e.timestamp - wall_minus_mono for e in q.events() if e.event in ("STOP", "RESUME")}
                todo.append({"engine": eng, "rep": rep, "tag": tag, "t0": t0, "job error": info.get("error"),
                             "stop_ms": (ev["STOP"] - t0) * 1e3, "resume_ms": (ev["RESUME"] - t0) * 1e3,
                             "end_ms": (t1 - t0) * 1e3,
                             "rounds_mib": [b / 2**20 for b in st.get("bytes-per-round", [])],
                             "round0_ms": st["round-s"][0] * 1e3 if st.get("round-s") else math.nan})
                time.sleep(gap_s)
        time.sleep(0.1)
        hist = m.lab.history_array()
        m.stop()
        for row in todo:
            m.snapshots.load_snapshot(row["tag"], "disk0", ["disk0"])
            row["counter"] = int(m.cpu.get_state()["R13"])
    finally:
        s.close()
    host_ns = hist[:, 1].astype(np.int64)
    its = hist[:, 2].astype(np.int64)
    out = []
    for row in todo:
        c, t0 = row.pop("counter"), row.pop("t0")
        below, above = np.flatnonzero(its < c), np.flatnonzero(its > c)
        lo = (host_ns[below[-1]] / 1e9 - t0) * 1e3 if len(below) else math.nan
        hi = (host_ns[above[0]] / 1e9 - t0) * 1e3 if len(above) else math.nan
        out.append({**row, "saved_lo_ms": lo, "saved_hi_ms": hi,
                    "stop_inside_saved_bracket": bool(lo <= row["stop_ms"] <= hi),
                    "stopped": "at the request" if row["stop_ms"] < PROMPT_MS else "after copying RAM"})
    return out


def per_mib_costs(rows: Sequence[dict[str, Any]], key: str = "downtime_ms") -> dict[str, float]:
    """Least squares ``key = a + b * (MiB in use) + c * (MiB of RAM)`` over the rows: the cost
    of one more MiB in use and of one more MiB of (zero) RAM, in ``key``'s unit."""
    x = np.array([[1.0, float(r["vmstate_mib"]), float(r["ram_mib"])] for r in rows])
    y = np.array([float(r[key]) for r in rows])
    (a, b, c), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"fixed": float(a), "per MiB in use": float(b), "per MiB of RAM": float(c)}


def stop_figure(rows: Sequence[dict[str, Any]], qemu: dict[int, tuple[float, float]] | None = None,
                path: str | Path | None = None, model: dict[str, float] | None = None) -> Any:
    """Left: blocking-save downtime against RAM size with the RAM in use fixed (x in powers of
    two); right: against the VM state written (MiB) with the RAM size fixed, on linear axes from
    0, so that the two-term ``model`` (:func:`stop_model`), drawn when given, is a straight line
    whose intercept is visible; beside QEMU 7.2's recorded saves ({RAM MiB: (VM state MiB, s)}).
    Medians with interquartile bars, and every save."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    panels = (("RAM size varies", "ram_mib", "o", "-"), ("RAM in use varies", "working_set_mib", "s", "--"))
    for ax, (sweep, gkey, marker, ls) in zip(axes, panels, strict=True):
        mine = [r for r in rows if r["sweep"] == sweep]
        keys = sorted({r[gkey] for r in mine})
        xkey = "ram_mib" if gkey == "ram_mib" else "vmstate_mib"
        xs = [summarize([float(r[xkey]) for r in mine if r[gkey] == k]).median for k in keys]
        sums = [summarize([r["downtime_ms"] for r in mine if r[gkey] == k]) for k in keys]
        err = [[s.median - s.q1 for s in sums], [s.q3 - s.median for s in sums]]
        fixed = f"{mine[0]['working_set_mib']} MiB in use" if gkey == "ram_mib" else f"{mine[0]['ram_mib']} MiB of RAM"
        ax.errorbar(xs, [s.median for s in sums], yerr=err, marker=marker, color="black", capsize=3, linestyle=ls,
                    label=f"snaplab blocking save, {fixed} (median, IQR)")
        spread = 0.03 if ax is axes[0] else 0.015 * max(xs)  # (a factor on the log axis, MiB on the linear one)
        ax.scatter([float(r[xkey]) * (1 + spread * (r["rep"] - 2)) if ax is axes[0] else float(r[xkey]) + spread * (r["rep"] - 2)
                    for r in mine], [r["downtime_ms"] for r in mine],
                   s=12, color="grey", zorder=3, label="each save" if ax is axes[1] else None)
        if model is not None and ax is axes[1]:
            extra = summarize([float(r["scanned_mib"]) - float(r["vmstate_mib"]) for r in mine]).median
            line = np.linspace(min(xs), max(xs), 50)  # only over the range it was fitted on
            ax.plot(line, [predict_stop(model, x + extra, x)["downtime_ms"] for x in line], color="black",
                    linewidth=0.8, linestyle=":", label="two-term model, over the sizes it was fitted on")
    if qemu:
        qx = sorted(qemu)
        axes[1].plot([qemu[x][0] for x in qx], [qemu[x][1] * 1e3 for x in qx], marker="D", color="grey",
                     linestyle="-.", label="QEMU 7.2 savevm, RAM filled with random bytes (recorded, median of 3)")
    titles = ("RAM size varies, RAM in use fixed", "RAM in use varies, RAM size fixed")
    for ax, label, title in zip(axes, ("guest RAM (MiB)", "VM state written (MiB) = RAM in use"), titles, strict=True):
        if ax is axes[0]:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_xlim(left=0)
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1.0))
        ax.set_xlabel(label)
        ax.set_ylabel("downtime, STOP to RESUME (ms)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, linewidth=0.3)
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    labels = [lab for ax in axes for lab in ax.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


STOP_PHASES = (("zero_map_ms", "page-table walk"), ("zero_scan_ms", "zero scan"), ("write_ms", "writes (not hidden)"),
               ("commit_ms", "commit"), ("rest_ms", "rest of the stop"))
"""The phases of a blocking save's stop, in order, as :func:`typical_phases` reports them."""


def typical_phases(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration (RAM MiB, MiB in use), its typical save: the one whose downtime is the
    median (the lower of the middle two for an even count), with its phases (:data:`STOP_PHASES`;
    ``rest_ms``: the downtime less the measured phases), so the parts add up to a real stop
    rather than medians that need not."""
    out = []
    for ram, ws in sorted({(r["ram_mib"], r["working_set_mib"]) for r in rows}):
        mine = sorted((r for r in rows if (r["ram_mib"], r["working_set_mib"]) == (ram, ws)), key=lambda r: r["downtime_ms"])
        r = mine[(len(mine) - 1) // 2]
        phases = {k: float(r[k]) for k, _ in STOP_PHASES if k != "rest_ms"}
        phases["rest_ms"] = float(r["downtime_ms"]) - sum(phases.values())
        out.append({"ram_mib": ram, "working_set_mib": ws, "n": len(mine), "rep": r["rep"],
                    "downtime_ms": float(r["downtime_ms"]), **phases})
    return out


def phase_figure(rows: Sequence[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Where a blocking save's stop goes: per configuration, its typical save (:func:`typical_phases`)
    as one bar split into its phases, in the order they run."""
    import matplotlib.pyplot as plt

    typ = typical_phases(rows)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(typ) + 1.8))
    ys = np.arange(len(typ))
    left = np.zeros(len(typ))
    shades = ("#d9d9d9", "#7f7f7f", "#000000", "#bdbdbd", "white")
    for (key, name), shade in zip(STOP_PHASES, shades, strict=True):
        width = np.array([max(t[key], 0.0) for t in typ])
        ax.barh(ys, width, left=left, color=shade, edgecolor="black", linewidth=0.6, label=name,
                hatch="//" if key == "rest_ms" else None)
        left += width
    ax.set_yticks(ys, [f"{t['ram_mib']} MiB RAM, {t['working_set_mib']} MiB in use" for t in typ])
    ax.invert_yaxis()
    ax.set_xlabel("time inside the stop (ms), the save with the median downtime of each configuration")
    ax.set_title("Where a blocking save's stop goes (snaplab, the sweep above)", fontsize=10)
    ax.grid(True, axis="x", linewidth=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=5, fontsize=8, frameon=False)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


QEMU_RECORDED_SAVES = {256: (257677170 / 2**20, 0.812), 1024: (1043832381 / 2**20, 3.288),
                       2048: (2119672617 / 2**20, 7.090), 4096: (4221033351 / 2**20, 10.547)}
"""QEMU 7.2 blocking snapshot-save on this host, RAM filled with random bytes: {RAM MiB: (VM
state MiB, median downtime s)} (docs/reference/qemu-7.2-qmp.md, "Blocking snapshot-save")."""


QEMU_RECORDED_SAVE_SPREAD: dict[int, dict[str, Any]] = {
    256: {"vmstate_mib": 257677170 / 2**20, "downtime_s": (0.798, 0.812, 0.814), "total_s": (0.798, 0.812, 0.816)},
    1024: {"vmstate_mib": 1043832381 / 2**20, "downtime_s": (3.198, 3.288, 4.757), "total_s": (3.199, 3.290, 4.759)},
    2048: {"vmstate_mib": 2119672617 / 2**20, "downtime_s": (6.826, 7.090, 7.095), "total_s": (6.828, 7.097, 7.097)},
    4096: {"vmstate_mib": 4221033351 / 2**20, "downtime_s": (4.913, 10.547, 14.020), "total_s": (4.914, 10.549, 14.022)},
}
"""The same saves with their spread: {RAM MiB: VM state MiB, (min, median, max) of the downtime
(STOP to RESUME) and of the job's wall time (created to concluded, which includes the flush)},
3 runs each (docs/reference/qemu-7.2-qmp.md, "Blocking snapshot-save")."""


def mib_per_s(rows: Sequence[dict[str, Any]], key: str = "total_s") -> list[float]:
    """Per row: MiB of VM state written per second of ``key`` (``total_s`` in s, or a ``*_ms``)."""
    div = 1e3 if key.endswith("_ms") else 1.0
    return [float(r["vmstate_bytes"]) / 2**20 / (float(r[key]) / div) for r in rows]


def qemu_comparison_figure(rows: Sequence[dict[str, Any]], qemu: dict[int, dict[str, Any]] | None = None,
                           path: str | Path | None = None) -> Any:
    """snaplab's blocking saves beside QEMU 7.2's recorded ones, on what both measure alike:
    the time until the snapshot exists (``total_s``; flush included on both) and, for
    reference, the downtime (which holds the flush only on QEMU).  x = VM state written.
    snaplab: median with min-max bars per configuration; QEMU: median with min-max bars."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    qemu = QEMU_RECORDED_SAVE_SPREAD if qemu is None else qemu
    fig, ax = plt.subplots(figsize=(9, 6))
    groups = sorted({(r["ram_mib"], r["working_set_mib"]) for r in rows})
    # the two series of one configuration share its x: drawn a little apart (x 2**-0.07 and
    # 2**0.07 on the log axis), so neither hides the other; configurations of one working set
    # (the same bytes written, several RAM sizes) are spread by RAM size, smaller to the left
    same_ws = {g: sorted(h for h in groups if h[1] == g[1]) for g in groups}
    spread = {g: 2 ** (0.25 * (same_ws[g].index(g) - (len(same_ws[g]) - 1) / 2)) for g in groups}
    for key, scale, marker, fill, name, dodge in (("total_s", 1e3, "o", "black", "until the snapshot exists (total_s)", 2 ** -0.07),
                                                  ("downtime_ms", 1.0, "o", "white", "downtime (no flush)", 2 ** 0.07)):
        xs, med, lo, hi = [], [], [], []
        for g in groups:
            mine = [r for r in rows if (r["ram_mib"], r["working_set_mib"]) == g]
            s = summarize([float(r[key]) * scale for r in mine])
            xs.append(summarize([float(r["vmstate_bytes"]) / 2**20 for r in mine]).median * dodge * spread[g])
            med.append(s.median)
            lo.append(s.median - s.min)
            hi.append(s.max - s.median)
        # one point per configuration (several RAM sizes can share an x): no connecting line
        ax.errorbar(xs, med, yerr=[lo, hi], marker=marker, mfc=fill, color="black", capsize=3, linestyle="none",
                    label=f"snaplab blocking save, {name}")
    qx = sorted(qemu)
    for key, fill, name in (("downtime_s", "white", "downtime (flush included)"),
                            ("total_s", "grey", "job wall time (flush included; equal to the downtime within 10 ms)")):
        med = [qemu[x][key][1] * 1e3 for x in qx]
        ax.errorbar([qemu[x]["vmstate_mib"] for x in qx], med,
                    yerr=[[m - qemu[x][key][0] * 1e3 for m, x in zip(med, qx, strict=True)],
                          [qemu[x][key][2] * 1e3 - m for m, x in zip(med, qx, strict=True)]],
                    marker="D", mfc=fill, color="grey", capsize=3, linestyle="-.",
                    markersize=9 if key == "downtime_s" else 5, label=f"QEMU 7.2 savevm, {name}")
    ns = sorted({summarize([1.0 for r in rows if (r["ram_mib"], r["working_set_mib"]) == g]).n for g in groups})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("VM state written (MiB); snaplab's points of one working set spread by RAM size, smaller to the left")
    ax.set_ylabel("time (ms)")
    ax.set_title("Blocking save, median and min-max.\n"
                 f"snaplab: Unicorn guest, RAM in use = the dirty guest's working set or random bytes, {'/'.join(map(str, ns))} saves per point, "
                 "measured now\nQEMU 7.2: TCG, q35, OVMF idle, RAM filled with random bytes, 3 saves per point, "
                 "recorded on this host (docs/reference)", fontsize=8)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # (below the axes: off the data)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def slope(rows: Sequence[dict[str, Any]], xkey: str, ykey: str) -> float:
    """The least-squares slope of ``ykey`` against ``xkey`` over the rows."""
    x = np.array([float(r[xkey]) for r in rows])
    y = np.array([float(r[ykey]) for r in rows])
    return float(np.polyfit(x, y, 1)[0])


def engines_spread_figure(rows: Sequence[dict[str, Any]], engines: Sequence[str], path: str | Path | None = None) -> Any:
    """Per engine: downtime (log), time until the snapshot exists, and the guest's speed during
    the save; every repetition a dot, the median a bar, the interquartile range a line."""
    import matplotlib.pyplot as plt

    panels = [("downtime_ms", "downtime, STOP to RESUME (ms, log)", True),
              ("total_s", "until the snapshot exists (s)", False),
              ("progress_during_save", "guest speed during the save\n(1 = its speed before)", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3.6))
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for i, eng in enumerate(engines):
            vals = [float(r[key]) for r in rows if r["engine"] == eng]
            s = summarize(vals)
            ax.bar(i, s.median, width=0.6, color="white", edgecolor="black")
            ax.plot([i, i], [s.q1, s.q3], color="black", linewidth=3)
            ax.scatter([i - 0.15 + 0.3 * j / max(1, len(vals) - 1) for j in range(len(vals))], vals,
                       color="grey", s=14, zorder=3)
        ax.set_xticks(range(len(engines)), list(engines))
        ax.set_ylabel(label, fontsize=9)
        if log:
            ax.set_yscale("log")
        ax.grid(True, axis="y", linewidth=0.3)
    n = summarize([1.0 for r in rows if r["engine"] == engines[0]]).n
    ram = sorted({r["ram_mib"] for r in rows})
    fig.suptitle(f"{n} saves per engine, {', '.join(map(str, ram))} MiB guest: bar = median, "
                 "black line = interquartile range, dots = each save", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def cow_window_summary(row: dict[str, Any]) -> dict[str, float]:
    """What one copy-on-write save's memory map (:func:`lab.plot.cow_window`) shows, in numbers,
    in ms after the arm (inside the stop, tens of microseconds before RESUME, so also after
    RESUME to that precision): when the saver took its first span and when its front reached
    the end of RAM; the faults before the saver began, those that copied their chunk and those
    that waited, and when the last one was served; the guest's first progress sample after
    RESUME (which ends the batch that was running at the stop: it needs only the chunks of that
    batch's remaining pages) and its first sample after the last fault was served (a batch
    that no fault held back any more); and the guest's rate, over its rate in the second before the
    command, in three stretches of the job after RESUME: until the last fault was served
    (``rate_faults``), until the saver's front reached the end of RAM (``rate_saver``), until the
    job concluded (``rate_writers``: the writers, the snapshot entry, the flush); NaN for a
    stretch under 1 ms."""
    import numpy as np

    d = row["details"]
    resume_s = d["stopped"][1] if d["stopped"] is not None else 0.0
    sweep = d.get("sweep", [])
    at = np.asarray(d.get("fault_at_ms", []), dtype=float)
    lat = np.asarray(d.get("fault_latency_ms", []), dtype=float)[:len(at)]
    copied = np.asarray(d.get("fault_copy_ms", []), dtype=float)[:len(at)] > 0
    start = sweep[0][0] if sweep else float("nan")
    tl = np.asarray(d["timeline"], dtype=float).reshape(-1, 2)
    after = tl[:, 0] > resume_s
    last_end = float((at + lat).max()) if len(at) and len(lat) == len(at) else float("nan")
    later = after & (tl[:, 0] > resume_s + (last_end if last_end == last_end else 0.0) / 1e3)
    # the guest's rate in each stretch of the job, over its rate in the second before the command
    ends_ms = [0.0, last_end if last_end == last_end else 0.0, float(sweep[-1][0]) if sweep else float("nan"),
               (d["job_s"] - resume_s) * 1e3]
    def rate(a_s: float, b_s: float) -> float:  # iterations a second, interpolated at both ends
        c0, c1 = iterations_at(tl[:, 0], tl[:, 1], [a_s, b_s]) if len(tl) >= 2 and b_s > a_s else (0.0, float("nan"))
        return float((c1 - c0) / (b_s - a_s))
    base = rate(max(-1.0, float(tl[0, 0])) if len(tl) else -1.0, 0.0)
    phases = {}
    for name, (a, b) in zip(("faults", "saver", "writers"), zip(ends_ms[:-1], ends_ms[1:], strict=True), strict=True):
        ok = b == b and a == a and b - a >= 1.0 and base > 0  # (a stretch under 1 ms: no rate)
        phases[f"rate_{name}"] = rate(resume_s + a / 1e3, resume_s + b / 1e3) / base if ok else float("nan")
    return {**phases,
        "saver_start_ms": float(start),
        "saver_end_ms": float(sweep[-1][0]) if sweep else float("nan"),
        "faults": int(len(at)),
        "faults_before_saver": int((at < start).sum()),
        "faults_copied": int(copied.sum()),
        "faults_waited": int((~copied).sum()),
        "first_progress_ms": float((tl[after, 0][0] - resume_s) * 1e3) if after.any() else float("nan"),
        "last_fault_served_ms": last_end,
        "first_progress_after_faults_ms": float((tl[later, 0][0] - resume_s) * 1e3) if later.any() else float("nan"),
        "fault_ms_sum": float(lat.sum()),
    }
