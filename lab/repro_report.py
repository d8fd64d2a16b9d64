"""Tables, ratios and figures from a reproduction's ``runs.csv`` (lab/reproduce.py).

Every figure compares like with like: one panel per (condition, operation), the same sizes on
both systems, medians with their interquartile range drawn as error bars, points and lines on
log axes (no bars), the legend outside the data, the conditions in the title, and where the
data came from (measured now, or committed with its date and host) in the figure's caption.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from lab.reproduce import MIGRATE_BACKGROUND
from lab.spec import (
    canonical_engine,
    guest_runs,
    load_engines,
    resumes_early,
    save_engines,
    write_protects,
)
from lab.stats import Summary, fmt_with_spread, summarize

NUMERIC = {"ram_mib": int, "dirty_rate_mibs": int, "working_set_mib": int, "rep": int, "downtime_ms": float,
           "total_s": float, "progress_ratio": float, "vmstate_bytes": int, "started_at": float,
           "guest_iterations": float, "rate_before": float, "rate_during": float}
# guest_iterations, rate_before, rate_during: absent (nan) in runs made before they were recorded
Key = tuple[str, str, str, str, int]  # workload, op, engine, system, ram


def load_runs(directory: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of ``DIR/runs.csv`` with their types, and ``DIR/metadata.json`` (or {})."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{d}: a reproduction is a directory (with runs.csv and metadata.json)")
    rows: list[dict[str, Any]] = []
    with open(d / "runs.csv", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("system", "engine", "op", "ram_mib", "workload", "downtime_ms")
                   if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{d / 'runs.csv'}: not a reproduction's runs.csv: no column {missing[0]!r}")
        for r in reader:
            row: dict[str, Any] = dict(r)
            for k, conv in NUMERIC.items():
                row[k] = conv(r[k]) if r.get(k, "") not in ("", None) else float("nan")
            row["steady"] = r.get("steady") == "True"
            row["guest_lost_ms"] = guest_lost_ms(row["progress_ratio"], row["total_s"])
            if row["op"] == "load":
                row["engine"] = canonical_engine(row["engine"])  # data recorded under a former name
            rows.append(row)
    if not rows:
        raise ValueError(f"{d / 'runs.csv'}: no rows")
    meta_path = d / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return mark_excluded(rows), meta


def guest_lost_ms(progress_ratio: float, total_s: float) -> float:
    """The guest time an operation cost, in ms: the work the guest did not do between command and
    completion, as time at its rate before, ``(1 - progress_ratio) * total``.  The ratio weighs
    a loss by the operation's length (the same 40 ms stall is 0.9 of a 0.4 s operation's rate
    and 0.97 of a 1.2 s one's); this does not.  It includes the downtime, and is negative where
    the two rate estimates' noise exceeds the loss (nan without a progress ratio)."""
    return (1.0 - progress_ratio) * total_s * 1e3


def common_window_progress(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], dict[str, float]]:
    """Per (condition, op, engine, RAM) that both systems ran with a progress ratio: the share
    of its rate each guest kept over the *same* window, the longer of the two operations (its
    median total time), ``1 - lost / window`` with each system's median guest time lost.

    The progress ratio divides by each operation's own length, so a shorter operation with the
    same stall scores lower (a 40 ms loss is 0.9 of a 0.4 s operation and 0.97 of a 1.2 s one).
    Over one window both guests are measured alike: after its own operation ended a guest runs
    at its rate, which the lost time already assumes (the guest never makes a stall up:
    bench/pacing_stall.py).  Both medians come from the same rows (those with a progress
    ratio); pairs :func:`not_comparable` names are left out.  Also returns the window, under
    "window_s"."""
    measured = [r for r in rows if not math.isnan(float(r.get("progress_ratio", math.nan)))]
    lost, total = summaries(measured, "guest_lost_ms"), summaries(measured, "total_s")
    out: dict[tuple[str, str, str, int], dict[str, float]] = {}
    for (wl, op, eng, system, ram) in lost:
        if system != "qemu" or (wl, op, eng, "snaplab", ram) not in lost or (wl, op, eng) in not_comparable():
            continue
        keys = {s: (wl, op, eng, s, ram) for s in ("qemu", "snaplab")}
        window = max(total[k].median for k in keys.values())
        if window > 0:
            out[(wl, op, eng, ram)] = {s: 1.0 - lost[k].median / (window * 1e3) for s, k in keys.items()} | {
                "window_s": window}
    return out


