"""QEMU 7.2's recorded numbers (data/reference/qemu-7.2.csv), for plots beside ours."""

from __future__ import annotations

import csv
from pathlib import Path

from emulator.guest import DATA_DIR

REFERENCE_CSV = DATA_DIR / "reference" / "qemu-7.2.csv"


def qemu_reference(path: Path = REFERENCE_CSV) -> dict[str, dict[int, float]]:
    """measurement -> {RAM MiB: seconds}."""
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["measurement"], {})[int(row["ram_mib"])] = float(row["seconds"])
    return out
