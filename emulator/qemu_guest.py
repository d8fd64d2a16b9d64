"""snaplab's guest programs as a boot image for the real QEMU (``-kernel``, multiboot).

The workloads are assembled from the very sources snaplab's firmware carries
(data/guest/workloads.asm and data/firmware/common.inc), with QEMU's platform file
(data/qemu/platform.inc: configuration table, HPET clock, APIC-timer alarm, debug-console
progress) instead of snaplab's, so the same seed gives the same page sequence, the same
generation stamps and the same pacing on both machines.  data/qemu/boot.asm enters long mode
from QEMU's multiboot loader and starts the configured workload.  The built image is
committed (data/qemu/snaplab-guest.mb); a test rebuilds it and compares bytes.

The host configures a run by writing the workload's keys into the image's CONFIG table
(:func:`configured_image`): key 2 workload, 3 seed, 4 working-set bytes, 5 ns per batch,
6 pattern, 7 disk sectors (0 here: QEMU has no snaplab disk controller, so the disk and
mixed workloads do no disk I/O on QEMU), 8 pages per batch.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from emulator.errors import AssemblyError
from emulator.guest import DATA_DIR, PATTERNS, WORKLOADS, WorkloadSpec, assemble, strip_comments

QEMU_DIR = DATA_DIR / "qemu"
IMAGE = QEMU_DIR / "snaplab-guest.mb"
LOAD = 0x100000  # where QEMU's multiboot loader puts the image
CONFIG = LOAD + 0x40
STUB32, INIT64, ISR, FAULT, IDT = LOAD + 0x1000, LOAD + 0x2000, LOAD + 0x3000, LOAD + 0x3100, LOAD + 0x4000
WORKLOAD_BASE = 0x110000  # workload n at WORKLOAD_BASE + n * WORKLOAD_SLOT
WORKLOAD_SLOT = 0x10000
LOW_RAM_LIMIT = 2 << 30  # q35 keeps at most 2 GiB below the PCI hole: the working set stays there
MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_AOUT_KLUDGE = 1 << 16
PROGRESS_PORT = 0x402  # isa-debugcon
PROGRESS_RECORD = 9  # 0xA5, then the iteration count (u64, little-endian)


def _sections(path: Path) -> dict[str, str]:
    parts = re.split(r"^;@(\w+)\s*$", path.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _assemble32(text: str, base: int) -> bytes:
    import keystone  # build-time only

    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    try:
        enc, _ = ks.asm(strip_comments(text), base)
    except keystone.KsError as err:
        raise AssemblyError(f"keystone: {err}") from err
    return bytes(enc or b"")


def build_workloads() -> dict[str, bytes]:
    """Each workload assembled at its slot with the shared code and QEMU's platform file."""
    src = (DATA_DIR / "guest" / "workloads.asm").read_text()
    tail = (DATA_DIR / "firmware" / "common.inc").read_text() + "\n" + (QEMU_DIR / "platform.inc").read_text()
    parts = re.split(r"^;@(workload \w+|shared)\s*$", src, flags=re.M)
    pieces = {tag.split()[-1]: body for tag, body in zip(parts[1::2], parts[2::2], strict=True)}
    return {name: assemble(strip_comments(pieces[name] + "\n" + pieces["shared"] + "\n" + tail),
                           WORKLOAD_BASE + i * WORKLOAD_SLOT)
            for i, name in enumerate(WORKLOADS)}


def _gate(handler: int) -> bytes:
    """A 64-bit interrupt gate (present, DPL 0, selector 0x08)."""
    return struct.pack("<HHBBHIi", handler & 0xFFFF, 0x08, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0)


def build_image() -> bytes:
    """The whole multiboot image, CONFIG zeroed (see the layout in data/qemu/boot.asm)."""
    boot = _sections(QEMU_DIR / "boot.asm")
    blobs = build_workloads()
    image = bytearray(WORKLOAD_BASE - LOAD + len(WORKLOADS) * WORKLOAD_SLOT)

    def put(addr: int, data: bytes, limit: int) -> None:
        if len(data) > limit:
            raise AssemblyError(f"{len(data)} bytes at {addr:#x} overflow their {limit:#x}-byte slot")
        image[addr - LOAD:addr - LOAD + len(data)] = data

    flags = MULTIBOOT_AOUT_KLUDGE
    put(LOAD, struct.pack("<IIIIIIII", MULTIBOOT_MAGIC, flags, -(MULTIBOOT_MAGIC + flags) & 0xFFFFFFFF,
                          LOAD, LOAD, 0, 0, STUB32), 0x40)
    gdt = struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    put(LOAD + 0x100, struct.pack("<HI", len(gdt) - 1, LOAD + 0x200), 0x10)
    put(LOAD + 0x110, struct.pack("<HQ", 256 * 16 - 1, IDT), 0x10)
    put(LOAD + 0x200, gdt, 0x100)
    put(STUB32, _assemble32(boot["stub32"], STUB32), 0x1000)
    put(INIT64, assemble(strip_comments(boot["init64"]), INIT64), 0x1000)
    put(ISR, assemble(strip_comments(boot["isr"]), ISR), 0x100)
    put(FAULT, assemble(strip_comments(boot["fault"]), FAULT), 0xF00)
    put(IDT, b"".join(_gate(FAULT if v < 32 else ISR) for v in range(256)), 0x1000)
    for i, name in enumerate(WORKLOADS):
        put(WORKLOAD_BASE + i * WORKLOAD_SLOT, blobs[name], WORKLOAD_SLOT)
    return bytes(image)


def rebuild(write: bool = False) -> bytes:
    img = build_image()
    if write:
        IMAGE.write_bytes(img)
    return img


def configured_image(spec: WorkloadSpec, ram_size: int) -> bytes:
    """The committed image with ``spec`` in its CONFIG table, for a guest of ``ram_size``
    bytes; the working set must lie below q35's PCI hole."""
    pages = spec.pages(min(ram_size, LOW_RAM_LIMIT))
    if spec.working_set and spec.working_set // 4096 > pages:
        raise ValueError(f"working set {spec.working_set >> 20} MiB does not fit below QEMU q35's "
                         f"PCI hole for {ram_size >> 20} MiB of RAM")
    keys = [0] * 16
    keys[2] = WORKLOADS.index(spec.name)
    keys[3] = spec.seed
    keys[4] = pages * 4096
    keys[5] = spec.ns_per_batch()
    keys[6] = PATTERNS.index(spec.pattern)
    keys[7] = 0
    keys[8] = spec.batch_pages
    keys[9] = spec.ws_offset
    img = bytearray(IMAGE.read_bytes())
    struct.pack_into("<16Q", img, CONFIG - LOAD, *keys)
    return bytes(img)


def parse_progress(data: bytes) -> tuple[list[int], bytes]:
    """The iteration counts in a debug-console byte stream, and the incomplete tail."""
    out: list[int] = []
    pos = 0
    while len(data) - pos >= PROGRESS_RECORD:
        if data[pos] != 0xA5:  # resynchronise on the marker (a record cut by a reconnect)
            pos += 1
            continue
        out.append(struct.unpack_from("<Q", data, pos + 1)[0])
        pos += PROGRESS_RECORD
    return out, data[pos:]


if __name__ == "__main__":
    built = rebuild(write=True)
    print(f"wrote {IMAGE} ({len(built)} bytes)")
