"""Guest programs: assemble the firmware and workloads from data/ into the pflash0 image.

The sources are x86-64 assembly in ``data/firmware/`` and ``data/guest/``, assembled with
keystone; the built image ``data/firmware/snaplab-fw.bin`` is committed, and a test rebuilds
it and compares bytes.  Also the host-side model of the ``dirty`` workload (which page
iteration *i* stamps), used to verify restored snapshots page by page.

Memory map of the guest (64-bit, flat, no paging): RAM at 0; firmware ROM (pflash0) at
:data:`FW_BASE`; lab page 0x7000; stack below 0x80000; workload code at 0x100000; data pages
from :data:`DATA_BASE`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emulator.errors import AssemblyError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
FIRMWARE_BIN = DATA_DIR / "firmware" / "snaplab-fw.bin"
FW_BASE = 0x10_0000_0000
FW_ENTRY = FW_BASE + 0x1000
FW_MAGIC = b"SNAPFW01"
WORKLOAD_BASE = 0x100000
DATA_BASE = 0x200000
LAB_PAGE = 0x7000
PAGE = 4096
WORKLOADS = ("idle", "dirty", "disk", "mixed")
PATTERNS = ("sequential", "random", "hot-cold")


def assemble(text: str, base: int) -> bytes:
    """x86-64 assembly (Intel syntax) at ``base``, with keystone."""
    import keystone  # build-time only

    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
    try:
        enc, _ = ks.asm(text, base)
    except keystone.KsError as err:
        raise AssemblyError(f"keystone: {err}") from err
    return bytes(enc or b"")


def strip_comments(text: str) -> str:
    return "\n".join(line.split(";", 1)[0].rstrip() for line in text.splitlines())


def platform_text() -> str:
    """The code appended to every program on snaplab's machine: the shared helpers, then
    snaplab's platform functions (data/qemu/platform.inc has QEMU's)."""
    return (DATA_DIR / "firmware" / "common.inc").read_text() + "\n" + \
        (DATA_DIR / "firmware" / "platform.inc").read_text()


def build_workloads() -> dict[str, bytes]:
    src = (DATA_DIR / "guest" / "workloads.asm").read_text()
    common = platform_text()
    parts = re.split(r"^;@(workload \w+|shared)\s*$", src, flags=re.M)
    pieces: dict[str, str] = {}
    shared = ""
    for tag, body in zip(parts[1::2], parts[2::2], strict=True):
        if tag == "shared":
            shared = body
        else:
            pieces[tag.split()[1]] = body
    out = {}
    for name in WORKLOADS:
        out[name] = assemble(strip_comments(pieces[name] + "\n" + shared + "\n" + common), WORKLOAD_BASE)
    return out


def build_firmware() -> bytes:
    """The pflash0 image: header page, firmware code at 0x1000, workloads after it."""
    src = (DATA_DIR / "firmware" / "firmware.asm").read_text()
    common = platform_text()
    text = src.replace("; include: common.inc is appended here by the build", common)
    for name, val in (("FW_BASE_PLUS_16", FW_BASE + 16), ("FW_BASE_PLUS_8", FW_BASE + 8), ("FW_BASE_0", FW_BASE)):
        text = text.replace(name, hex(val))
    code = assemble(strip_comments(text), FW_ENTRY)
    image = bytearray(0x1000) + code
    table: list[tuple[int, int]] = []
    blobs = build_workloads()
    for name in WORKLOADS:
        image += bytes(-len(image) % PAGE)
        blob = blobs[name]
        table.append((len(image), len(blob)))
        image += blob
    image[0:8] = FW_MAGIC
    struct.pack_into("<I", image, 8, len(table))
    for i, (off, size) in enumerate(table):
        struct.pack_into("<II", image, 16 + 8 * i, off, size)
    image += bytes(-len(image) % 0x10000)
    return bytes(image)


def rebuild(write: bool = False) -> bytes:
    """Assemble everything; with ``write`` store it as the committed image."""
    img = build_firmware()
    if write:
        FIRMWARE_BIN.write_bytes(img)
    return img


def firmware_image() -> bytes:
    return FIRMWARE_BIN.read_bytes()


@dataclass(frozen=True)
class WorkloadSpec:
    """What the firmware's fw_cfg tells the workload (see data/guest/workloads.asm)."""

    name: str = "dirty"
    seed: int = 0
    working_set: int = 0  # bytes; 0 = all RAM above DATA_BASE
    rate: int = 0  # bytes/s; 0 = unthrottled
    pattern: str = "random"
    batch_pages: int = 256
    ws_offset: int = 0  # bytes from DATA_BASE to the working set's first page (page-aligned)

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, not '{self.name}'")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, not '{self.pattern}'")
        if not 1 <= self.batch_pages <= 1 << 20:
            raise ValueError("batch_pages must be between 1 and 1048576")
        if self.rate < 0 or self.working_set < 0 or not 0 <= self.seed < 1 << 64:
            raise ValueError("rate, working_set and seed must be non-negative (seed < 2**64)")
        if self.ws_offset < 0 or self.ws_offset % PAGE:
            raise ValueError("ws_offset must be a non-negative multiple of 4096")

    @property
    def base(self) -> int:
        """Guest-physical address of the working set's first page (page 0 of the model)."""
        return DATA_BASE + self.ws_offset

    def pages(self, ram_size: int) -> int:
        """Pages in the working set for a guest of ``ram_size`` bytes (at least one)."""
        if self.ws_offset and DATA_BASE + self.ws_offset >= ram_size:
            raise ValueError(f"ws_offset {self.ws_offset:#x} leaves no working set in {ram_size >> 20} MiB of RAM")
        avail = max((ram_size - DATA_BASE - self.ws_offset) // PAGE, 1)
        ws = self.working_set // PAGE if self.working_set else avail
        return max(1, min(ws, avail))

    def ns_per_batch(self) -> int:
        if self.rate == 0:
            return 0
        return max(1, self.batch_pages * PAGE * 1_000_000_000 // self.rate)


_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64, the guest's page chooser (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _mulhi(h: np.ndarray, n: int) -> np.ndarray:
    """(h * n) >> 64 for uint64 h and small n, as the guest's ``mul``."""
    lo = h & np.uint64(0xFFFFFFFF)
    hi = h >> np.uint64(32)
    nn = np.uint64(n)
    with np.errstate(over="ignore"):
        return (hi * nn + ((lo * nn) >> np.uint64(32))) >> np.uint64(32)


def dirty_pages_touched(spec: WorkloadSpec, ram_size: int, start: int, stop: int) -> np.ndarray:
    """The page index the dirty workload stamps at each iteration in [start, stop)."""
    n = spec.pages(ram_size)
    i = np.arange(start, stop, dtype=np.uint64)
    if spec.pattern == "sequential":
        return (i % np.uint64(n)).astype(np.int64)
    with np.errstate(over="ignore"):
        h = splitmix64(np.uint64(spec.seed) + i)
    if spec.pattern == "random":
        return _mulhi(h, n).astype(np.int64)
    hot = max(n >> 3, 1)
    cold = (h >> np.uint64(61)) == 0
    return np.where(cold, _mulhi(h, n), _mulhi(h, hot)).astype(np.int64)


def expected_generations(spec: WorkloadSpec, ram_size: int, iterations: int, chunk: int = 1 << 22) -> np.ndarray:
    """Per data page: the generation stamp (last iteration + 1) after ``iterations``; 0 = untouched."""
    n = spec.pages(ram_size)
    gen = np.zeros(n, dtype=np.uint64)
    for s in range(0, iterations, chunk):
        e = min(iterations, s + chunk)
        pages = dirty_pages_touched(spec, ram_size, s, e)
        np.maximum.at(gen, pages, np.arange(s + 1, e + 1, dtype=np.uint64))
    return gen


if __name__ == "__main__":
    img = rebuild(write=True)
    print(f"wrote {FIRMWARE_BIN} ({len(img)} bytes)")
