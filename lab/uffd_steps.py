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


def write_fault_loop(granule: int, size: int = 64 << 20, writes: int = 2000, seed: int = 1,
                     batch: int = 0, period_s: float = 0.0) -> dict[str, Any]:
    """Write-protect ``size`` bytes, then let a writer thread store one byte at ``writes`` random
    pages while this thread serves its faults: for each, copy the ``granule`` around the page
    (what a snapshot must keep), then release that granule's protection, which wakes the writer.
    ``batch`` and ``period_s``: the writer is paced as the dirty guest is, ``batch`` stores then a
    sleep until the batch's period is over (a batch that overruns it starts the next at once).

    Returns the arm time, the faults, the bytes copied (and in MiB), the writer's time, each
    fault's service time (from reading the fault to releasing it) and, paced, each batch's time
    and the stall: the time the batches ran past their period (what a paced guest loses)."""
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
        batches: list[float] = []
        step = max(1, batch or len(targets))

        def writer() -> None:
            # Timed in its own thread: the server notices the end only at its next poll
            # timeout, which once added up to 20 ms to a "writer" time measured from outside.
            t0 = time.perf_counter()
            for i in range(0, len(targets), step):
                tb = time.perf_counter()
                for a in targets[i:i + step]:
                    ctypes.memset(a, 2, 1)  # a foreign call: the GIL is released while it blocks
                batches.append(time.perf_counter() - tb)
                if period_s:
                    time.sleep(max(0.0, period_s - batches[-1]))
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
            "service_us": [x * 1e6 for x in service], "batch_ms": [x * 1e3 for x in batches],
            "stall_ms": sum(max(0.0, x - period_s) for x in batches) * 1e3 if period_s else 0.0}


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


OLD, NEW, FILLED = 0x11, 0x22, 0x5A  # the bytes of the two demonstrations below
COPY_ORDERS = ("copy, then release", "release, then copy")


def _serve_one(u: UserFaultFD, timeout_s: float = 5.0) -> Any:
    """The next fault message on ``u`` (waits for it in poll(), at most ``timeout_s``)."""
    poller = select.poll()
    poller.register(u.fd, select.POLLIN)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if poller.poll(50):
            got = u.read_faults(1)
            if got:
                return got[0]
    raise TimeoutError("no fault came")


COPY_AT = 5 * PAGE + 123  # the byte the writer stores: inside the sixth page of the range


def _one_write_fault(u: UserFaultFD, s: Scratch, order: str, wait_for_writer: bool) -> tuple[Any, int]:
    """One write fault on the registered range ``s``, all ``OLD``: protect it, start a writer that
    stores ``NEW`` at :data:`COPY_AT`, serve its fault in ``order`` (the copy kept as "the
    snapshot"); ``wait_for_writer``: after a release-first, join the writer before copying (its
    store has certainly landed), else let the two race.  Returns the fault and the snapshot's byte."""
    snapshot = (ctypes.c_char * PAGE)()
    ctypes.memset(s.addr, OLD, HUGE)
    u.writeprotect(s.addr, HUGE, True)
    writer = threading.Thread(target=ctypes.memset, args=(s.addr + COPY_AT, NEW, 1), daemon=True)
    writer.start()  # (a foreign call: it blocks in the kernel with the GIL released)
    f = _serve_one(u)
    page = f.address & ~(PAGE - 1)
    if order == COPY_ORDERS[0]:
        ctypes.memmove(snapshot, page, PAGE)
        u.writeprotect(s.addr, HUGE, False)
    else:
        u.writeprotect(s.addr, HUGE, False)
        if wait_for_writer:
            writer.join()
        ctypes.memmove(snapshot, page, PAGE)  # (without the join, the writer may or may not have stored)
    writer.join()
    return f, snapshot.raw[COPY_AT % PAGE]