LARGER_STATE = 1.5  # a QEMU snapshot this many times snaplab's VM state is not the same work


def mark_excluded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``excluded`` (a reason, or "") on every row: a QEMU save whose VM state is more than
    :data:`LARGER_STATE` times snaplab's median at the same condition, engine and size, and the
    load of that snapshot: it did more work than snaplab's (QEMU 7.2's ``savevm`` with the
    ``background-snapshot`` capability on stores pages twice, docs/reproduction.md; runs made
    before 2026-12-04 10:50 had it on)."""
    ours: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    for r in rows:
        if r["system"] == "snaplab" and r["op"] == "save":
            ours[(r["workload"], r["engine"], r["ram_mib"])].append(int(r["vmstate_bytes"]))
    big: set[tuple[str, int, int]] = set()
    for r in rows:
        r["excluded"] = ""
        mine = ours.get((r["workload"], r["engine"], r["ram_mib"]))
        if r["system"] == "qemu" and r["op"] == "save" and mine and \
                r["vmstate_bytes"] > LARGER_STATE * float(np.median(mine)):
            r["excluded"] = "VM state more than 1.5x snaplab's"
            big.add((r["workload"], r["ram_mib"], r["rep"]))
    for r in rows:
        if r["system"] == "qemu" and r["op"] == "load" and (r["workload"], r["ram_mib"], r["rep"]) in big:
            r["excluded"] = "the load of that larger snapshot"
    return rows


def summaries(rows: list[dict[str, Any]], field: str) -> dict[Key, Summary]:
    """Per (condition, op, engine, system, RAM): the summary of ``field`` over rows not excluded."""
    groups: dict[Key, list[float]] = defaultdict(list)
    for r in rows:
        v = float(r.get(field, math.nan))
        if not r.get("excluded") and not math.isnan(v):  # nan: not measured (e.g. a load's progress)
            groups[(r["workload"], r["op"], r["engine"], r["system"], r["ram_mib"])].append(v)
    return {k: summarize(v) for k, v in sorted(groups.items())}


# The random fill comes in through -device loader.  QEMU's load resets the machine first, and the reset copies every loader file into RAM again
# (hw/core/loader.c rom_reset; `info roms` still lists the file after a loadvm): more work than
# snaplab's load does, so the blocking load of that condition is left out.
def not_comparable() -> dict[tuple[str, str, str], str]:
    """(condition, op, engine) -> why QEMU's figure cannot be set beside snaplab's."""
    return {
        ("idle-random", "load", load_engines()[0]): "QEMU's load resets first, and its reset copies the loader files into RAM again",
    }


def ratios(rows: list[dict[str, Any]], field: str = "downtime_ms") -> dict[tuple[str, str, str, int], float]:
    """QEMU's median over snaplab's, for every engine both systems ran in a comparable way."""
    s = summaries(rows, field)
    out = {}
    for (wl, op, eng, system, ram), q in s.items():
        ours = s.get((wl, op, eng, "snaplab", ram))
        if system == "qemu" and ours is not None and ours.median > 0 and (wl, op, eng) not in not_comparable():
            out[(wl, op, eng, ram)] = q.median / ours.median
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """One line per (condition, op, engine, system, RAM): medians with their spread."""
    down, total, prog = summaries(rows, "downtime_ms"), summaries(rows, "total_s"), summaries(rows, "progress_ratio")
    state, lost = summaries(rows, "vmstate_bytes"), summaries(rows, "guest_lost_ms")
    lines = [f"{'workload':<12}{'op':<5}{'engine':<11}{'system':<8}{'RAM':>6} {'n':>2}  "
             f"{'downtime ms (spread)':<46}{'total s':>8}  {'progress':>8}  {'lost ms':>7}  {'state MiB':>9}"]
    for k, s in down.items():
        wl, op, eng, system, ram = k
        p = prog[k].median if k in prog else math.nan
        lo = lost[k].median if k in lost else math.nan
        lines.append(f"{wl:<12}{op:<5}{eng:<11}{system:<8}{ram:>6} {s.n:>2}  {fmt_with_spread(s):<46}"
                     f"{total[k].median:>8.3g}  {'' if math.isnan(p) else f'{p:.0%}':>8}  "
                     f"{'' if math.isnan(lo) else f'{lo:.0f}':>7}  {state[k].median / 2**20:>9.0f}")
    r, rt = ratios(rows), ratios(rows, "total_s")
    if r:
        lines.append("QEMU / snaplab, medians (downtime; total time):")
        lines += [f"  {wl:<12}{op:<5}{eng:<11}{ram:>6} MiB  {v:7.1f}x  {rt.get((wl, op, eng, ram), float('nan')):6.1f}x"
                  for (wl, op, eng, ram), v in sorted(r.items())]
    cw = common_window_progress(rows)
    if cw:
        lines.append("Progress over a common window (the longer operation's; 1 - median lost / window):")
        lines += [f"  {wl:<12}{op:<5}{eng:<11}{ram:>6} MiB  window {v['window_s']:6.3g} s  snaplab {v['snaplab']:.3f}  "
                  f"QEMU {v['qemu']:.3f}" for (wl, op, eng, ram), v in sorted(cw.items())]
    lines += [f"  not compared: {wl} {op} {eng} ({why})" for (wl, op, eng), why in not_comparable().items()
              if any((x["workload"], x["op"], x["engine"], x["system"]) == (wl, op, eng, "qemu") for x in rows)]
    out = [x for x in rows if x.get("excluded")]
    lines += [f"  left out: {x['system']} {x['workload']} {x['op']} {x['engine']} {x['ram_mib']} MiB rep {x['rep']} "
              f"({x['excluded']})" for x in out]
    return "\n".join(lines)


GOAL_SIZES = (1024, 4096)  # issue #16's goals are at 1 and 4 GiB (docs/reproduction.md, "Goals")
GOAL_DOWNTIME_RATIO = 5.0


def goals_text(rows: list[dict[str, Any]]) -> str:
    """Issue #16's goals that a reproduction can check, each at 1 and 4 GiB, from the medians:
    the blocking save's downtime and the background snapshot's (QEMU's ``migrate`` interface on
    both) at least :data:`GOAL_DOWNTIME_RATIO` times shorter on snaplab, and the dirty guest's
    progress during the background snapshot, each system over its own operation, no lower on
    snaplab.  A goal the run did not measure (a size or condition left out, no QEMU) says so."""
    down, prog = ratios(rows), summaries(rows, "progress_ratio")
    checks = [(wl, save_engines()[0]) for wl in ("idle-random", "dirty")] + [("dirty", MIGRATE_BACKGROUND)]
    lines = ["Issue #16's goals (docs/reproduction.md), medians of this run:"]
    for wl, eng in checks:
        for ram in GOAL_SIZES:
            v = down.get((wl, "save", eng, ram))
            what = f"  {wl} {eng} save downtime, QEMU / snaplab >= {GOAL_DOWNTIME_RATIO:g}x at {ram} MiB:"
            lines.append(f"{what} not measured" if v is None else
                         f"{what} {v:.1f}x, {'met' if v >= GOAL_DOWNTIME_RATIO else 'NOT met'}")
    for ram in GOAL_SIZES:
        ours = prog.get(("dirty", "save", MIGRATE_BACKGROUND, "snaplab", ram))
        theirs = prog.get(("dirty", "save", MIGRATE_BACKGROUND, "qemu", ram))
        what = f"  dirty {MIGRATE_BACKGROUND} progress, each over its own operation, snaplab >= QEMU at {ram} MiB:"
        if ours is None or theirs is None:
            lines.append(f"{what} not measured")
        else:
            lines.append(f"{what} {ours.median:.3f} vs {theirs.median:.3f}, "
                         f"{'met' if ours.median >= theirs.median else 'NOT met'}")
    return "\n".join(lines)


def compare_text(new: list[dict[str, Any]], committed: list[dict[str, Any]], label: str) -> str:
    """Per (condition, op, engine, RAM): the new QEMU/snaplab ratio beside the committed one
    ("not run" where one of the two runs has no such ratio: a --quick run has no 4096 MiB)."""
    a, b = ratios(new), ratios(committed)

    def cell(r: dict[tuple[str, str, str, int], float], k: tuple[str, str, str, int]) -> str:
        v = r.get(k, math.nan)
        return f"{'not run':>8}" if math.isnan(v) else f"{v:7.1f}x"

    lines = [f"QEMU / snaplab median downtime: this run vs {label}"]
    for k in sorted(set(a) | set(b)):
        wl, op, eng, ram = k
        lines.append(f"  {wl:<12}{op:<5}{eng:<11}{ram:>6} MiB  now {cell(a, k)}   committed {cell(b, k)}")
    return "\n".join(lines)


def qemu_side_by_side(runs: dict[str, list[dict[str, Any]]], field: str = "downtime_ms") -> str:
    """QEMU's median ``field`` (with its spread) in each run of ``runs`` (label -> rows), and
    the QEMU/snaplab ratio of each run against snaplab's rows of that same run: e.g. QEMU's
    image with and without ``cache.direct``."""
    sums = {label: summaries(rows, field) for label, rows in runs.items()}
    rats = {label: ratios(rows, field) for label, rows in runs.items()}
    keys = sorted({k for s in sums.values() for k in s if k[3] == "qemu"})
    head = "".join(f"{label + ': QEMU (spread)':<46}{'ratio':>7}  " for label in runs)
    lines = [f"{'workload':<12}{'op':<5}{'engine':<11}{'RAM':>6}  {head}"]
    for wl, op, eng, _, ram in keys:
        cells = ""
        for label in runs:
            q = sums[label].get((wl, op, eng, "qemu", ram))
            r = rats[label].get((wl, op, eng, ram), math.nan)
            ratio = "-" if math.isnan(r) else f"{r:.1f}x"  # "-": not comparable (not_comparable)
            cells += f"{fmt_with_spread(q) if q else '-':<46}{ratio:>7}  "
        lines.append(f"{wl:<12}{op:<5}{eng:<11}{ram:>6}  {cells}")
    return "\n".join(lines)


def qemu_cache_text(mode: str) -> str:
    """How QEMU's image was opened, for labels: ``ReproSpec.qemu_cache``."""
    return "QEMU cache.direct=on" if mode == "direct" else "QEMU through the page cache"


