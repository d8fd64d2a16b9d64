"""Pre-copy's round writes: several in flight, every run once, a failure raised on the round's thread."""

from __future__ import annotations

import threading

import pytest

from emulator.errors import BlockIOError
from emulator.migration.precopy import PAGE, WRITE_THREADS, _write_runs


def _ram(pages: int) -> memoryview:
    return memoryview(bytes((i % 251) for i in range(pages * PAGE)))


def test_every_run_is_written_once_at_its_offset_from_several_threads() -> None:
    mv = _ram(200)
    runs = [(a, a + 1 + a % 3, 10_000 * PAGE + a * PAGE) for a in range(0, 190, 4)]
    got: dict[int, bytes] = {}
    threads: set[int] = set()
    lock = threading.Lock()

    def write(off: int, data: memoryview) -> None:
        with lock:
            assert off not in got
            got[off] = bytes(data)
            threads.add(threading.get_ident())

    _write_runs(write, mv, runs)
    assert got == {h: bytes(mv[a * PAGE:b * PAGE]) for a, b, h in runs}
    assert 1 < len(threads) <= WRITE_THREADS  # (48 runs: all the threads had work)


def test_a_failed_write_is_raised_after_every_thread_stopped() -> None:
    mv = _ram(200)
    runs = [(a, a + 1, a * PAGE) for a in range(100)]
    written: list[int] = []
    lock = threading.Lock()

    def write(off: int, data: memoryview) -> None:
        if off == 37 * PAGE:
            raise BlockIOError(f"Could not write at offset {off}: No space left on device")
        with lock:
            written.append(off)

    with pytest.raises(BlockIOError, match="No space left on device"):
        _write_runs(write, mv, runs)
    n = len(written)
    threading.Event().wait(0.05)
    assert len(written) == n  # nothing writes on after the round failed
    assert 37 * PAGE not in written
