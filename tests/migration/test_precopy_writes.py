"""Pre-copy's round writes: several in flight, every run once, a failure raised on the round's thread."""

from __future__ import annotations

import threading

import pytest

from emulator.errors import BlockIOError
from emulator.migration.precopy import PAGE, WRITE_THREADS, _write_runs


def _ram(pages: int) -> memoryview:
    return memoryview(bytes((i % 251) for i in range(pages * PAGE)))


def test_every_run_is_written_once_at_its_offset_from_several_threads_at_once() -> None:
    mv = _ram(200)
    runs = [(a, a + 1 + a % 3, 10_000 * PAGE + a * PAGE) for a in range(0, 190, 4)]
    got: dict[int, bytes] = {}
    calls: dict[int, int] = {}
    lock = threading.Lock()
    me = threading.get_ident()
    together = threading.Barrier(WRITE_THREADS)  # broken (an error) unless all write at once

    def write(off: int, data: memoryview) -> None:
        t = threading.get_ident()
        with lock:
            assert off not in got
            got[off] = bytes(data)
            calls[t] = calls.get(t, 0) + 1
            first_of_part = calls[t] == (2 if t == me else 1)  # (this thread's first write is the one before the others start)
        if first_of_part:
            together.wait(timeout=10)

    _write_runs(write, mv, runs)
    assert got == {h: bytes(mv[a * PAGE:b * PAGE]) for a, b, h in runs}
    assert len(calls) == WRITE_THREADS


def test_a_file_that_takes_one_write_at_a_time_gets_them_in_turn() -> None:
    mv = _ram(200)
    runs = [(a, a + 1, a * PAGE) for a in range(100)]
    order: list[int] = []
    _write_runs(lambda off, data: order.append(off), mv, runs, parallel=False)
    assert order == [h for _, _, h in runs]


def test_a_failed_write_is_raised_after_every_thread_stopped() -> None:
    mv = _ram(200)
    runs = [(a, a + 1, a * PAGE) for a in range(100)]
    written: list[int] = []
    lock = threading.Lock()

    def write(off: int, data: memoryview) -> None:
        if off == 5 * PAGE:
            raise BlockIOError(f"Could not write at offset {off}: No space left on device")
        threading.Event().wait(0.002)  # (a write takes a while: the others are still busy when it fails)
        with lock:
            written.append(off)

    with pytest.raises(BlockIOError, match="No space left on device"):
        _write_runs(write, mv, runs)
    n = len(written)
    threading.Event().wait(0.05)
    assert len(written) == n  # every thread had stopped when it raised
    assert n < 50  # they stopped at their next run, not after all 99 (each had ~25)