def source_label(meta: dict[str, Any], committed: bool) -> str:
    """Where a run's figures come from: measured or committed, its date and host (its CPU
    model first: a speed-up factor belongs to the host), and QEMU's cache mode (runs recorded
    before the mode existed went through the page cache)."""
    when = str(meta.get("started", "?"))[:10]
    host, cpu = meta.get("host", "?"), meta.get("cpu")
    where = f"{cpu} ({host})" if cpu and cpu != host else host
    if not meta:
        return f"{'committed data' if committed else 'measured'}: no metadata.json (date, host and QEMU's cache unknown)"
    if meta.get("spec", {}).get("with_qemu") is False:
        return f"{'committed data' if committed else 'measured'} {when} on {where}, snaplab only (no QEMU)"
    cache = qemu_cache_text(meta.get("spec", {}).get("qemu_cache", "writeback"))
    return f"{'committed data' if committed else 'measured'} {when} on {where}, {cache}"


BACKGROUND_STOP_NOTE = ("Background snapshot: QEMU write-protects all of RAM inside its stop; snaplab protects it "
                        "just before the stop, the guest running, and inside only what was written since "
                        "(docs/deviations.md 59): read its total time too.")
ZOOM_PROGRESS = (0.8, 1.05)  # the progress figure's second panel: the operations the guest hardly notices
FIELDS = {  # what a figure can draw: axis label, log axis, the caption's note
    "downtime_ms": ("downtime, STOP to RESUME (ms)", True,
                    "Blocking save: QEMU's downtime includes the flushes of the snapshot table; snaplab flushes "
                    "after RESUME (in total time, not downtime).\n" + BACKGROUND_STOP_NOTE + " docs/reproduction.md"),
    "total_s": ("total time, command to completion event (s)", True,
                "Total: from the command to the job's concluded (or MIGRATION completed) event, flushes "
                "included on both systems. docs/reproduction.md"),
    "progress_ratio": ("guest progress during the operation / before it", False,
                       "Progress: the dirty guest's page-write rate between command and completion over its "
                       "rate in the second before (1 = unhindered). docs/reproduction.md"),
    "guest_lost_ms": ("guest time lost (ms; log above 1)", False,
                      "Guest time lost = (1 - progress) x total: the work the dirty guest did not do between command "
                      "and completion, as time at its rate before; downtime and stalls included. docs/reproduction.md"),
}


