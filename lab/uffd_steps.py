"""userfaultfd one step at a time, for teaching: register, write-protect, serve write faults,
fill missing pages (UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_MOVE), with each step timed.

The steps run on a scratch anonymous mapping made like guest RAM (private, anonymous, 2 MiB
aligned, ``MADV_HUGEPAGE``), through ``emulator.uffd`` (the ioctls the snapshot engines use).
The writer that takes the faults is a thread calling ``ctypes.memset``: a foreign call that
releases the GIL, as the vCPU's ``emu_start`` does; a Python thread that wrote protected memory
while holding the GIL would deadlock the handler (docs/reference/unicorn-notes.md).
"""

from __future__ import annotations

import ctypes
import mmap
import select
import threading
import time
from typing import Any

import numpy as np

from emulator.errors import UffdUnavailable
from emulator.uffd import (
    UFFD_FEATURE_EVENT_REMAP,
    UFFD_FEATURE_MOVE,
    UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_WP_ASYNC,
    UFFD_FEATURE_WP_UNPOPULATED,
    UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_REGISTER_MODE_WP,
    UserFaultFD,
)

PAGE = 4096
HUGE = 2 << 20
FEATURE_NAMES = {UFFD_FEATURE_PAGEFAULT_FLAG_WP: "PAGEFAULT_FLAG_WP", UFFD_FEATURE_EVENT_REMAP: "EVENT_REMAP",
                 UFFD_FEATURE_WP_UNPOPULATED: "WP_UNPOPULATED", UFFD_FEATURE_WP_ASYNC: "WP_ASYNC",
                 UFFD_FEATURE_MOVE: "MOVE"}
IOCTL_NAMES = {0: "UFFDIO_REGISTER", 1: "UFFDIO_UNREGISTER", 2: "UFFDIO_WAKE", 3: "UFFDIO_COPY",
               4: "UFFDIO_ZEROPAGE", 5: "UFFDIO_MOVE", 6: "UFFDIO_WRITEPROTECT", 7: "UFFDIO_CONTINUE",
               8: "UFFDIO_POISON", 63: "UFFDIO_API"}


class Scratch:
    """An anonymous private mapping, 2 MiB aligned, advised for huge pages (like guest RAM)."""

    def __init__(self, size: int, populate: bool = True, huge: bool = True) -> None:
        self.mm = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        self.skip = -base % HUGE
        self.addr, self.size = base + self.skip, size
        self.mm.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE, self.skip, size)
        if populate:
            ctypes.memset(self.addr, 1, size)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # a ctypes view still alive; the mapping goes with the process
            pass


