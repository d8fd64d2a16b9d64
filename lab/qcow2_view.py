"""A qcow2 file read byte by byte, for teaching: the header, the L1 and L2 tables, the refcounts,
the snapshot table, and where a snapshot's VM state lives.

Written from QEMU's ``docs/interop/qcow2.txt`` (sections "Header", "Host cluster management",
"Cluster mapping", "Snapshots"), independently of snaplab's own driver (``emulator/block``), so
that a notebook can set what this reads beside what ``qemu-img`` reports.  Read-only; version 3
images with standard (not extended) L2 entries.  Also :func:`qemu_img`, which runs the real tool,
:func:`check_report`, which runs a check (qemu-img's or snaplab-img's), and :func:`set_refcount`,
the one writer here: it damages a refcount on purpose, for a check to find.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

QCOW_MAGIC = b"QFI\xfb"
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # qcow2.txt: bits 9-55 of L1, L2 and refcount table entries
QCOW_OFLAG_COPIED = 1 << 63  # refcount exactly one: writable in place
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1  # L2 bit 0: the cluster reads as zeros

# qcow2.txt "Header": (offset, struct format, field)
HEADER_FIELDS = [
    (0, ">4s", "magic"), (4, ">I", "version"), (8, ">Q", "backing_file_offset"),
    (16, ">I", "backing_file_size"), (20, ">I", "cluster_bits"), (24, ">Q", "size"),
    (32, ">I", "crypt_method"), (36, ">I", "l1_size"), (40, ">Q", "l1_table_offset"),
    (48, ">Q", "refcount_table_offset"), (56, ">I", "refcount_table_clusters"),
    (60, ">I", "nb_snapshots"), (64, ">Q", "snapshots_offset"), (72, ">Q", "incompatible_features"),
    (80, ">Q", "compatible_features"), (88, ">Q", "autoclear_features"), (96, ">I", "refcount_order"),
    (100, ">I", "header_length"),
]
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")  # qcow2.txt "Snapshot table entry", bytes 0-39


@dataclass(frozen=True)
class SnapshotEntry:
    """One snapshot table entry (qcow2.txt "Snapshot table entry")."""

    entry_offset: int
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    vm_clock_nsec: int
    vm_state_size: int  # the 64-bit extra-data field when present (bytes 40-47), else bytes 32-35
    disk_size: int | None  # extra data bytes 48-55
    entry_bytes: int


class Qcow2View:
    """The structures of one qcow2 file, read with ``struct`` from a binary file object."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        raw = self.read(0, 112)
        self.header: dict[str, Any] = {name: struct.unpack_from(fmt, raw, off)[0] for off, fmt, name in HEADER_FIELDS}
        if self.header["magic"] != QCOW_MAGIC or self.header["version"] != 3:
            raise ValueError("not a version 3 qcow2 image")
        self.cluster_bits = int(self.header["cluster_bits"])
        self.cluster_size = 1 << self.cluster_bits
        self.l2_bits = self.cluster_bits - 3  # 8-byte entries, one cluster per L2 table
        self.refcount_bits = 1 << int(self.header["refcount_order"])

    @classmethod
    def open(cls, path: str | Path) -> Qcow2View:
        return cls(open(path, "rb"))  # noqa: SIM115 (closed by close())

    def close(self) -> None:
        self.f.close()

    def read(self, off: int, n: int) -> bytes:
        self.f.seek(off)
        return self.f.read(n)

    def u64s(self, off: int, n: int) -> list[int]:
        return list(struct.unpack(f">{n}Q", self.read(off, 8 * n)))

    # -- cluster mapping ------------------------------------------------------------------------
    def l1(self, offset: int | None = None, size: int | None = None) -> list[int]:
        """The L1 table's raw entries (the active one by default)."""
        return self.u64s(self.header["l1_table_offset"] if offset is None else offset,
                         self.header["l1_size"] if size is None else size)

    def l2(self, l2_offset: int) -> list[int]:
        return self.u64s(l2_offset, self.cluster_size // 8)

    def host_offset(self, guest_off: int, l1: list[int]) -> int | None:
        """Where the guest (virtual) offset lives in the file through ``l1``; None: unallocated."""
        i1, i2 = guest_off >> (self.cluster_bits + self.l2_bits), (guest_off >> self.cluster_bits) & ((1 << self.l2_bits) - 1)
        if i1 >= len(l1) or not l1[i1] & OFFSET_MASK:
            return None
        e = self.l2(l1[i1] & OFFSET_MASK)[i2]
        if e & QCOW_OFLAG_COMPRESSED or not e & OFFSET_MASK:
            return None
        return (e & OFFSET_MASK) + (guest_off & (self.cluster_size - 1))

    def mapped(self, l1: list[int]) -> list[dict[str, Any]]:
        """Every allocated data cluster reached from ``l1``: guest offset, host offset, flags."""
        out = []
        for i1, e1 in enumerate(l1):
            if not e1 & OFFSET_MASK:
                continue
            for i2, e2 in enumerate(self.l2(e1 & OFFSET_MASK)):
                if e2 & OFFSET_MASK:
                    out.append({"l1_index": i1, "l2_index": i2,
                                "guest_offset": (i1 << (self.cluster_bits + self.l2_bits)) | (i2 << self.cluster_bits),
                                "host_offset": e2 & OFFSET_MASK, "l2_table": e1 & OFFSET_MASK,
                                "COPIED": bool(e2 & QCOW_OFLAG_COPIED), "L2 COPIED": bool(e1 & QCOW_OFLAG_COPIED)})
        return out

    def vm_state_offset(self, disk_size: int | None = None) -> int:
        """QEMU's ``qcow2_vm_state_offset``: the first L1 index past the virtual disk, as a
        guest offset (block/qcow2.h: ``l1_vm_state_index << (cluster_bits + l2_bits)``)."""
        size = self.header["size"] if disk_size is None else disk_size
        span = 1 << (self.cluster_bits + self.l2_bits)  # guest bytes one L2 table maps
        return -(-size // span) * span

    # -- refcounts --------------------------------------------------------------------------------
    def refcount_entry(self, host_off: int) -> tuple[int, int]:
        """Where the refcount of the cluster at ``host_off`` lives: (its refcount block's offset,
        0 where the table has none; the entry's index in it)."""
        cluster = host_off >> self.cluster_bits
        per_block = self.cluster_size * 8 // self.refcount_bits
        table = self.u64s(self.header["refcount_table_offset"], self.header["refcount_table_clusters"] * self.cluster_size // 8)
        return table[cluster // per_block] & ~0x1FF, cluster % per_block

    def refcount(self, host_off: int) -> int:
        """qcow2.txt "Host cluster management": refcount table -> refcount block -> entry."""
        blk, idx = self.refcount_entry(host_off)
        if not blk:
            return 0
        if self.refcount_bits == 16:
            return int(struct.unpack_from(">H", self.read(blk + 2 * idx, 2))[0])
        bit = idx * self.refcount_bits
        word = int.from_bytes(self.read(blk + bit // 8, 8), "big")
        return (word >> (64 - self.refcount_bits - bit % 8)) & ((1 << self.refcount_bits) - 1)

    def refcounts(self) -> dict[int, int]:
        """{host cluster offset: refcount} for every cluster with a non-zero refcount."""
        size = self.f.seek(0, 2)
        out = {}
        for off in range(0, size, self.cluster_size):
            rc = self.refcount(off)
            if rc:
                out[off] = rc
        return out

    def free_clusters(self) -> list[int]:
        """Host offsets of the clusters inside the file with refcount 0: used once and given
        back (e.g. an old copy of a table), or never used; the allocator may hand them out."""
        used = self.refcounts()
        return [off for off in range(0, self.f.seek(0, 2), self.cluster_size) if off not in used]

    # -- snapshots ----------------------------------------------------------------------------
    def snapshots(self) -> list[SnapshotEntry]:
        out, off = [], self.header["snapshots_offset"]
        for _ in range(self.header["nb_snapshots"]):
            l1_off, l1_size, id_len, name_len, date_sec, _nsec, clock, vm32, extra = \
                SNAPSHOT_ENTRY.unpack(self.read(off, SNAPSHOT_ENTRY.size))
            ext = self.read(off + 40, extra)
            vm = struct.unpack_from(">Q", ext, 0)[0] if extra >= 8 else vm32
            disk = struct.unpack_from(">Q", ext, 8)[0] if extra >= 16 else None
            names = self.read(off + 40 + extra, id_len + name_len)
            n = 40 + extra + id_len + name_len
            n += -n % 8
            out.append(SnapshotEntry(off, l1_off, l1_size, names[:id_len].decode(), names[id_len:].decode(),
                                     date_sec, clock, vm, disk, n))
            off += n
        return out

    def layout(self) -> list[tuple[int, str]]:
        """(host offset, what) for the metadata clusters: header, L1s, refcount table and blocks,
        the snapshot table, each L2 table (host clusters not named are data or VM state)."""
        h = self.header
        cs = self.cluster_size
        items = [(0, "header"), (h["l1_table_offset"], "active L1 table"),
                 (h["refcount_table_offset"], "refcount table")]
        rt = self.u64s(h["refcount_table_offset"], h["refcount_table_clusters"] * cs // 8)
        items += [(e & ~0x1FF, f"refcount block {i}") for i, e in enumerate(rt) if e & ~0x1FF]
        if h["nb_snapshots"]:
            items.append((h["snapshots_offset"], "snapshot table"))
        l1s = [("active", self.l1())] + [(f"snapshot {s.name!r}", self.l1(s.l1_table_offset, s.l1_size))
                                          for s in self.snapshots()]
        for s in self.snapshots():
            items.append((s.l1_table_offset, f"L1 table of snapshot {s.name!r}"))
        seen: dict[int, list[str]] = {}
        for who, l1 in l1s:
            for i, e in enumerate(l1):
                if e & OFFSET_MASK:
                    seen.setdefault(e & OFFSET_MASK, []).append(f"{who}[{i}]")
        items += [(off, "L2 table of " + ", ".join(w)) for off, w in seen.items()]
        return sorted(items)


def qemu_img(*args: str) -> str:
    """Run the real ``qemu-img`` (QEMU 7.2) and return its standard output."""
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False, timeout=120).stdout


def set_refcount(path: str | Path, host_off: int, value: int) -> None:
    """Damage on purpose: write ``value`` into the refcount entry of the cluster at ``host_off``
    (16-bit refcounts, the entry's refcount block must exist), bypassing every driver."""
    with open(path, "r+b") as f:
        v = Qcow2View(f)
        if v.refcount_bits != 16:
            raise ValueError("set_refcount handles 16-bit refcounts only")
        blk, idx = v.refcount_entry(host_off)
        if not blk:
            raise ValueError(f"no refcount block covers {host_off:#x}")
        f.seek(blk + 2 * idx)
        f.write(struct.pack(">H", value))


def check_report(tool: str, path: str | Path, *opts: str) -> str:
    """``TOOL check [OPTS] PATH`` (``qemu-img`` or ``snaplab-img``): its exit code, then what it
    printed on stderr (one line per problem) and stdout (the summary)."""
    exe = [tool] if tool == "qemu-img" else [sys.executable, "-m", "emulator.img"]
    r = subprocess.run([*exe, "check", *opts, str(path)], capture_output=True, text=True, check=False, timeout=120)
    return f"$ {tool} check {' '.join(opts)} {Path(path).name}   (exit {r.returncode})\n" + r.stderr + r.stdout


def qemu_img_info(path: str | Path) -> dict[str, Any]:
    return dict(json.loads(qemu_img("info", "-U", "--output=json", str(path))))


def make_example(workdir: str | Path, ram_mib: int = 64, seed: int = 1, fill_mib: int = 8) -> Path:
    """A 1 GiB qcow2 disk with 0x11 in its first cluster and 0x55 at 600 MiB (a second L2
    table), then one ``snapshot-save`` (VM state included) of a running idle guest on it whose
    RAM holds ``fill_mib`` MiB of 0x5a from 16 MiB on (so the VM state has a known size).

    The disk is written through snaplab's qcow2 driver (the public ``Qcow2Image`` API), the
    snapshot through QMP; the file is left closed for reading."""
    from emulator.block import Qcow2Image
    from lab.run import build_machine
    from lab.spec import ExperimentSpec

    wd = Path(workdir)
    path = wd / "disk0.qcow2"
    img = Qcow2Image.create(path, 1 << 30)
    img.write(0, b"\x11" * 65536)
    img.write(600 << 20, b"\x55" * 65536)
    img.close()
    m, g = build_machine(ExperimentSpec(ram_mib=ram_mib, seed=seed, workload="idle"), wd)
    try:
        m.ram.write(16 << 20, b"\x5a" * (fill_mib << 20))
        m.start()
        q = m.qmp()
        import time

        time.sleep(0.3)
        q.execute("snapshot-save", {"job-id": "s", "tag": "snap1", "vmstate": "disk0", "devices": ["disk0"]})
        info = q.wait_job("s", 120)
        if "error" in info:
            raise RuntimeError(info["error"])
        stats = q.execute("__org.snaplab_query-snapshot-stats", {"id": "s"})
        (wd / STATS_NAME).write_text(json.dumps({"ram_mib": ram_mib, "fill_mib": fill_mib, **stats}))
        q.execute("quit")
    finally:
        m.close()
        g.close()
    return path


STATS_NAME = "snap1-stats.json"  # what the engine reported for make_example's snapshot


def vmstate_parts(path: str | Path) -> dict[str, int]:
    """What the VM state of :func:`make_example`'s snapshot is made of, from the engine's own
    statistics saved beside the image: the non-zero RAM pages written (the ``0x5a`` fill and the
    guest's own non-zero pages: code, stack, the lab page), the page bitmap (one bit per page of
    RAM), and the rest (stream framing, CPU and devices, and the padding that starts the RAM
    pages on a cluster boundary)."""
    st = json.loads((Path(path).parent / STATS_NAME).read_text())
    page = 4096
    pages = int(st["ram-pages-written"])
    fill_pages = (int(st["fill_mib"]) << 20) // page
    bitmap = (int(st["ram_mib"]) << 20) // page // 8
    return {"RAM pages written": pages, "of them the 0x5a fill": fill_pages,
            "of them the guest's own non-zero pages": pages - fill_pages,
            "page bitmap bytes": bitmap,
            "rest: framing, CPU, devices, padding (bytes)": int(st["vmstate-bytes"]) - pages * page - bitmap,
            "vm_state_size": int(st["vmstate-bytes"])}


def write_through_driver(path: str | Path, offset: int, data: bytes) -> None:
    """One guest write into the image's active layer (snaplab's qcow2 driver)."""
    from emulator.block import Qcow2Image

    img = Qcow2Image.open(path)
    try:
        img.write(offset, data)
    finally:
        img.close()
