"""Plots, readable without colour (markers and line styles differ), units on every axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"blocking": ("o", "-"), "cow": ("s", "--"), "precopy": ("^", ":")}


def downtime_vs_ram(rows: list[dict[str, Any]], path: str | Path | None = None,
                    reference: dict[str, dict[int, float]] | None = None) -> Any:
    """Median downtime (ms, log scale) against RAM size (MiB), one line per engine."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    engines = sorted({str(r["engine"]) for r in rows})
    for eng in engines:
        by_ram: dict[int, list[float]] = {}
        for r in rows:
            if r["engine"] == eng:
                by_ram.setdefault(int(r["ram_mib"]), []).append(float(r["downtime_ms"]))
        xs = sorted(by_ram)
        ys = [sorted(by_ram[x])[len(by_ram[x]) // 2] for x in xs]
        marker, ls = STYLE.get(eng, ("x", "-."))
        ax.plot(xs, ys, marker=marker, linestyle=ls, color="black", label=f"snaplab {eng}")
    for name, pts in (reference or {}).items():
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="D", linestyle="-.", color="grey", label=name)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yscale("log")
    ax.set_xlabel("guest RAM (MiB)")
    ax.set_ylabel("downtime, STOP to RESUME (ms)")
    ax.set_title("Snapshot downtime: blocking save vs copy-on-write")
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def engines_figure(rows: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Blocking vs copy-on-write vs pre-copy in one figure: downtime, total time, guest progress."""
    engines = [e for e in ("blocking", "cow", "precopy") if any(r["engine"] == e for r in rows)]

    def med(eng: str, key: str) -> float:
        vals = sorted(float(r[key]) for r in rows if r["engine"] == eng)
        return vals[len(vals) // 2] if vals else float("nan")

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    hatches = {"blocking": "", "cow": "//", "precopy": ".."}
    panels = [("downtime_ms", "downtime (ms, log)", True), ("total_s", "total time (s)", False),
              ("progress_during_save", "guest progress during save\n(fraction of normal)", False)]
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        vals = [med(e, key) for e in engines]
        ax.bar(engines, vals, color="white", edgecolor="black", hatch=[hatches[e] for e in engines])
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
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def load_figure(rows: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Blocking load vs lazy restore: how long the guest is stopped, and until all RAM is back."""
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    engines = [e for e in ("blocking", "lazy") if any(r["engine"] == e for r in rows)]
    for i, key in enumerate(("stopped_ms", "complete_s")):
        vals = []
        for e in engines:
            v = sorted(float(r[key]) * (1000.0 if key == "complete_s" else 1.0) for r in rows if r["engine"] == e)
            vals.append(v[len(v) // 2])
        ax.bar([x + 0.38 * i for x in range(len(engines))], vals, width=0.36, color="white", edgecolor="black",
               hatch="" if i == 0 else "//", label="guest stopped" if i == 0 else "all RAM loaded")
    ax.set_xticks([x + 0.19 for x in range(len(engines))], engines)
    ax.set_yscale("log")
    ax.set_ylabel("time (ms, log)")
    ax.set_title("snapshot-load: blocking vs lazy restore")
    ax.legend()
    ax.grid(True, axis="y", linewidth=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def progress_timeline(row: dict[str, Any], path: str | Path | None = None) -> Any:
    """Guest progress (iterations) over time around one snapshot; the job and the stop shaded."""
    d = row["details"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    t = [x for x, _ in d["timeline"]]
    it = [y for _, y in d["timeline"]]
    ax.step(t, it, where="post", color="black", linewidth=1, label="guest iterations (lab port samples)")
    ax.axvspan(0, d["job_s"], color="0.85", label="snapshot job")
    if d["stopped"] is not None:
        ax.axvspan(d["stopped"][0], d["stopped"][1], color="0.4", label="guest stopped")
    ax.set_xlabel("time since snapshot-save (s)")
    ax.set_ylabel("iterations done by the guest")
    ax.set_title(f"Guest progress around a {row['engine']} snapshot ({row['ram_mib']} MiB)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def fault_latency(rows: list[dict[str, Any]], path: str | Path | None = None) -> Any:
    """Cumulative distribution of write-fault service times during copy-on-write saves."""
    import numpy as np

    lat = np.sort(np.concatenate([np.asarray(r["details"]["fault_latency_ms"], dtype=float) for r in rows
                                  if r["details"]["fault_latency_ms"]] or [np.zeros(0)]))
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    if len(lat):
        ax.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post", color="black")
        ax.set_xscale("log")
    ax.set_xlabel("fault service time: read to wake (ms, log)")
    ax.set_ylabel("fraction of faults")
    ax.set_title(f"Copy-on-write faults ({len(lat)} faults)")
    ax.grid(True, which="both", linewidth=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def precopy_rounds(row: dict[str, Any], path: str | Path | None = None) -> Any:
    """Bytes written per pre-copy round (the last one with the guest stopped)."""
    rounds = row["details"]["bytes_per_round"]
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    ax.bar(range(1, len(rounds) + 1), [b / 2**20 for b in rounds], color="white", edgecolor="black")
    ax.set_xlabel("round (last: guest stopped)")
    ax.set_ylabel("written (MiB)")
    ax.set_title("Pre-copy: each round writes what the guest dirtied during the previous one")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
