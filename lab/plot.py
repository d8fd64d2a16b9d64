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
