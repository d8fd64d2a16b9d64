"""Benchmark: what a copy-on-write fault's copy costs beside the rest of a save.

    python bench/bench_copy_contention.py [--copies N] [--dir DIR]

A copy-on-write save (emulator/migration/cow.py) holds the guest's first write to a 2 MiB chunk
until the fault handler has copied that chunk; the guest's lost time is mostly the sum of those
copies.  The copy runs while the saver scans RAM for zero pages and the writer threads write
the VM state with O_DIRECT, and all of them share the host's memory bandwidth.  This measures
one 2 MiB copy (``ctypes.memmove`` between warm huge-page-backed buffers, as the fault handler's)
alone; alone from and into cold memory (the caches evicted before each copy, the destination one
of 64 buffers, as a save's fault buffers: the floor of a fault's copy on a quiet host); beside one thread doing the saver's work on the dirty guest's working set (each 16 MiB
span scanned for zero pages, every page stamped, then gathered into a buffer), and beside
SAVE_WRITERS threads writing 32 MiB O_DIRECT requests into DIR (the writers' requests).
Each copy is followed by a 0.5 ms pause, as faults come one at a time.  Medians and the
10-90% range; the last line printed is one JSON object:
{"alone_ms": x, "alone_cold_ms": c, "beside_saver_ms": y, "beside_writers_ms": z, ...}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np

from emulator.memory import map_populated
from emulator.migration.cow import CHUNK
from emulator.migration.vmstate import PAGE, SAVE_WRITERS, pages_nonzero

SCAN_BYTES = 1 << 30
SPAN_BYTES = 16 << 20
WRITE_BYTES = 32 << 20
EVICT_BYTES = 64 << 20  # written before each cold copy: more than this host's caches


def copies(n: int, src: int, dst: int, buffers: int = 4, evict: np.ndarray | None = None) -> np.ndarray:
    """``n`` 2 MiB copies from successive chunks at ``src`` into ``buffers`` buffers at ``dst``
    (ms), each followed by a 0.5 ms pause; with ``evict``, each instead preceded by writing it
    through (untimed), so that neither side of the copy is in a cache."""
    out = np.empty(n)
    for i in range(n):
        if evict is not None:
            evict += 1
        t0 = time.perf_counter()
        ctypes.memmove(dst + (i % buffers) * CHUNK, src + (i % 256) * CHUNK, CHUNK)
        out[i] = (time.perf_counter() - t0) * 1e3
        if evict is None:
            time.sleep(0.0005)
    return out


def beside(work: Callable[[threading.Event], None], threads: int, measure: Callable[[], np.ndarray]) -> np.ndarray:
    """``measure()`` while ``threads`` threads run ``work`` until told to stop."""
    stop = threading.Event()
    ts = [threading.Thread(target=work, args=(stop,), daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    time.sleep(0.2)  # (the competitors under way)
    try:
        return measure()
    finally:
        stop.set()
        for t in ts:
            t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=400)
    ap.add_argument("--dir", default="/var/tmp", help="where the O_DIRECT writers write (a file removed after)")
    a = ap.parse_args()
    src, dst, cold_dst = map_populated(256 * CHUNK), map_populated(4 * CHUNK), map_populated(64 * CHUNK)
    ctypes.memset(src, 1, 256 * CHUNK)
    scan_buf = map_populated(SCAN_BYTES)
    # the dirty guest's working set: every page written, its first word non-zero (its stamp)
    scan = np.frombuffer(memoryview((ctypes.c_char * SCAN_BYTES).from_address(scan_buf)).cast("B"), dtype=np.uint64)
    rows = scan.reshape(-1, PAGE // 8)
    rows[:, 0] = np.arange(1, len(rows) + 1, dtype=np.uint64)
    gather = map_populated(SPAN_BYTES)
    wbuf = map_populated(WRITE_BYTES)

    def saver(stop: threading.Event) -> None:
        """The saver on that working set: each 16 MiB span scanned for zero pages (a page whose
        first word is non-zero is not read further), then gathered into a buffer."""
        per = SPAN_BYTES // PAGE
        while not stop.is_set():
            for i in range(0, len(rows), per):
                pages_nonzero(rows[i:i + per])
                ctypes.memmove(gather, scan_buf + i * PAGE, SPAN_BYTES)

    with tempfile.NamedTemporaryFile(prefix="snaplab-contention-", dir=a.dir, delete=False) as f:
        fd_path = f.name

    def writer(stop: threading.Event) -> None:
        fd = os.open(fd_path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600)
        data = memoryview((ctypes.c_char * WRITE_BYTES).from_address(wbuf)).cast("B")
        off = 0
        try:
            while not stop.is_set():
                os.pwrite(fd, data, off)
                off = (off + WRITE_BYTES) % SCAN_BYTES
        finally:
            os.close(fd)

    def measure() -> np.ndarray:
        return copies(a.copies, src, dst)

    try:
        evict = np.ones(EVICT_BYTES, dtype=np.uint8)
        res = {"alone": measure(), "alone_cold": copies(a.copies, src, cold_dst, 64, evict), "beside_saver": beside(saver, 1, measure),
               "beside_writers": beside(writer, SAVE_WRITERS, measure)}
    finally:
        if os.path.exists(fd_path):
            os.unlink(fd_path)
    summary: dict[str, float | int] = {"copies": a.copies, "writers": SAVE_WRITERS}
    for k, v in res.items():
        lo, med, hi = np.percentile(v, [10, 50, 90])
        print(f"2 MiB copy {k.replace('_', ' '):15s} median {med:.3f} ms (10-90% {lo:.3f}-{hi:.3f})")
        summary[f"{k}_ms"] = round(float(med), 4)
    print(f"beside the saver {summary['beside_saver_ms'] / summary['alone_ms']:.2f}x, beside the writers "
          f"{summary['beside_writers_ms'] / summary['alone_ms']:.2f}x the copy alone")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
