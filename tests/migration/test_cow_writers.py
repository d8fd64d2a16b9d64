"""A copy-on-write save holds a guest write for a copy in memory, never for a disk or a pipe.

The saver claims a span of chunks, gathers their pages into a buffer and lets them go; writer
threads write the filled buffers.  When every buffer is being written, the saver waits for one
before it claims its next span: a guest write then goes through (its fault copies the chunk),
where a saver waiting with chunks claimed would hold it until the disk is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from emulator.block import Qcow2Image
from emulator.memory import GuestRAM
from emulator.migration import cow
from emulator.migration.cow import (
    CHUNK,
    COPYING,
    GATHER,
    SAVE_WRITERS,
    SAVED,
    CowSave,
    UffdProtector,
)
from emulator.migration.vmstate import PAGE
from tests.migration.test_cow_zero_chunks import _Records, _run_bounded, _stream_pages, _wp

MIB = 1 << 20


class _HeldRecords(_Records):
    """A stream whose writes wait until ``go`` is set (a slow pipe)."""

    def __init__(self, go: threading.Event) -> None:
        super().__init__()
        self.go = go

    def pages(self, first_page: int, data: memoryview) -> None:
        assert self.go.wait(60)
        super().pages(first_page, data)


class _HookedOut:
    """A pending snapshot's VM-state output that calls ``before_bulk()`` before each bulk write
    (to hold it, as a slow disk would, or to see several under way at once)."""

    def __init__(self, out: Any, before_bulk: Callable[[], None]) -> None:
        self.out, self.before_bulk, self.img = out, before_bulk, out.img

    def write(self, pos: int, data: bytes | memoryview) -> None:
        self.out.write(pos, data)

    def write_bulk(self, pos: int, data: memoryview) -> None:
        self.before_bulk()
        self.out.write_bulk(pos, data)


@pytest.mark.parametrize("to", ["qcow2", "stream"])
def test_a_guest_write_does_not_wait_for_the_disk(to: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ram = GuestRAM(5 * GATHER)  # every page non-zero: more than all the gather buffers hold
    wp = _wp(ram)
    img = Qcow2Image.in_memory(8 * MIB)
    go = threading.Event()
    try:
        view = np.ctypeslib.as_array((ctypes.c_uint8 * ram.size).from_address(ram.addr))
        view[:] = np.frombuffer(np.random.default_rng(5).bytes(ram.size), dtype=np.uint8)
        view[::PAGE] |= 1  # (no page is zero)
        before = view.copy()
        claimed_at_wait: list[list[int]] = []
        stuck = threading.Event()
        next_buffer = cow._Gatherer._next_buffer

        def watched(self: Any) -> np.ndarray:
            claimed_at_wait.append(np.flatnonzero(self.save.state == COPYING).tolist())
            if self._bufs.empty():
                stuck.set()  # every buffer is with the (held) writers: the saver waits here
            return next_buffer(self)

        monkeypatch.setattr(cow._Gatherer, "_next_buffer", watched)
        protector = UffdProtector(wp)
        sink = _HeldRecords(go) if to == "stream" else None
        saver = CowSave(protector, ram, None, None, "m", [], sink=sink)
        saver.scan_ahead = False
        saver.prepare()
        saver.arm()
        if sink is None:
            saver.attach(img, img.snapshot_prepare(), [])

            def held() -> None:  # a slow disk: every bulk write waits for go
                assert go.wait(60)

            saver.out = _HookedOut(saver.out, held)  # type: ignore[assignment]
        out: list[BaseException | int | None] = []
        runner = threading.Thread(target=lambda: out.append(_run_bounded(saver)), daemon=True)
        runner.start()
        try:
            assert stuck.wait(60), "the saver never ran out of gather buffers"
            with saver.lock:
                nxt = int(np.flatnonzero(saver.state != SAVED)[0])  # the first chunk not saved yet
            # the guest writes it while the disk still holds every buffer
            guest = threading.Thread(target=lambda: ctypes.memset(ram.addr + nxt * CHUNK + 7, 0x5A, 1), daemon=True)
            guest.start()
            guest.join(10)
            assert not guest.is_alive(), f"a guest write to chunk {nxt} waited for the disk"
            # its fault copied the chunk (the handler counts it just after waking the guest)
            deadline = time.monotonic() + 10
            while saver.stats.fault_chunks < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert saver.stats.fault_chunks == 1
        finally:
            go.set()
            runner.join(60)
            protector.disarm()
        assert not runner.is_alive() and isinstance(out[0], int), out
        assert claimed_at_wait and all(c == [] for c in claimed_at_wait), claimed_at_wait
        want = before.reshape(-1, PAGE)
        if sink is None:
            saver.out = saver.out.out  # type: ignore[union-attr]
            got = _stream_pages(img, saver, out[0], ram.size)
        else:
            got = np.zeros_like(want)
            for first, data in sink.records:
                got[first:first + len(data) // PAGE] = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE)
        assert np.array_equal(got, want)  # the stop instant's bytes, the guest's write not in them
        assert view[nxt * CHUNK + 7] == 0x5A
    finally:
        go.set()
        img.close()
        wp.close()
        ram.close()


def test_a_qcow2_save_keeps_two_writes_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writes at once, as the blocking save's writers (a disk serves two faster than one)."""
    ram = GuestRAM(4 * GATHER)
    wp = _wp(ram)
    img = Qcow2Image.in_memory(8 * MIB)
    both = threading.Barrier(SAVE_WRITERS, timeout=30)
    met = threading.Event()
    try:
        view = np.ctypeslib.as_array((ctypes.c_uint8 * ram.size).from_address(ram.addr))
        view[::PAGE] = 7
        protector = UffdProtector(wp)
        saver = CowSave(protector, ram, None, None, "m", [])
        saver.scan_ahead = False
        saver.prepare()
        saver.arm()
        saver.attach(img, img.snapshot_prepare(), [])
        inner = saver.out

        def meet() -> None:
            if not met.is_set():
                both.wait()  # returns only when SAVE_WRITERS writes are under way at once
                met.set()

        saver.out = _HookedOut(inner, meet)  # type: ignore[assignment]
        try:
            size = saver.run()
        finally:
            protector.disarm()
        assert met.is_set()
        saver.out = inner
        assert np.array_equal(_stream_pages(img, saver, size, ram.size), view.reshape(-1, PAGE))
    finally:
        img.close()
        wp.close()
        ram.close()


