"""RAM is write-protected before the copy-on-write stop; the stop protects again only what was
written in between, and the snapshot is still the stop instant."""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np

from emulator.block import Qcow2Image
from emulator.memory import GuestRAM
from emulator.migration import cow
from emulator.migration.cow import CHUNK, CowSave, UffdProtector
from emulator.migration.vmstate import PAGE
from tests.migration.test_cow_zero_chunks import _stream_pages, _wp

MIB = 1 << 20


def _write(addr: int, value: int) -> None:
    """A write as the vCPU makes it: from another thread, GIL released (ctypes), so it can
    wait for the fault thread."""
    t = threading.Thread(target=lambda: ctypes.memset(addr, value, 1))
    t.start()
    t.join(30)
    assert not t.is_alive(), "a write stayed blocked in its fault"


def test_a_chunk_written_between_the_pre_arm_and_the_stop_is_saved_as_at_the_stop(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ram = GuestRAM(32 * MIB)
    wp = _wp(ram)
    img = Qcow2Image.in_memory(8 * MIB)
    ioctls: list[tuple[int, int]] = []
    protect = wp.uffd.writeprotect

    def counted(addr: int, length: int, on: bool) -> None:
        if on:
            ioctls.append((addr - ram.addr, length))
        protect(addr, length, on)

    monkeypatch.setattr(wp.uffd, "writeprotect", counted)
    try:
        view = np.ctypeslib.as_array((ctypes.c_uint8 * ram.size).from_address(ram.addr))
        view[::PAGE] = 1  # every page non-zero
        protector = UffdProtector(wp)
        saver = CowSave(protector, ram, None, None, "m", [])
        saver.scan_ahead = False
        saver.prepare()
        saver.pre_arm()  # the guest still runs: its writes go through, noted
        assert saver.pre_armed and ioctls == [(0, ram.size)]
        _write(ram.addr + 3 * CHUNK + 9, 0x33)  # before the stop: part of the snapshot
        _write(ram.addr + 11 * CHUNK + 5, 0x55)
        _write(ram.addr + 11 * CHUNK + PAGE + 5, 0x56)  # (the same chunk again: released already)
        at_stop = view.copy()
        saver.arm()  # the stop instant: chunks 3 and 11, and only they, protected again
        assert ioctls[1:] == [(3 * CHUNK, CHUNK), (11 * CHUNK, CHUNK)]
        assert saver.stats.rearmed_chunks == 2
        _write(ram.addr + 3 * CHUNK + 9, 0x99)  # after the stop: must not be in the snapshot
        _write(ram.addr + 11 * CHUNK + 5, 0x98)
        _write(ram.addr + 13 * CHUNK, 0x97)  # a chunk protected since the pre-arm only
        deadline = time.monotonic() + 30  # (the fault thread counts a copy after it woke the writer)
        while saver.stats.fault_chunks < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert saver.stats.fault_chunks == 3  # each of those writes had its chunk copied first
        saver.attach(img, img.snapshot_prepare(), [])
        try:
            size = saver.run()
        finally:
            protector.disarm()
        saved = _stream_pages(img, saver, size, ram.size)
        assert np.array_equal(saved, at_stop.reshape(-1, PAGE))
        assert (view[3 * CHUNK + 9], view[11 * CHUNK + 5], view[13 * CHUNK]) == (0x99, 0x98, 0x97)
    finally:
        img.close()
        wp.close()
        ram.close()


def test_scattered_writes_before_the_stop_protect_all_of_ram_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ram = GuestRAM(32 * MIB)
    wp = _wp(ram)
    monkeypatch.setattr(cow, "REARM_RUNS_MAX", 2)
    try:
        protector = UffdProtector(wp)
        saver = CowSave(protector, ram, None, None, "m", [])
        saver.prepare()
        saver.pre_arm()
        for c in (1, 4, 7, 10):  # four runs: more than REARM_RUNS_MAX
            _write(ram.addr + c * CHUNK, 1)
        calls: list[tuple[int, int]] = []
        protect = wp.uffd.writeprotect
        monkeypatch.setattr(wp.uffd, "writeprotect", lambda a, n, on: (calls.append((a - ram.addr, n)), protect(a, n, on)))
        saver.arm()
        assert calls == [(0, ram.size)] and saver.stats.rearmed_chunks == 4
        saver.abandon()
    finally:
        protector.disarm()
        wp.close()
        ram.close()


def test_a_save_that_fails_after_its_pre_arm_lets_every_chunk_go() -> None:
    ram = GuestRAM(16 * MIB)
    wp = _wp(ram)
    try:
        protector = UffdProtector(wp)
        saver = CowSave(protector, ram, None, None, "m", [])
        saver.prepare()
        saver.pre_arm()
        saver.abandon()  # (what arm_in_window does when the stop fails)
        protector.disarm()
        _write(ram.addr + 5 * CHUNK, 7)  # no protection left: the write goes through
        assert saver.stats.fault_chunks == 0
    finally:
        wp.close()
        ram.close()