def figure(rows: list[dict[str, Any]], meta: dict[str, Any], path: str | Path | None = None,
           committed: bool = False, field: str = "downtime_ms") -> Any:
    """``field`` (downtime by default, or total time, or guest progress: :data:`FIELDS`)
    against RAM, one panel per (condition, operation) that has it: both systems' engines,
    medians with IQR error bars.  Each series keeps its marker and line in every panel
    (:func:`series_style`), series are spread a little along the RAM axis so that equal values stay
    apart, and a QEMU series that :func:`not_comparable` rules out is not drawn (the panel's
    title says so)."""
    s = summaries(rows, field)
    panels = [(wl, op, False) for wl, op in sorted({(k[0], k[1]) for k in s})]
    if field == "progress_ratio":  # each panel again, zoomed on the operations the guest hardly notices
        panels += [(wl, op, True) for wl, op, _ in panels]
    ncol = min(2, max(1, len(panels)))
    nrow = (max(1, len(panels)) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 5.0 * nrow), squeeze=False)
    for ax, (wl, op, zoom) in zip(axes.flat, panels, strict=False):
        series = sorted({(k[2], k[3]) for k in s if k[0] == wl and k[1] == op}, key=lambda x: (x[1], x[0]))
        series = [(eng, system) for eng, system in series
                  if not (system == "qemu" and (wl, op, eng) in not_comparable())]
        if zoom:
            series = [(eng, system) for eng, system in series
                      if min(v.median for k, v in s.items() if k[:4] == (wl, op, eng, system)) >= ZOOM_PROGRESS[0]]
        for i, (eng, system) in enumerate(series):
            pts = sorted((k[4], v) for k, v in s.items() if k[:4] == (wl, op, eng, system))
            dodge = _dodge(i, len(series))
            xs = [x * dodge for x, _ in pts]
            ys = [v.median for _, v in pts]
            lo = [max(v.median - v.q1, 0) for _, v in pts]
            hi = [max(v.q3 - v.median, 0) for _, v in pts]
            marker, ls, color = series_style(system, op, eng)
            ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, linestyle=ls, color=color, capsize=3,
                        markerfacecolor="white" if system == "qemu" else color, label=series_label(system, op, eng))
            # min and max of the runs: short ticks joined by a thin line, in the series' colour
            ax.vlines(xs, [v.min for _, v in pts], [v.max for _, v in pts], colors=color, linewidth=0.6, alpha=0.6)
            ax.scatter(xs + xs, [v.min for _, v in pts] + [v.max for _, v in pts], marker="_", s=40,
                       color=color, linewidths=1.0, zorder=3, label="min and max of the runs" if i == 0 else None)
        _downtime_axes(ax, sorted({k[4] for k in s}), field)
        if zoom:
            ax.set_ylim(*ZOOM_PROGRESS)
        cond = ("idle guest, RAM filled with random bytes (all but 64-112 MiB)" if wl == "idle-random" else
                _dirty_label(rows, wl))
        why = [w for (a, b, _), w in not_comparable().items() if (a, b) == (wl, op)]
        caveat = f"\n(QEMU blocking {op} not drawn, not like with like: {why[0]})" if why else ""
        caveat += _state_note(rows, wl, op)
        if zoom:
            caveat += (f"\n(zoomed to {ZOOM_PROGRESS[0]:g}-{ZOOM_PROGRESS[1]:g}: only the series whose medians all "
                       "lie above its floor; ticks outside it are cut)")
        lines = textwrap.wrap(f"{op}: {cond}", 60) + textwrap.wrap(caveat.strip(), 60)
        ax.set_title("\n".join(lines), fontsize=9)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8, ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    both = any(r["system"] == "qemu" for r in rows)
    fig.suptitle(("snaplab vs QEMU 7.2, same guest program and sizes" if both else "snaplab only (no QEMU rows)")
                 + f"; medians, bars = IQR, ticks = min and max ({source_label(meta, committed)})", fontsize=9)
    fig.tight_layout()
    note = FIELDS[field][2]
    if field == "total_s" and any(resumes_early(k[2]) for k in s if k[1] == "load"):
        note += ("\nA lazy load's total runs to the end of its fill, long after RESUME: the guest runs from RESUME on, "
                 "so its downtime, not this total, is what it waited (notebook 11 times its return to full speed).")
    fig.text(0.5, -0.02, note, ha="center", va="top", fontsize=8)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return fig


