"""Plots, readable without colour (markers and line styles differ), units on every axis.

No backend is forced: a notebook shows the figures inline, the CLI (lab/cli.py) selects Agg.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import matplotlib.ticker
from matplotlib.patches import Patch

from lab.spec import load_engines, save_engines, write_protects
from lab.stats import late_quantiles, median

MARKERS = ("o", "s", "^", "v", "D", "P")
LINES = ("-", "--", ":", "-.")
HATCHES = ("", "//", "..", "xx", "\\\\")



def _finish(fig: Any, path: str | Path | None) -> Any:
    """A finished figure: written to ``path`` and closed if one is given; returned either way."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig

def _index(engine: str) -> int:
    """The engine's place in the registry (save engines, then load engines): its style."""
    names = [*save_engines(), *load_engines()]
    return names.index(engine) if engine in names else len(names)


def style(engine: str) -> tuple[str, str]:
    """(marker, line style) of an engine, by its place in the registry."""
    i = _index(engine)
    return MARKERS[i % len(MARKERS)], LINES[i % len(LINES)]


def hatch(engine: str) -> str:
    return HATCHES[_index(engine) % len(HATCHES)]


def downtime_vs_ram(rows: list[dict[str, Any]], path: str | Path | None = None,
                    reference: dict[str, dict[int, float]] | None = None) -> Any:
    """Median downtime (ms, log scale) against RAM size (MiB), one line per engine and per value
    of any other field that varies between the rows (a sweep's other axes: workload, rate, ...)."""
    from lab.results import varying

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    extra = varying(rows)
    series = sorted({(str(r["engine"]), *(str(r.get(k)) for k in extra)) for r in rows})
    shades = ["black", "dimgrey", "grey", "darkgrey"]
    for i, key in enumerate(series):
        by_ram: dict[int, list[float]] = {}
        for r in rows:
            if (str(r["engine"]), *(str(r.get(k)) for k in extra)) == key:
                by_ram.setdefault(int(r["ram_mib"]), []).append(float(r["downtime_ms"]))
        xs = sorted(by_ram)
        ys = [median(by_ram[x]) for x in xs]
        marker, ls = style(key[0])
        label = f"snaplab {key[0]}" + "".join(f", {k}={v}" for k, v in zip(extra, key[1:], strict=True))
        ax.plot(xs, ys, marker=marker, linestyle=ls, color=shades[i % len(shades)], label=label)
    for name, pts in (reference or {}).items():
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="D", linestyle="-.", color="grey", label=name)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yscale("log")
    ax.set_xlabel("guest RAM (MiB)")
    ax.set_ylabel("downtime, STOP to RESUME (ms)")
    engines = sorted({str(r["engine"]) for r in rows})
    ax.set_title("Snapshot downtime by engine: " + ", ".join(engines) + " (medians)")
    ax.grid(True, which="both", linewidth=0.3)
    # below the axes, never over the data
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return _finish(fig, path)


