"""Benchmark: qcow2 sequential I/O and vmstate streaming, against qemu-io in the same run.

    python bench/bench_qcow2.py [--size-mib 1024] [--dir /tmp]

On this workplace's VMs a first write into never-used memory (a new page-cache
page) can cost ~9 us/page, so absolute MB/s vary run to run; compare the
ratios, which are measured in the same run.  ``--dir /dev/shm`` takes the disk
out of the picture.

Prints MB/s for snaplab and for qemu-io (``write``/``read`` of the same sizes on
a fresh image), and their ratios.  Goals (issue: block layer): vmstate
streaming >= 1 GB/s; guest-data writes within 2x of qemu-io.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time

import numpy as np

from emulator.block import Qcow2Image

CHUNK = 64 << 20


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    os.sync()  # start every phase with no dirty pages: the kernel throttles writers past ~1 GB dirty
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ours(path: str, size: int, payload: memoryview) -> dict[str, float]:
    img = Qcow2Image.create(path, size)
    out = {}

    def write_guest() -> None:
        for pos in range(0, size, CHUNK):
            img.write(pos, payload[: min(CHUNK, size - pos)])

    def read_guest() -> None:
        buf = bytearray(CHUNK)
        for pos in range(0, size, CHUNK):
            img.readinto(pos, memoryview(buf)[: min(CHUNK, size - pos)])

    def write_vmstate() -> None:
        img.save_vmstate(0, big)

    def read_vmstate() -> None:
        img.load_vmstate(0, dest)

    out["guest write"] = _timed(write_guest)
    out["guest read"] = _timed(read_guest)
    # The vmstate phases stream from/to a RAM-sized buffer, as a snapshot does.
    big = np.empty(size, dtype=np.uint8)
    for pos in range(0, size, CHUNK):
        n = min(CHUNK, size - pos)
        big[pos:pos + n] = np.frombuffer(payload[:n], dtype=np.uint8)
    dest = bytearray(size)
    out["vmstate write"] = _timed(write_vmstate)
    out["vmstate read"] = _timed(read_vmstate)
    assert bytes(dest[:4096]) == bytes(payload[:4096])
    img.close()
    return out


def qemu_io(path: str, size: int) -> dict[str, float]:
    exe = shutil.which("qemu-io")
    if exe is None or shutil.which("qemu-img") is None:
        return {}
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    res = {}
    for name, cmd in (("guest write", f"write -P 0x5a 0 {size}"), ("guest read", f"read 0 {size}")):
        os.sync()
        t0 = time.perf_counter()
        p = subprocess.run([exe, "-f", "qcow2", "-c", cmd, path], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        m = re.search(r"ops; ([0-9:.]+) sec", p.stdout)
        res[name] = wall
        if m:
            parts = [float(x) for x in m.group(1).split(":")]
            res[name] = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    return res


def raw_pwrite(path: str, size: int, payload: memoryview) -> float:
    """The host's own limit: plain pwrite of the same bytes into a new file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        def go() -> None:
            for pos in range(0, size, CHUNK):
                os.pwrite(fd, payload[: min(CHUNK, size - pos)], pos)
        return _timed(go)
    finally:
        os.close(fd)


def _prepare_host() -> None:
    """Start every side alike: warm host memory once, give clean page cache back (root)."""
    from bench_snapshot import drop_caches, warm_memory

    print(f"warming host memory: {warm_memory(6 << 30):.1f} s")
    drop_caches()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    if args.size_mib < 1:
        ap.error(f"--size-mib must be at least 1, not {args.size_mib}")
    if args.dir is not None and not os.path.isdir(args.dir):
        ap.error(f"--dir {args.dir}: no such directory")
    size = args.size_mib << 20
    payload = memoryview(np.random.default_rng(0).integers(0, 256, CHUNK, dtype=np.uint8).tobytes())
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _prepare_host()
    from bench_snapshot import drop_caches

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        a = ours(os.path.join(d, "ours.qcow2"), size, payload)
        os.remove(os.path.join(d, "ours.qcow2"))
        drop_caches()
        q = qemu_io(os.path.join(d, "qemu.qcow2"), size)
        os.remove(os.path.join(d, "qemu.qcow2"))
        host = raw_pwrite(os.path.join(d, "raw.bin"), size, payload)
    mb = size / 1e6
    print(f"{'operation':<16}{'snaplab MB/s':>14}{'qemu-io MB/s':>14}{'vs qemu-io':>12}{'vs host':>9}")
    for k, t in a.items():
        qt = q.get(k)
        ratio = f"{qt / t:12.2f}" if qt else "           -"
        print(f"{k:<16}{mb / t:14.0f}{(mb / qt if qt else float('nan')):14.0f}{ratio}{host / t:9.2f}")
    print(f"{'host pwrite':<16}{mb / host:14.0f}   (plain pwrite of the same bytes: the page-cache limit)")
    print("vs host = snaplab speed / plain pwrite speed measured in this run.")
    print("ratio = snaplab speed / qemu-io speed (>1: snaplab faster); qemu-io has no vmstate command.")
    print("Both sides write into the page cache; neither timing includes the final fdatasync.")


if __name__ == "__main__":
    main()