def figures(rows: list[dict[str, Any]], meta: dict[str, Any], directory: str | Path,
            committed: bool = False) -> list[Path]:
    """``downtime.png``, ``total.png``, ``progress.png`` and ``lost.png`` in ``directory``
    (:func:`figure` of each field that has a value); returns the paths written."""
    written = []
    Path(directory).mkdir(parents=True, exist_ok=True)
    for field, name in (("downtime_ms", "downtime"), ("total_s", "total"), ("progress_ratio", "progress"),
                        ("guest_lost_ms", "lost")):
        if summaries(rows, field):
            path = Path(directory) / f"{name}.png"
            figure(rows, meta, path, committed=committed, field=field)
            written.append(path)
    return written


def _engine_roles() -> dict[str, str]:
    """The registry's engines by the role a figure gives them (no engine spelled here): the
    blocking save and load, copy-on-write, the other save engine (pre-copy), the background
    fill (what the old name ``lazy`` means), and QEMU's migrate label."""
    blocking_save = next(e for e in save_engines() if not guest_runs(e))
    cow = next(e for e in save_engines() if write_protects(e))
    precopy = next(e for e in save_engines() if e not in (blocking_save, cow))
    return {"blocking-save": blocking_save, "copy-on-write": cow, "pre-copy": precopy,
            "blocking-load": next(e for e in load_engines() if not resumes_early(e)),
            "background-load": canonical_engine("lazy"), "migrate": MIGRATE_BACKGROUND}