def engines_figure(rows: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Blocking vs copy-on-write vs pre-copy in one figure: downtime, total time, guest progress."""
    engines = [e for e in save_engines() if any(r["engine"] == e for r in rows)]

    def med(eng: str, key: str) -> float:
        return median([float(r[key]) for r in rows if r["engine"] == eng])

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    panels = [("downtime_ms", "downtime (ms, log)", True), ("total_s", "total time (s)", False),
              ("progress_during_save", "guest progress during save\n(fraction of normal)", False)]
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        vals = [med(e, key) for e in engines]
        ax.bar(engines, vals, color="white", edgecolor="black", hatch=[hatch(e) for e in engines])
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(True, axis="y", linewidth=0.3)
    axes[0].set_title("stopped")
    axes[1].set_title("until the snapshot exists")
    axes[2].set_title("guest speed meanwhile")
    fig.suptitle("Consistency point: blocking and copy-on-write = the stop instant; pre-copy = the end instant",
                 fontsize=9)
    fig.tight_layout()
    return _finish(fig, path)


def load_figure(rows: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Blocking load vs lazy restore: how long the guest is stopped, and until all RAM is back."""
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    engines = [e for e in load_engines() if any(r["engine"] == e for r in rows)]
    for i, key in enumerate(("stopped_ms", "complete_s")):
        vals = []
        for e in engines:
            v = sorted(float(r[key]) * (1000.0 if key == "complete_s" else 1.0) for r in rows if r["engine"] == e)
            vals.append(median(v))
        ax.bar([x + 0.38 * i for x in range(len(engines))], vals, width=0.36, color="white", edgecolor="black",
               hatch="" if i == 0 else "//", label="guest stopped" if i == 0 else "all RAM loaded")
    ax.set_xticks([x + 0.19 for x in range(len(engines))], engines)
    ax.set_yscale("log")
    ax.set_ylabel("time (ms, log)")
    ax.set_title("snapshot-load: blocking vs lazy restore")
    ax.legend()
    ax.grid(True, axis="y", linewidth=0.3)
    fig.tight_layout()
    return _finish(fig, path)


def progress_timeline(row: dict[str, Any], path: str | Path | None = None) -> Any:
    """Guest progress (iterations) over time around one snapshot; the job and the stop shaded."""
    d = row["details"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    t = [x for x, _ in d["timeline"]]
    it = [y for _, y in d["timeline"]]
    ax.step(t, it, where="post", color="black", linewidth=1, label="guest iterations (lab port samples)")
    ax.axvspan(0, d["job_s"], color="0.85", label="snapshot job")
    if d["stopped"] is not None:
        ax.axvspan(d["stopped"][0], d["stopped"][1], color="0.4", label="guest stopped")
    ax.set_xlabel("time since snapshot-save (s)")
    ax.set_ylabel("iterations done by the guest")
    ax.set_title(f"Guest progress around a {row['engine']} snapshot ({row['ram_mib']} MiB)")
    if t:
        # the whole job in view, and nothing past the last sample (the samples end soon after the job)
        ax.set_xlim(min(t[0], 0.0) - 0.02, max(t[-1], d["job_s"]) + 0.005)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return _finish(fig, path)


def engines_spread_points(rows: list[dict[str, Any]], engines: list[str], conditions: str,
                          path: str | Path | None = None) -> Any:
    """Per engine: downtime (log axis), time until the snapshot exists, and the guest's speed
    during the save; every save a grey dot, the median a black diamond, the spread a black line
    (points, not bars: a bar's length means nothing on a log axis): the interquartile range from
    five saves, the min-max below that (an interquartile range of three or four values is
    interpolated between them, so it would draw values no save had).  ``conditions`` (guest,
    rate, RAM) goes into the title; the legend goes under the panels, off the data."""
    import numpy as np

    panels = [("downtime_ms", "downtime, STOP to RESUME (ms, log)", True),
              ("total_s", "until the snapshot exists (s)", False),
              ("progress_during_save", "guest speed during the save\n(1 = its speed before)", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3.8))
    n = 0
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for i, eng in enumerate(engines):
            vals = [float(r[key]) for r in rows if r["engine"] == eng]
            if not vals:
                continue
            n = max(n, len(vals))
            lo, med, hi = np.percentile(vals, [25, 50, 75]) if len(vals) >= 5 else (min(vals), float(np.median(vals)), max(vals))
            spread = "interquartile range" if len(vals) >= 5 else "min-max (fewer than 5 saves)"
            ax.scatter([i - 0.15 + 0.3 * j / max(1, len(vals) - 1) for j in range(len(vals))], vals,
                       color="0.6", s=14, zorder=2, label="each save" if i == 0 else None)
            ax.plot([i + 0.25, i + 0.25], [lo, hi], color="black", linewidth=2, zorder=3,
                    label=spread if i == 0 else None)
            ax.scatter([i + 0.25], [med], marker="D", color="black", s=30, zorder=4, label="median" if i == 0 else None)
        ax.set_xticks(range(len(engines)), list(engines))
        ax.set_xlim(-0.5, len(engines) - 0.5)
        ax.set_ylabel(label, fontsize=9)
        if log:
            ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", linewidth=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(f"{n} saves per engine; {conditions}", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    return _finish(fig, path)


def _cow_map(ax: Any, mp: Any, d: dict[str, Any], at: Any, lat: Any, copied: Any, end_ms: float) -> None:
    """:func:`cow_window`'s memory map (``mp``), and the job's end and the front's on both panels."""
    import numpy as np

    mib = 2  # MiB per chunk
    sw = np.asarray(d.get("sweep", []), dtype=float).reshape(-1, 2)
    chunks = int(d.get("chunks", 0))
    right = end_ms * 1.04
    for a in (ax, mp):
        a.axvline(end_ms, color="black", linestyle="-.", linewidth=1)
    ax.plot([], [], color="black", linestyle="-.", linewidth=1, label="the job concluded")
    if len(sw):
        xs = np.concatenate((sw[:, 0], [right]))
        ys = np.concatenate((sw[:, 1], [sw[-1, 1]])) * mib
        mp.fill_between(xs, 0, ys, step="post", color="0.85", zorder=2, label="passed by the saver's front (saved, released)")
        mp.step(xs, ys, where="post", color="black", linewidth=1.2, label="the saver's front")
        mp.plot([sw[0, 0]], [0], marker="^", markersize=9, color="black", clip_on=False, zorder=4,
                label=f"the saver's first span ({sw[0, 0]:.1f} ms)")
    fc = np.asarray(d.get("fault_chunk", []), dtype=float)[:len(at)] * mib
    for a0, lo_mib in zip((at + lat)[copied].tolist(), fc[copied].tolist(), strict=True):
        mp.fill_between([a0, right], lo_mib, lo_mib + mib, color="0.93", linewidth=0, zorder=1)
    if copied.any():
        mp.fill_between([], [], [], color="0.93", label="released by its fault, from then on")
    mp.scatter(at[copied], fc[copied] + mib / 2, s=16, color="tab:red", zorder=3, label="fault: copied its chunk, released it")
    mp.scatter(at[~copied], fc[~copied] + mib / 2, s=16, facecolors="none", edgecolors="tab:red", zorder=3,
               label="fault: copied nothing (waited, or found it saved), woken")
    top: float = float(max(chunks * mib, 1))
    cut = len(fc) and chunks * mib > 4 * (float(fc.max()) + mib)
    if cut:
        top = max(16.0, 2 * (float(fc.max()) + mib))
    if len(sw) and sw[-1, 1] >= chunks:
        for a in (ax, mp):
            a.axvline(sw[-1, 0], color="0.3", linestyle=":", linewidth=1)
        ax.plot([], [], color="0.3", linestyle=":", linewidth=1, label="the front at the end of RAM")
        mp.annotate("RAM all captured: no chunk protected;\nthe writers still write the gathered pages,\nthen the table entry, the flush",
                    (sw[-1, 0], 0.55 * top), xytext=(6, 0), textcoords="offset points", fontsize=8)
    mp.set_ylim(0, top)
    mp.set_xlim(-0.02 * end_ms, right)
    mp.set_xlabel("time after the arm, about RESUME (ms)")
    mp.set_ylabel("guest RAM address (MiB)" + (f"\n(0-{top:.0f} of {chunks * mib} MiB shown)" if cut else ""))


def fault_granules(rows: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Notebook 6's fault loops: for each writer (``writes``) and granule, what the writer paid
    (its time blocked in faults, ``writer_ms``) against how many faults it took, one point per
    run, the median of each group ringed and labelled; log axes (points only)."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.6, 4.2))
    marks = {"4 KiB": ("o", "tab:red"), "2 MiB": ("s", "tab:blue")}
    for (writes, granule) in sorted({(r["writes"], r["granule"]) for r in rows}, reverse=True):
        sel = [r for r in rows if r["writes"] == writes and r["granule"] == granule]
        x = np.array([max(r["faults"], 1) for r in sel], dtype=float)
        y = np.array([r["writer_ms"] for r in sel], dtype=float)
        marker, color = marks.get(granule, ("^", "0.4"))
        filled = writes >= 100
        ax.scatter(x, y, marker=marker, s=28, facecolors=color if filled else "none", edgecolors=color,
                   label=f"{writes} writes, {granule} granules ({len(sel)} runs)")
        mx, my = float(np.median(x)), float(np.median(y))
        ax.scatter([mx], [my], marker=marker, s=170, facecolors="none", edgecolors="black", linewidths=0.8)
        right = mx < 300  # (a label right of the point, unless that is the axes' edge)
        ax.annotate(f"median: {mx:.0f} faults, {my:.1f} ms", (mx, my), xytext=(10 if right else -12, -4),
                    textcoords="offset points", fontsize=7.5, ha="left" if right else "right")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("faults the writer took (log)")
    ax.set_ylabel("the writer's time in its writes (ms, log)")
    ax.set_title("What a writer pays for write protection: fault count against time", fontsize=10)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return _finish(fig, path)


def cow_window(row: dict[str, Any], path: str | Path | None = None) -> Any:
    """One copy-on-write save's window, from the arm (inside the stop, a fraction of a
    millisecond before RESUME) to the job's end, in two panels on one time axis.  Above: the
    guest's iterations since then, beside the line of its rate in the second before the
    command (the gap between them is the progress lost), and under them each fault's handling,
    read to wake (two rows, alternating, so that bars next to each other stay apart).  Below:
    the memory map: guest RAM by address, the saver's front (its first span marked), the
    chunks released (by the front, or each by its fault from then on), and every fault at its
    chunk: filled where the fault copied the chunk, hollow where it copied nothing (it waited
    for the saver or for another copy, or found the chunk saved).  The address axis is cut to
    the faults' range where they all lie low in a large RAM (the cut is said on the axis)."""
    import numpy as np

    d = row["details"]
    resume_s = d["stopped"][1] if d["stopped"] is not None else 0.0
    end_ms = (d["job_s"] - resume_s) * 1e3
    tl = np.asarray(d["timeline"], dtype=float).reshape(-1, 2)
    fig, (ax, mp) = plt.subplots(2, 1, figsize=(7.4, 6.8), sharex=True, gridspec_kw={"height_ratios": [1, 1.3]})
    if len(tl) >= 2:
        t_ms = (tl[:, 0] - resume_s) * 1e3
        before = (tl[:, 0] >= -1.0) & (tl[:, 0] <= 0.0)
        it0 = float(np.interp(0.0, t_ms, tl[:, 1]))
        show = (t_ms >= -0.05 * end_ms) & (t_ms <= 1.05 * end_ms)
        edge = np.clip(np.array([-0.02 * end_ms, end_ms * 1.04]), t_ms[0], t_ms[-1])  # (interpolated at the view's edges)
        ts = np.concatenate(([edge[0]], t_ms[show], [edge[1]]))
        ax.step(ts, np.interp(ts, t_ms, tl[:, 1]) - it0, where="post", color="black", linewidth=1.2,
                label="guest iterations since RESUME")
        if before.sum() >= 2:
            rate = (tl[before, 1][-1] - tl[before, 1][0]) / (tl[before, 0][-1] - tl[before, 0][0]) / 1e3  # per ms
            ax.plot([0, end_ms], [0, rate * end_ms], color="0.5", linestyle="--", linewidth=1,
                    label="at the rate of the second before the command")
    at = np.asarray(d.get("fault_at_ms", []), dtype=float)
    lat = np.asarray(d.get("fault_latency_ms", []), dtype=float)[:len(at)]
    copied = np.asarray(d.get("fault_copy_ms", []), dtype=float)[:len(at)] > 0
    lo, hi = ax.get_ylim()
    for k, (a0, a1) in enumerate(zip(at.tolist(), (at + lat).tolist(), strict=True)):
        y = lo + (0.03 if k % 2 == 0 else 0.08) * (hi - lo)
        ax.plot([a0, a1], [y, y], color="tab:red", linewidth=3.5, solid_capstyle="butt")
    if len(at):
        ax.plot([], [], color="tab:red", linewidth=3.5, label="a fault being handled, read to wake (rows alternate)")
    _cow_map(ax, mp, d, at, lat, copied, end_ms)
    ax.set_ylabel("iterations since RESUME")
    ax.grid(True, linewidth=0.3)
    ax.legend(loc="upper left", fontsize=7.5)
    ax.set_title(f"Inside one copy-on-write save ({row['ram_mib']} MiB RAM, {len(at)} faults)")
    mp.grid(True, linewidth=0.3)
    mp.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=7.5, frameon=False)
    fig.tight_layout()
    return _finish(fig, path)


def two_ways_timelines(results: dict[str, dict[str, Any]], path: str | Path | None = None,
                       conditions: str = "") -> Any:
    """Notebook 10's two operations, one panel each, every system's guest on the same axes:
    the guest's work since the command, in seconds at its own rate of the second before
    (iterations / that rate), against time since the command.  The diagonal is a guest the
    operation did not slow; a flat stretch is a stop (hatched; a stop too short to see is
    marked by a tick under the axis); a line ends 0.1 s after its operation.
    ``results``: one :func:`lab.two_ways.snapshot_two_ways` result per system (one run each:
    the legend says so); ``conditions``: the guest and set-up, put in the title."""
    import numpy as np

    ops = (("internal", "internal snapshot (snapshot-save)"), ("migrate", "background snapshot (migrate)"))
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.6))
    styles = {"snaplab": ("black", "-"), "qemu": ("tab:blue", "--")}
    for ax, (op, title) in zip(axes, ops, strict=True):
        longest = 0.0
        for system, res in results.items():
            r = res[op]
            tl = np.asarray(r.get("timeline", []), dtype=float).reshape(-1, 2)
            if not len(tl) or not r.get("rate_before", 0) > 0:
                continue
            color, ls = styles.get(system, ("0.4", ":"))
            name = "QEMU 7.2" if system == "qemu" else system
            # steps: between two samples the count is known only to be at least the earlier one
            ax.plot(tl[:, 0], tl[:, 1] / r["rate_before"], color=color, linestyle=ls, linewidth=1.4, drawstyle="steps-post",
                    label=f"{name} (one run): downtime {r['downtime_ms']:.1f} ms, operation {r['end_s'] * 1e3:.0f} ms, progress {r['progress']:.2f}")
            ax.axvline(r["end_s"], color=color, linestyle=ls, linewidth=0.8)
            hatch_ = "///" if system == "qemu" else "\\\\\\"
            for k, (a, b) in enumerate(r.get("stops_s", [])):
                ax.axvspan(a, b, facecolor="none", edgecolor=color, hatch=hatch_, linewidth=0,
                           label=f"{name} stopped" if k == 0 else None)
                # a stop narrower than a hatch line is marked at its STOP, on the axis; a marker
                # of its own per system, one above the axis and one below, so neither hides the other
                up = system != "qemu"
                ax.plot([a], [0.07 if up else -0.02], marker="^" if up else "v", color=color, markersize=7, clip_on=False,
                        markerfacecolor="none" if up else color,
                        transform=ax.get_xaxis_transform(), label=f"{name}: STOP" if k == 0 else None)
            longest = max(longest, r["end_s"] + 0.1)
        if longest:
            ax.plot([0, longest], [0, longest], color="0.6", linestyle=":", linewidth=1, label="not slowed at all")
            ax.set_xlim(-0.2, longest)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("time since the command (s)")
        ax.grid(True, linewidth=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, frameon=False)
    axes[0].set_ylabel("guest work since the command\n(s at its rate of the second before)")
    fig.suptitle((conditions + "\n" if conditions else "") + "One run per system; hatched, with a triangle at the axis: "
                 "stopped; vertical line: the operation's end (a job, or the migration's completion); each line ends 0.1 s after it", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def fault_latency(rows: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Cumulative distribution of write-fault service times during copy-on-write saves."""
    import numpy as np

    if any("details" not in r for r in rows):
        raise ValueError("fault_latency needs rows from run_experiment itself: rows reloaded from a CSV "
                         "have no per-fault details")
    with_faults = [r for r in rows if r["details"]["fault_latency_ms"]]
    lat = np.sort(np.concatenate([np.asarray(r["details"]["fault_latency_ms"], dtype=float) for r in with_faults]
                                 or [np.zeros(0)]))
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    if len(lat):
        ax.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post", color="black")
        ax.set_xscale("log")
        lo, hi = float(lat[0]), float(lat[-1])
        ax.set_xlim(lo / 1.3 if lo > 0 else 1e-3, hi * 1.3)
        # labelled ticks 1-2-3-5 per decade over the data (the body of such a distribution
        # sits between two decade marks, where a plain log axis labels nothing)
        ticks = [m * 10.0 ** e for e in range(-3, 4) for m in (1, 2, 3, 5)]
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded minor labels
        med = float(np.median(lat))
        ax.axvline(med, color="0.4", linestyle="--", linewidth=0.8)
        ax.text(med, 0.03, f" median {med:.2f} ms", fontsize=8, color="0.3")
    ax.set_xlabel("fault service time: read to wake (ms, log)")
    ax.set_ylabel("fraction of faults ≤ x")
    sizes = sorted({(r.get("ram_mib"), r.get("working_set_mib")) for r in with_faults or rows})
    cond = "; ".join(f"{ram} MiB RAM, {f'{ws} MiB' if ws else 'half of RAM as'} working set"
                     for ram, ws in sizes if ram is not None)
    ax.set_title(f"Copy-on-write faults: {len(lat)} faults in {len(with_faults)} saves"
                 + (f"\n({cond})" if cond else ""), fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    fig.tight_layout()
    return _finish(fig, path)


def _median(vals: list[float]) -> float:
    return median(vals)


def throughput_bars(save_rows: list[dict[str, Any]], load_rows: list[dict[str, Any]] | None = None,
                    reference: dict[str, dict[int, float]] | None = None) -> list[tuple[str, str, float]]:
    """(group, who, MiB/s) for `throughput`: medians of ours, QEMU's at its largest recorded RAM.

    Ours: vmstate bytes over the guest's stop time (blocking save, blocking load) or over the
    whole job (copy-on-write). QEMU's (recorded with RAM full of random bytes, so vmstate ~ RAM):
    RAM size over the same interval.
    """
    bars: list[tuple[str, str, float]] = []
    mib = float(1 << 20)
    blk = [r for r in save_rows if r["engine"] == save_engines()[0]]  # QEMU's savevm
    cow = [r for r in save_rows if write_protects(str(r["engine"]))]
    if blk:
        bars.append(("blocking save", "snaplab",
                     _median([r["vmstate_bytes"] / mib / (r["downtime_ms"] / 1e3) for r in blk])))
    if cow:
        bars.append(("background save (whole job)", "snaplab",
                     _median([r["vmstate_bytes"] / mib / r["total_s"] for r in cow])))
    lb = [r for r in (load_rows or []) if r["engine"] == load_engines()[0]]  # QEMU's loadvm
    if lb:
        bars.append(("blocking load", "snaplab",
                     _median([r["vmstate_bytes"] / mib / (r["stopped_ms"] / 1e3) for r in lb])))
    ref = reference or {}
    for group, name in (("blocking save", "blocking save downtime"),
                        ("background save (whole job)", "background snapshot total"),
                        ("blocking load", "blocking load")):
        pts = ref.get(name)
        if pts and any(g == group for g, _, _ in bars):
            ram = max(pts)
            bars.append((group, f"QEMU 7.2 ({ram} MiB)", ram / pts[ram]))
    return bars


def throughput(save_rows: list[dict[str, Any]], load_rows: list[dict[str, Any]] | None = None,
               reference: dict[str, dict[int, float]] | None = None,
               path: str | Path | None = None) -> Any:
    """Save/load throughput (MiB of vmstate per second, log) beside QEMU 7.2's recorded figures."""
    bars = throughput_bars(save_rows, load_rows, reference)
    groups = list(dict.fromkeys(g for g, _, _ in bars))
    fig, ax = plt.subplots(figsize=(6.8, 3.8))
    for gi, g in enumerate(groups):
        members = [(who, v) for gg, who, v in bars if gg == g]
        for k, (who, v) in enumerate(members):
            x = gi + (k - (len(members) - 1) / 2) * 0.38
            ours = who == "snaplab"
            ax.bar(x, v, width=0.36, color="white" if ours else "lightgrey", edgecolor="black",
                   hatch="" if ours else "//")
            ax.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=8)
    handles = [Patch(facecolor="white", edgecolor="black", label="snaplab (this run)"),
               Patch(facecolor="lightgrey", edgecolor="black", hatch="//", label="QEMU 7.2 (recorded, largest RAM)")]
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yscale("log")
    ax.set_ylabel("throughput (MiB of vmstate / s, log)")
    ax.set_title("Save and load throughput beside QEMU 7.2")
    ax.grid(True, axis="y", linewidth=0.3)
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    if bars:
        ax.set_ylim(min(v for _, _, v in bars) / 2, max(v for _, _, v in bars) * 4)
    fig.tight_layout()
    return _finish(fig, path)


FILL_STYLE = {0: ("tab:red", "o", "read by its fault"), 1: ("tab:blue", "s", "read as the loading set"),
              2: ("0.45", ".", "read by the rest fill")}


def lazy_windows(rows: list[dict[str, Any]], window_ms: float = 100.0, path: str | Path | None = None) -> Any:
    """Inside one load of each lazy policy (the last row of each with a fill log), side by
    side: above, the guest's progress rate in 1 ms bins (``timeline_fine``) over its rate
    before; below, the memory map: guest RAM by address against time after the command, each
    2 MiB chunk as it came in (by its fault, as the loading set, or by the rest fill; hollow:
    all zero, nothing read), and each fault as a cross at its chunk.  ``window_ms`` after the
    command is drawn; how many chunks came later is written on the panel."""
    import numpy as np

    last = {r["policy"]: r for r in rows if r.get("fill_log")}
    from lab.spec import load_engines

    pols = [p for p in load_engines() if p in last]  # (the registry's order)
    fig, axes = plt.subplots(2, max(len(pols), 1), figsize=(3.6 * max(len(pols), 1) + 0.8, 6.2), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [1, 1.6]})
    for k, pol in enumerate(pols):
        r, ax, mp = last[pol], axes[0][k], axes[1][k]
        off = r["resume_ms"]  # the map's times are after RESUME; the axis is after the command
        fine = r.get("timeline_fine") or {"t_ms": [], "rate_frac": []}
        t = np.asarray(fine["t_ms"], dtype=float)
        ax.step(t, np.asarray(fine["rate_frac"], dtype=float), where="post", color="black", linewidth=1)
        ax.axhline(0.9, color="0.5", linestyle=":", linewidth=1)
        ax.axvline(off, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_title(f"{pol}: to90 {r['to90_ms']:.0f} ms, {r['faults']} faults", fontsize=9)
        frac = np.asarray(fine["rate_frac"], dtype=float)
        peak = float(np.nanmax(frac)) if len(frac) and np.isfinite(frac).any() else 1.0
        ax.set_ylim(0, min(3.0, max(1.5, 1.05 * peak)))
        ax.grid(True, linewidth=0.3)
        log = np.asarray(r["fill_log"], dtype=float).reshape(-1, 4)
        later = int((log[:, 0] + off > window_ms).sum())
        for by, (color, marker, label) in FILL_STYLE.items():
            for zero in (0, 1):
                sel = (log[:, 2] == by) & (log[:, 3] == zero) & (log[:, 0] + off <= window_ms)
                if not sel.any():
                    continue
                mp.scatter(log[sel, 0] + off, log[sel, 1] * 2 + 1, s=12 if marker != "." else 20, marker=marker,
                           facecolors="none" if zero else color, edgecolors=color, linewidths=0.8,
                           label=f"{label}{' (all zero: nothing read)' if zero else ''}")
        fa = np.asarray(r.get("fault_at_ms", []), dtype=float) + off
        fc = np.asarray(r.get("fault_chunk", []), dtype=float)[:len(fa)] * 2 + 1
        inside = fa <= window_ms
        mp.scatter(fa[inside], fc[inside], s=22, marker="x", color="black", linewidths=0.7, label="a fault (the guest blocked)")
        mp.axvline(off, color="0.3", linestyle="--", linewidth=0.8)
        mp.text(0.98, 0.98, f"{later} chunks came in later\n(all in {r['resident_s']:.2f} s after RESUME)",
                transform=mp.transAxes, ha="right", va="top", fontsize=7.5,
                bbox={"facecolor": "white", "edgecolor": "0.7", "linewidth": 0.5})
        mp.set_ylim(0, max(r.get("chunks", 0) * 2, 1))
        mp.set_xlim(-2, window_ms)
        mp.set_xlabel("ms after the command")
        mp.grid(True, linewidth=0.3)
    axes[0][0].set_ylabel("guest rate / rate before\n(1 ms bins; dotted: 90%)")
    axes[1][0].set_ylabel("guest RAM address (MiB)")
    handles: dict[str, Any] = {}
    for mp in axes[1]:
        for h, lab in zip(*mp.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Inside one lazy load of each policy (dashed: RESUME)", fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return _finish(fig, path)


def restore_figure(rows: list[dict[str, Any]], path: str | Path | None = None, title: str = "",
                   zoom: bool = False) -> Any:
    """Restore to full speed (lab.restore rows): left, the guest's progress rate after the
    command, median over the runs of each policy with its interquartile band (``zoom``: and
    beside it the first 100 ms in 1 ms bins, where a small guest's loads differ); right,
    command -> 50% and 90% of the rate before, each load a dot, medians as bars with IQR
    whiskers, a load not back within its watch counted as later than the others and marked
    "k/n late" (lab/restore.py)."""
    import numpy as np

    from lab.restore import has_reference

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    zoom = zoom and all("timeline_fine" in r for r in rows)
    if zoom:
        fig, (ax, zx, bx) = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    else:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    for axis, key in ((ax, "timeline"), *(((zx, "timeline_fine"),) if zoom else ())):
        for p in policies:
            rs = [r for r in rows if r["policy"] == p]
            t = np.array(max((r[key]["t_ms"] for r in rs), key=len))  # rows of runs watched longer or shorter:
            fr = np.full((len(rs), len(t)), np.nan)  # each padded with "not watched"
            for i, r in enumerate(rs):
                fr[i, :len(r[key]["rate_frac"])] = r[key]["rate_frac"]
            watched = ~np.isnan(fr).all(axis=0)  # past every load's horizon: not drawn
            t, fr = t[watched], fr[:, watched]
            marker, line = style(p)
            if not len(t):  # no load of this policy had a reference rate: say so, draw nothing
                axis.plot([], [], line, label=f"{p} (no reference rate)", lw=1.4)
                continue
            q1, med, q3 = np.nanpercentile(fr, [25, 50, 75], axis=0)
            axis.plot(t, med, line, label=p, lw=1.4)
            axis.fill_between(t, q1, q3, alpha=0.15)
        for lv in (0.5, 0.9):
            axis.axhline(lv, color="0.6", lw=0.8, ls=":")
        axis.set_xlabel("time since the snapshot-load command (ms)")
        axis.set_ylim(0, 1.3)
    ax.set_ylabel("guest progress rate / rate before")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("progress after the command (median, IQR band)", fontsize=10)
    if zoom:
        zx.set_title("its first 100 ms, 1 ms bins", fontsize=10)
    x = np.arange(len(policies))
    for k, (key, h) in enumerate((("to50_ms", "//"), ("to90_ms", ""))):
        vals = [[float(r[key]) for r in rows if r["policy"] == p and has_reference(r)]
                for p in policies]  # a load with no reference rate: unknown, not late (lab/restore.py)
        # a load not back within its watch counts as later than the others (lab/restore.py):
        # a median that is late has no bar, a late third quartile no upper whisker
        q1, med, q3 = np.array([late_quantiles(v, [25, 50, 75]) for v in vals]).T
        err = np.array([np.nan_to_num(med - q1), np.nan_to_num(q3 - med)])
        xs = x + (k - 0.5) * 0.38
        bx.bar(xs, med, 0.38, yerr=err, capsize=3, hatch=h, fill=bool(k), color="0.55",
               edgecolor="black", label=f"to {key[2:4]}% of the rate before")
        for xi, v in zip(xs, vals, strict=True):  # each load (a late one is not drawn: see its note)
            bx.plot([xi] * len(v), v, "o", ms=3, color="tab:red" if k else "tab:blue", alpha=0.7, zorder=3)
        for xi, v, m, up in zip(xs, vals, med, err[1], strict=True):
            late = int(np.isnan(v).sum())
            if late:
                bx.annotate(f"{late}/{len(v)}\nlate", (xi, 0 if np.isnan(m) else m + up), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    if bx.texts:  # room above the tallest whisker for its note
        bx.set_ylim(top=bx.get_ylim()[1] * 1.15)
    bx.set_xticks(x, policies, fontsize=8)
    bx.set_ylabel("ms after the command (median, IQR)")
    bx.legend(fontsize=8)
    bx.set_title("back to speed", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