def test_a_gatherer_that_fails_to_start_its_writers_stops_the_ones_it_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second writer cannot start: the first is stopped and every gather buffer taken goes
    back to the pool, so nothing is left waiting or held."""
    ram = GuestRAM(16 * MIB)
    wp = _wp(ram)
    img = Qcow2Image.in_memory(8 * MIB)
    try:
        saver = CowSave(UffdProtector(wp), ram, img, img.snapshot_prepare(), "m", [])
        started: list[threading.Event] = []
        real = cow.spawn

        def second_fails(fn: Any, *args: Any) -> threading.Event:
            if started:
                raise RuntimeError("no thread for the second writer")
            started.append(real(fn, *args))
            return started[-1]

        held: list[int] = []  # buffers out of this test's pool

        class Pool:
            @contextlib.contextmanager
            def take(self, n: int) -> Iterator[np.ndarray]:
                held.append(n)
                try:
                    yield np.zeros((n, PAGE), dtype=np.uint8)
                finally:
                    held.remove(n)

        monkeypatch.setattr(cow, "spawn", second_fails)
        monkeypatch.setattr(cow, "WARM_PAGES", Pool())
        with pytest.raises(RuntimeError, match="second writer"):
            cow._Gatherer(saver)
        assert started and started[0].wait(10), "the writer that started was left waiting"
        assert held == []  # every buffer taken went back
    finally:
        img.close()
        wp.close()
        ram.close()