def series_style(system: str, op: str, engine: str) -> tuple[str, Any, str]:
    """(marker, line style, colour) of a series, the same in every panel."""
    r = _engine_roles()
    table: dict[tuple[str, str, str], tuple[str, Any, str]] = {
        ("snaplab", "save", r["blocking-save"]): ("o", "-", "black"),
        ("snaplab", "save", r["copy-on-write"]): ("s", "-.", "black"),
        ("snaplab", "save", r["migrate"]): ("^", ":", "0.25"),
        ("snaplab", "save", r["pre-copy"]): ("v", (0, (5, 1, 1, 1, 1, 1)), "0.35"),
        ("snaplab", "load", r["blocking-load"]): ("o", "-", "black"),
        ("snaplab", "load", r["background-load"]): ("P", ":", "0.25"),
        ("qemu", "save", r["blocking-save"]): ("D", "--", "0.45"),
        ("qemu", "save", r["migrate"]): ("^", "--", "0.45"),
        ("qemu", "load", r["blocking-load"]): ("D", "--", "0.45"),
    }
    if (system, op, engine) in table:
        return table[(system, op, engine)]
    others = [e for e in load_engines() if (system, op, e) not in table] if op == "load" else []
    extra: list[tuple[str, Any, str]] = [("X", (0, (3, 1)), "0.15"), ("*", (0, (1, 2)), "0.5")]
    return extra[others.index(engine) % len(extra)] if engine in others else ("x", ":", "0.6")


