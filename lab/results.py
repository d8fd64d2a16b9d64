"""Results as a tidy table: CSV plus a JSON sidecar with the metadata to reproduce them."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab.stats import median

PAGE = 4096  # bytes per guest page (pages_written counts them)


def metadata(seed: int | None = None) -> dict[str, Any]:
    import unicorn

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "seed": seed,
        "snaplab": "0.1.0",
        "unicorn": unicorn.__version__,
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "write_protect_backend": _backend(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": source_revision(),
    }


def git_state(root: Path, paths: Sequence[str] = ()) -> tuple[str, list[str]]:
    """HEAD's commit in the git checkout at ``root`` ("" where there is none, or no git), and
    the tracked paths (under ``paths``, default all) with uncommitted changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=60)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
                               cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "", []
    if head.returncode != 0 or dirty.returncode != 0:
        return "", []
    return head.stdout.strip(), [line[3:] for line in dirty.stdout.splitlines()]


def source_revision(root: Path | None = None) -> dict[str, Any]:
    """The snaplab source a measurement ran (``root``: default, this package's checkout): its
    git commit and whether tracked files differed from it (``modified``); where it is not a git
    checkout (an installed copy), ``commit`` is "unknown" and ``modified`` None."""
    head, dirty = git_state(root or Path(__file__).resolve().parents[1])
    return {"commit": head, "modified": bool(dirty)} if head else {"commit": "unknown", "modified": None}


def _backend() -> str:
    """userfaultfd if this kernel grants it to us, else the Unicorn TLB fallback."""
    from emulator.errors import UffdUnavailable
    from emulator.uffd import UserFaultFD

    try:
        UserFaultFD().close()
        return "userfaultfd"
    except UffdUnavailable:
        return "unicorn-tlb"


REQUIRED = ("ram_mib", "engine", "downtime_ms", "total_s")  # what table() and the plots read


def csv_path(path: str | Path) -> Path:
    """``path`` as a results file: refused if it ends in ``.json``, where its own metadata goes."""
    p = Path(path)
    if p.suffix == ".json":
        raise ValueError(f"--out {p}: results are a CSV file (its metadata goes beside it as .json); "
                         "give a path ending in .csv")
    return p


def save(rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any]) -> Path:
    """``path`` (CSV) and its metadata beside it (the same name, ``.json``)."""
    p = csv_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (list, dict))]
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    p.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return p


def load(path: str | Path, required: Sequence[str] = ()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows saved by :func:`save`, with the metadata beside them; ``required`` (e.g.
    :data:`REQUIRED`, for ``snaplab run``/``sweep`` results): a file without those columns, or
    without rows, is refused with the column it lacks."""
    p = Path(path)
    if p.suffix == ".json":
        raise ValueError(f"{p}: a JSON file; snaplab's results are CSV (a reproduction: give its directory)")
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: _num(v) for k, v in r.items()} for r in reader]
        cols = reader.fieldnames or []
    missing = [c for c in required if c not in cols]
    if required and {"system", "op"} <= set(cols):
        raise ValueError(f"{p}: a reproduction's runs.csv: give its directory ({p.parent})")
    if missing:
        hint = " (a reproduction's runs.csv: give its directory)" if "op" in cols else ""
        raise ValueError(f"{p}: not a snaplab run/sweep results file: no column {missing[0]!r}{hint}")
    if required and not rows:
        raise ValueError(f"{p}: no rows")
    meta_path = p.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return rows, meta


def _num(v: str) -> Any:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


SPEC_KEYS = ("workload", "dirty_rate_mib_s", "working_set_mib", "pattern", "seed", "wp_backend", "warmup_s", "gap_s")


def varying(rows: list[dict[str, Any]]) -> list[str]:
    """The spec fields besides RAM and engine that differ between rows (a sweep's other axes)."""
    return [k for k in SPEC_KEYS if len({str(r.get(k)) for r in rows}) > 1]


def table(rows: list[dict[str, Any]]) -> str:
    """Median downtime and total time per (RAM, engine, and every other field that varies), as text.

    ``RAM saved MiB`` is the non-zero RAM pages in the snapshot (``pages_written``), the same
    for every engine; the VM state's size is not: pre-copy's layout puts each page at its own
    offset, so its ``vmstate_bytes`` spans all of RAM.  Rows without ``pages_written`` (files
    older than the column) show ``vmstate_bytes`` under ``vmstate MiB`` instead."""
    extra = varying(rows)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((int(r["ram_mib"]), str(r["engine"]), *(str(r.get(k)) for k in extra)), []).append(r)
    head = "".join(f" {k:>16}" for k in extra)
    pages = all(r.get("pages_written") not in (None, "") for r in rows)
    lines = [f"{'RAM MiB':>8} {'engine':<9}{head} {'downtime ms':>12} {'total s':>8} {'faults':>7}"
             f" {'RAM saved MiB' if pages else 'vmstate MiB':>13} {'n':>3}"]
    for key, rs in sorted(groups.items()):
        ram, eng = key[0], key[1]
        med = median([float(r["downtime_ms"]) for r in rs])
        tot = median([float(r["total_s"]) for r in rs])
        faults = median([float(r.get("faults", 0) or 0) for r in rs])
        vm = (median([float(r["pages_written"]) * PAGE for r in rs]) if pages
              else median([float(r.get("vmstate_bytes", 0) or 0) for r in rs])) / 2**20
        cols = "".join(f" {v:>16}" for v in key[2:])
        lines.append(f"{ram:>8} {eng:<9}{cols} {med:>12.2f} {tot:>8.3f} {faults:>7g} {vm:>13.1f} {len(rs):>3}")
    return "\n".join(lines)