def kernel_offer() -> dict[str, Any]:
    """What this kernel's userfaultfd offers: the features asked for and granted, and the
    ioctls a range registered in both modes allows."""
    wanted = sum(FEATURE_NAMES)
    try:
        u = UserFaultFD(UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    except UffdUnavailable as err:
        return {"available": False, "why": str(err)}
    u.close()
    granted = []
    for bit, name in FEATURE_NAMES.items():
        try:
            UserFaultFD(bit).close()
            granted.append(name)
        except UffdUnavailable:
            pass
    s = Scratch(HUGE)
    u = UserFaultFD(UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    try:
        ioctls = u.register(s.addr, s.size, UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MISSING)
        u.unregister(s.addr, s.size)
    finally:
        u.close()
        s.close()
    del wanted
    return {"available": True, "features granted": granted,
            "ioctls on a registered range": [n for b, n in IOCTL_NAMES.items() if ioctls >> b & 1]}


def write_fault_loop(granule: int, size: int = 64 << 20, writes: int = 2000, seed: int = 1) -> dict[str, Any]:
    """Write-protect ``size`` bytes, then let a writer thread store one byte at ``writes`` random
    pages while this thread serves its faults: for each, copy the ``granule`` around the page
    (what a snapshot must keep), then release that granule's protection, which wakes the writer.

    Returns the arm time, the faults, the bytes copied (and in MiB), the writer's time and each
    fault's service time (from reading the fault to releasing it)."""
    s = Scratch(size)
    u = UserFaultFD(UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    keep = (ctypes.c_char * granule)()
    rng = np.random.default_rng(seed)
    targets = [s.addr + int(p) * PAGE for p in rng.integers(0, size // PAGE, writes)]
    service: list[float] = []
    done = threading.Event()
    try:
        t = time.perf_counter()
        u.register(s.addr, size, UFFDIO_REGISTER_MODE_WP)
        register_s = time.perf_counter() - t
        t = time.perf_counter()
        u.writeprotect(s.addr, size, True)
        arm_s = time.perf_counter() - t

        elapsed = [0.0]

        def writer() -> None:
            # Timed in its own thread: the server notices the end only at its next poll
            # timeout, which once added up to 20 ms to a "writer" time measured from outside.
            t0 = time.perf_counter()
            for a in targets:
                ctypes.memset(a, 2, 1)  # a foreign call: the GIL is released while it blocks
            elapsed[0] = time.perf_counter() - t0
            done.set()

        th = threading.Thread(target=writer, daemon=True)
        th.start()
        poller = select.poll()
        poller.register(u.fd, select.POLLIN)
        while not done.is_set():
            if not poller.poll(5):
                continue
            for f in u.read_faults():
                t0 = time.perf_counter()
                base = s.addr + (f.address - s.addr) // granule * granule
                ctypes.memmove(keep, base, granule)  # the old contents, still unchanged
                u.writeprotect(base, granule, False)  # release: the writer retries its store
                service.append(time.perf_counter() - t0)
        th.join()
        writer_s = elapsed[0]
        u.unregister(s.addr, size)
    finally:
        u.close()
        s.close()
    return {"granule": granule, "register_ms": register_s * 1e3, "arm_ms": arm_s * 1e3, "writes": writes,
            "faults": len(service), "bytes_copied": len(service) * granule,
            "MiB_copied": len(service) * granule / 2**20, "writer_ms": writer_s * 1e3,
            "service_us": [x * 1e6 for x in service]}


def range_holds(addr: int, size: int, byte: int) -> bool:
    """Whether every byte of [addr, addr + size) equals ``byte`` (one bulk numpy comparison)."""
    return bool(np.all(np.frombuffer(memoryview((ctypes.c_char * size).from_address(addr)).cast("B"), dtype=np.uint8) == byte))


FILL_CASES = [(op, step, True) for op in ("UFFDIO_COPY", "UFFDIO_ZEROPAGE", "UFFDIO_MOVE") for step in (PAGE, HUGE)] + \
    [("UFFDIO_MOVE", PAGE, False)]
"""(ioctl, step, source on huge pages): every ioctl in both steps from a huge-page source, and
UFFDIO_MOVE in 4 KiB steps from a source mapped with 4 KiB pages (``MADV_NOHUGEPAGE``), which
tells apart the cost of splitting the source's huge pages."""


def fill_costs(size: int = 32 << 20, reps: int = 3) -> list[dict[str, Any]]:
    """Fill a missing-registered range with UFFDIO_COPY, UFFDIO_ZEROPAGE and UFFDIO_MOVE in
    4 KiB and 2 MiB steps (:data:`FILL_CASES`); one row per (case, repetition) with the time per
    MiB, and whether every byte of the filled range is right (``contents_right``)."""
    rows: list[dict[str, Any]] = []
    for rep in range(reps):
        for op, step, src_huge in FILL_CASES:
            dst = Scratch(size, populate=False)
            src = Scratch(size, huge=src_huge) if op != "UFFDIO_ZEROPAGE" else None
            try:
                u = UserFaultFD(UFFD_FEATURE_MOVE if op == "UFFDIO_MOVE" else 0)
            except UffdUnavailable:
                dst.close()
                continue
            try:
                u.register(dst.addr, size, UFFDIO_REGISTER_MODE_MISSING)
                t = time.perf_counter()
                done, err = 0, 0
                for off in range(0, size, step):
                    if op == "UFFDIO_COPY" and src is not None:
                        n = u.copy(dst.addr + off, src.addr + off, step)
                    elif op == "UFFDIO_MOVE" and src is not None:
                        n = u.move(dst.addr + off, src.addr + off, step)
                    else:
                        n = u.zeropage(dst.addr + off, step)
                    done, err = (done + n, err) if n > 0 else (done, n)
                took = time.perf_counter() - t
                u.unregister(dst.addr, size)  # first: a page left missing now reads as zero, not blocks
                ok = range_holds(dst.addr, size, 0 if op == "UFFDIO_ZEROPAGE" else 1)
            finally:
                u.close()
                dst.close()
                if src is not None:
                    src.close()
            label = "4 KiB" if step == PAGE else "2 MiB"
            rows.append({"ioctl": op, "step": label if src_huge else label + ", source in 4 KiB pages", "rep": rep,
                         "calls": size // step, "bytes_filled": done, "error": err, "contents_right": ok,
                         "ms_per_MiB": took * 1e3 / (size >> 20)})
    return rows