def series_label(system: str, op: str, engine: str) -> str:
    """A legend entry that says which mechanism a series is: "background" is QEMU's migrate
    background snapshot among saves, and snaplab's background-fill lazy load among loads."""
    r = _engine_roles()
    names = {("save", r["blocking-save"]): "blocking snapshot-save", ("save", r["copy-on-write"]): "copy-on-write snapshot-save",
             ("save", r["pre-copy"]): "pre-copy snapshot-save (stores all of RAM)",
             ("save", r["migrate"]): "background snapshot (migrate)",
             ("load", r["blocking-load"]): "blocking snapshot-load",
             ("load", r["background-load"]): "lazy load, background fill"}
    other = f"lazy load, {engine}" if op == "load" and resumes_early(engine) else engine
    return f"{'QEMU' if system == 'qemu' else system} {names.get((op, engine), other)}"


def _state_note(rows: list[dict[str, Any]], wl: str, op: str) -> str:
    """What the panel's blocking rows do not show: QEMU rows left out, or QEMU's VM state
    larger than snaplab's (the median ratio over the sizes)."""
    blocking = save_engines()[0] if op == "save" else load_engines()[0]
    mine = [r for r in rows if (r["workload"], r["op"], r["engine"]) == (wl, op, blocking)]
    notes = []
    if any(r["excluded"] for r in mine if "excluded" in r):
        notes.append("QEMU saves with more than 1.5x snaplab's VM state left out")
    st = summaries(mine, "vmstate_bytes")
    ratio = [v.median / st[(wl, op, blocking, "snaplab", k[4])].median for k, v in st.items()
             if k[3] == "qemu" and (wl, op, blocking, "snaplab", k[4]) in st]
    if ratio and float(np.median(ratio)) > 1.2:
        notes.append(f"QEMU blocking's VM state is {min(ratio):.1f}-{max(ratio):.1f}x snaplab's")
    return "".join(f"\n({n})" for n in notes)