def _fault_range() -> tuple[Scratch, UserFaultFD]:
    """A 2 MiB scratch range registered for write protection (for :func:`_one_write_fault`)."""
    s = Scratch(HUGE, populate=False)
    u = UserFaultFD(UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    u.register(s.addr, HUGE, UFFDIO_REGISTER_MODE_WP)
    return s, u


def copy_order(order: str) -> dict[str, Any]:
    """Why a snapshot's handler copies a page *before* it releases it: a page holding ``OLD`` is
    write-protected, a writer stores ``NEW`` into it and blocks; this thread serves the fault in
    ``order`` (:data:`COPY_ORDERS`) and keeps its copy as "the snapshot".  Releasing first lets the
    writer's store go through before the copy is taken; to show that case every time rather than
    when the race happens to go that way, the handler then waits for the writer before it copies.
    Returns the fault message's flags, what the snapshot and the page hold, and whether the
    snapshot kept the stop instant's byte."""
    if order not in COPY_ORDERS:
        raise ValueError(f"order: {order!r} is not one of {', '.join(COPY_ORDERS)}")
    s, u = _fault_range()
    try:
        f, kept = _one_write_fault(u, s, order, wait_for_writer=True)
        now = ctypes.string_at(s.addr + COPY_AT, 1)[0]
        u.unregister(s.addr, HUGE)
    finally:
        u.close()
        s.close()
    return {"order": order, "fault_write": f.write, "fault_wp": f.wp, "fault_page": (f.address - s.addr) // PAGE,
            "snapshot_byte": kept, "page_byte_now": now, "snapshot_kept_the_stop_instant": kept == OLD}


def copy_order_trials(order: str, trials: int = 300) -> dict[str, Any]:
    """:func:`copy_order`'s fault ``trials`` times over, with no wait for the writer in either
    order: the writer's wake-up races the handler's copy.  Returns how many snapshots lost the
    stop instant's byte (copy first: none, ever; release first: as many as the race gave the
    writer)."""
    if order not in COPY_ORDERS:
        raise ValueError(f"order: {order!r} is not one of {', '.join(COPY_ORDERS)}")
    s, u = _fault_range()
    try:
        wrong = sum(_one_write_fault(u, s, order, wait_for_writer=False)[1] != OLD for _ in range(trials))
        u.unregister(s.addr, HUGE)
    finally:
        u.close()
        s.close()
    return {"order": order, "trials": trials, "snapshots_wrong": wrong}


FILLS = ("UFFDIO_COPY", "UFFDIO_ZEROPAGE")
_LIBC = ctypes.CDLL(None, use_errno=True)  # (mincore)


def _resident_pages(addr: int, size: int) -> int:
    """Pages of [addr, addr + size) with a page-table entry now (mincore: one byte per page)."""
    vec = (ctypes.c_ubyte * (size // PAGE))()
    if _LIBC.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return int(np.count_nonzero(np.frombuffer(bytes(vec), dtype=np.uint8) & 1))


def missing_fault(fill: str) -> dict[str, Any]:
    """A first read of a never-touched page in a range registered in missing mode: the reader
    blocks in the kernel, this thread reads the fault message and fills that one page (``fill``:
    UFFDIO_COPY from a buffer of ``FILLED`` bytes, or UFFDIO_ZEROPAGE), which wakes the reader.
    Returns the message's flags and page, what the reader read, how long it waited, how long the
    fill's ioctl took (from the message in hand to the ioctl's return), and how many pages of the
    2 MiB range have a page-table entry before and after (``mincore``: only the filled one)."""
    if fill not in FILLS:
        raise ValueError(f"fill: {fill!r} is not one of {', '.join(FILLS)}")
    s = Scratch(HUGE, populate=False)
    u = UserFaultFD(0)
    src = (ctypes.c_char * PAGE)(*([bytes([FILLED])] * PAGE))
    got = (ctypes.c_char * 1)()
    waited = [0.0]
    off = 9 * PAGE + 7

    def reader() -> None:
        t0 = time.perf_counter()
        ctypes.memmove(got, s.addr + off, 1)  # blocks in the kernel until the page is filled
        waited[0] = time.perf_counter() - t0

    try:
        u.register(s.addr, HUGE, UFFDIO_REGISTER_MODE_MISSING)
        before = _resident_pages(s.addr, HUGE)
        th = threading.Thread(target=reader, daemon=True)
        th.start()
        f = _serve_one(u)
        t_msg = time.perf_counter()
        page = f.address & ~(PAGE - 1)
        n = u.copy(page, ctypes.addressof(src), PAGE) if fill == FILLS[0] else u.zeropage(page, PAGE)
        handler = time.perf_counter() - t_msg
        th.join(5.0)
        after = _resident_pages(s.addr, HUGE)
        u.unregister(s.addr, HUGE)
    finally:
        u.close()
        s.close()
    return {"fill": fill, "fault_write": f.write, "fault_wp": f.wp, "fault_page": (f.address - s.addr) // PAGE,
            "filled_bytes": n, "reader_read": got.raw[0], "reader_waited_ms": waited[0] * 1e3,
            "fill_ioctl_ms": handler * 1e3,
            "pages_with_an_entry_before": before, "pages_with_an_entry_after": after}
