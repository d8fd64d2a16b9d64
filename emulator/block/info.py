"""Image information as qemu-img and QMP report it (block/qapi.c bdrv_query_image_info).

Shared by snaplab-img (``info --output=json``) and QMP (``query-block``,
``query-named-block-nodes``).  Imports neither unicorn nor asyncio.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from emulator.block.copy_on_read import CopyOnRead
from emulator.block.qcow2 import Qcow2Image
from emulator.block.raw import RawImage
from emulator.block.state import QCowSnapshot


def snapshot_json(sn: QCowSnapshot) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if sn.icount is not None and sn.icount != -1:
        d["icount"] = sn.icount
    d.update({
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
        "name": sn.name,
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
        "id": sn.id_str,
        "vm-state-size": sn.vm_state_size,
    })
    return d


def full_backing_filename(overlay: str, name: str) -> str:
    """bdrv_get_full_backing_filename(): a relative name is relative to the overlay's directory."""
    if not name or os.path.isabs(name) or not os.path.dirname(overlay):
        return name
    return os.path.join(os.path.dirname(overlay), name)


def info_dict(img: Qcow2Image | RawImage | CopyOnRead, path: str) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if isinstance(img, CopyOnRead):  # a filter: what it filters, under its own driver name
        d = {"virtual-size": img.size, "filename": path, "format": img.driver, "dirty-flag": False}
        return d
    if isinstance(img, Qcow2Image) and img.snapshots:
        d["snapshots"] = [snapshot_json(sn) for sn in img.snapshots]
    if isinstance(img, Qcow2Image) and img.backing_format:
        d["backing-filename-format"] = img.backing_format
    d["virtual-size"] = img.size
    d["filename"] = path
    if isinstance(img, Qcow2Image):
        d["cluster-size"] = img.cluster_size
    d["format"] = img.driver
    d["actual-size"] = img.file.allocated_bytes()
    if isinstance(img, Qcow2Image):
        data: dict[str, Any] = {"compat": "1.1" if img.version >= 3 else "0.10", "compression-type": "zlib"}
        if img.version >= 3:
            data["lazy-refcounts"] = bool(img.header.compatible_features & 1)
        data["refcount-bits"] = 1 << img.header.refcount_order
        if img.version >= 3:
            data["corrupt"] = bool(img.header.incompatible_features & 2)
            data["extended-l2"] = False
        d["format-specific"] = {"type": "qcow2", "data": data}
        if img.backing_file:
            d["full-backing-filename"] = full_backing_filename(path, img.backing_file)
            d["backing-filename"] = img.backing_file
    d["dirty-flag"] = False
    return d


def size_to_str(val: int) -> str:
    """util/cutils.c size_to_str(): three significant digits, binary prefixes."""
    _, e = math.frexp(val / (1000.0 / 1024.0)) if val else (0.0, 0)
    i = max((e - 1) // 10, 0)
    i = min(i, 6)
    div = 1 << (i * 10)
    suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][i]
    return f"{_fmt_g3(val / div)} {suffix}B"


def _fmt_g3(x: float) -> str:
    return "%0.3g" % x


def snapshot_dump_header() -> str:
    return "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")


def snapshot_dump(sn: QCowSnapshot) -> str:
    """block/qapi.c bdrv_snapshot_dump() for one row (local time, as qemu-img)."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec))
    secs = sn.vm_clock_nsec // 1_000_000_000
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60, (sn.vm_clock_nsec // 1_000_000) % 1000)
    icount = "" if sn.icount is None or sn.icount == -1 else str(sn.icount)
    return "%-9s %-16s %8s%20s%13s%11s" % (sn.id_str, sn.name, size_to_str(sn.vm_state_size), date, clock, icount)