LOST_TICKS = [-100, -10, -1, 0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


def _dodge(i: int, n: int) -> float:
    """The factor that spreads series ``i`` of ``n`` a little along the log2 RAM axis, so that
    equal values stay apart."""
    return float(2 ** (0.07 * (i - (n - 1) / 2)))


def _downtime_axes(ax: Any, sizes: list[int], field: str = "downtime_ms") -> None:
    """RAM sizes as plain MiB ticks on a log2 axis; the field's value on a log axis (times) or
    a linear one from 0 (progress ratios)."""
    ax.set_xscale("log", base=2)
    if sizes:  # a margin around the sizes, so that one size's series keep their small offsets small
        ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
    ax.set_xticks(sizes)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    label, log, _ = FIELDS[field]
    if field == "guest_lost_ms":  # from a few ms to a blocking save's second, and noise below 0
        ax.set_yscale("symlog", linthresh=1.0, linscale=0.5)
        ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(LOST_TICKS))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        if ax.dataLim.y0 >= 0:  # nothing below 0 drawn: no empty negative band
            ax.set_ylim(bottom=0)
    elif log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))  # a loss can come out below 0 (noise)
    ax.set_xlabel("guest RAM (MiB)")
    ax.set_ylabel(label)


def _dirty_label(rows: list[dict[str, Any]], wl: str) -> str:
    mine = [r for r in rows if r["workload"] == wl]
    sets = sorted({(r["ram_mib"], r["working_set_mib"]) for r in mine})
    ws = ", ".join(f"{w} MiB at {ram}" for ram, w in sets) if len({w for _, w in sets}) > 1 else f"{sets[0][1]} MiB"
    return f"dirtying {mine[0]['dirty_rate_mibs']} MiB/s over {ws}"


def main_figure(rows: list[dict[str, Any]], meta: dict[str, Any], path: str | Path | None = None,
                qemu_rows: list[dict[str, Any]] | None = None, qemu_label: str = "measured now") -> Any:
    """The README's main figure: saves of the dirty guest, downtime against RAM, snaplab's
    blocking and copy-on-write saves and background snapshot beside QEMU's blocking save and
    background snapshot of the same guest; medians with IQR bars."""

    saves = [r for r in rows + (qemu_rows or []) if r["op"] == "save" and r["workload"] == "dirty"]
    keep = {save_engines()[0], MIGRATE_BACKGROUND} | {e for e in save_engines() if write_protects(e)}
    s = summaries([r for r in saves if r["engine"] in keep], "downtime_ms")
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    styles = {"qemu": ("--", "0.45"), "snaplab": ("-", "black")}
    markers = {save_engines()[0]: "o", MIGRATE_BACKGROUND: "D"}
    series = sorted({(k[2], k[3]) for k in s}, key=lambda x: (x[1], x[0]))
    for i, (eng, system) in enumerate(series):
        pts = sorted((k[4], v) for k, v in s.items() if (k[2], k[3]) == (eng, system))
        ls, color = styles.get(system, (":", "blue"))
        dodge = _dodge(i, len(series))
        ax.errorbar([x * dodge for x, _ in pts], [v.median for _, v in pts],
                    yerr=[[max(v.median - v.q1, 0) for _, v in pts], [max(v.q3 - v.median, 0) for _, v in pts]],
                    marker=markers.get(eng, "s"), linestyle=ls, color=color, capsize=3,
                    markerfacecolor="white" if system == "qemu" else color,
                    label=series_label(system, "save", eng).replace("QEMU", "QEMU 7.2", 1)
                          + (f" ({qemu_label})" if system == "qemu" else ""))
    _downtime_axes(ax, sorted({k[4] for k in s}))
    ns = sorted({v.n for v in s.values()})
    n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}" if ns else "0"
    ax.set_title(f"snapshot-save and background snapshot, same guest on both\n{_dirty_label(saves, 'dirty')}; "
                 f"medians, bars = IQR, n = {n} per point", fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    leg = ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=2)
    fig.tight_layout()
    fig.canvas.draw()  # the legend's extent, to put the note right under it (not at a fixed offset)
    under = leg.get_window_extent().transformed(fig.transFigure.inverted()).y0
    fig.text(0.5, under - 0.02, "Blocking save: QEMU's downtime includes the flushes of the snapshot table; snaplab "
             "flushes after RESUME.\n" + textwrap.fill(BACKGROUND_STOP_NOTE, 110) + " docs/reproduction.md",
             ha="center", va="top", fontsize=7)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return fig
