"""A copy-on-write save knows RAM the guest never wrote is zero without reading it.

After the arm, the chunks whose every page is still mapped to the shared zero page held zeros
at the stop (an unsaved chunk is write-protected: a write to it faults and is saved first), so
the saver skips them: a page-table walk instead of a scan of GiBs of zeros.  The tests check
that the skip happens, that a chunk the guest writes after the stop is still saved as the zeros
it held, and that the stream is the stop instant's, bit for bit.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from emulator.block import Qcow2Image
from emulator.errors import UffdUnavailable
from emulator.memory import GuestRAM
from emulator.migration.cow import CHUNK, SPAN, CowSave, UffdProtector, WriteProtector
from emulator.migration.vmstate import PAGE, RamLayout, load_state
from emulator.uffd import zero_mapped_units

MIB = 1 << 20
DATA_CHUNKS = (1, 4, 9)


def _wp(ram: GuestRAM) -> WriteProtector:
    try:
        return WriteProtector(ram)
    except UffdUnavailable as err:
        pytest.skip(f"the kernel refuses userfaultfd here: {err}")


def _stream_pages(img: Qcow2Image, saver: CowSave, size: int, ram_size: int) -> np.ndarray:
    """The saved RAM, page by page, read back from the snapshot's VM state."""
    sn = img.snapshot_finish(saver.out.p, "s", vm_state_size=size, date_sec=0,  # type: ignore[union-attr]
                             date_nsec=0, vm_clock_nsec=0)
    stream = bytearray(size)
    img.load_vmstate(0, stream, snapshot_id=sn.id_str)

    class Reader:
        def read(self, pos: int, n: int) -> bytes:
            return bytes(stream[pos:pos + n])

        def readinto(self, pos: int, buf: memoryview) -> None:
            buf[:] = stream[pos:pos + len(buf)]

    got: list[RamLayout] = []
    load_state(Reader(), size, "m", [], got.append)
    lay = got[0]
    pages = np.zeros((ram_size // PAGE, PAGE), dtype=np.uint8)
    n = int(lay.nonzero.sum())
    pages[lay.nonzero] = np.frombuffer(bytes(stream[lay.data_offset:lay.data_offset + n * PAGE]),
                                       dtype=np.uint8).reshape(n, PAGE)
    return pages


def test_zero_mapped_units_tells_never_written_chunks_from_written_ones() -> None:
    ram = GuestRAM(17 * MIB + PAGE)  # the last 2 MiB unit is short
    try:
        ram.populate(write=False)
        assert zero_mapped_units(ram.addr, ram.size, CHUNK).tolist() == [True] * 9
        ram.write(5 * MIB, b"x")
        ram.write(16 * MIB + 2 * PAGE, b"y")
        ram.write(7 * MIB, bytes(PAGE))  # a write of zeros still makes the page real memory
        got = zero_mapped_units(ram.addr, ram.size, CHUNK)
        assert np.flatnonzero(~got).tolist() == [2, 3, 8]
        pages = zero_mapped_units(ram.addr, 4 * MIB, PAGE)
        assert len(pages) == 1024 and pages.all()  # chunks 0 and 1: never written
    finally:
        ram.close()


def test_zero_chunks_are_skipped_and_a_chunk_written_after_the_stop_is_saved_as_its_zeros() -> None:
    ram = GuestRAM(32 * MIB)
    wp = _wp(ram)  # never-written RAM read-mapped: the shared zero page
    img = Qcow2Image.in_memory(8 * MIB)
    try:
        view = np.ctypeslib.as_array((ctypes.c_uint8 * ram.size).from_address(ram.addr))
        rng = np.random.default_rng(5)
        for c in DATA_CHUNKS:
            view[c * CHUNK + 3 * PAGE:c * CHUNK + 40 * PAGE] = rng.integers(1, 256, 37 * PAGE, dtype=np.uint8)
        before = view.copy()
        protector = UffdProtector(wp)
        saver = CowSave(protector, ram, None, None, "m", [])
        saver.prepare()
        saver.arm()  # the stop instant
        # The guest writes chunk 6, zero at the stop, before the saver looks for zero chunks
        # (the write waits for the fault thread, which copies the chunk's zeros first) ...
        ctypes.memset(ram.addr + 6 * CHUNK + 5 * PAGE, 0xAB, 1)  # GIL released, as the vCPU writes
        saver.attach(img, img.snapshot_prepare(), [])
        # ... and chunk 14 while the saver runs: claimed as zero, or saved by its fault.
        writer = threading.Thread(target=lambda: ctypes.memset(ram.addr + 14 * CHUNK + 7, 0xCD, 1))
        writer.start()
        try:
            size = saver.run()
        finally:
            writer.join(60)
            protector.disarm()
        assert not writer.is_alive()
        st = saver.stats
        assert st.fault_chunks >= 1 and st.fault_chunks + st.bg_chunks == 16
        # every chunk never written is known zero without a read, except those a fault saved
        zero_at_stop = 16 - len(DATA_CHUNKS)
        assert zero_at_stop - st.fault_chunks <= st.zero_chunks <= zero_at_stop - 1
        saved = _stream_pages(img, saver, size, ram.size)
        assert np.array_equal(saved, before.reshape(-1, PAGE))  # the stop instant, not the writes after it
        assert view[6 * CHUNK + 5 * PAGE] == 0xAB and view[14 * CHUNK + 7] == 0xCD  # the guest's writes landed
        assert (img.check().leaks, img.check().corruptions) == (0, 0)
    finally:
        img.close()
        wp.close()
        ram.close()


class _Records:
    """A sequential stream's page records (what ``migrate`` writes), kept in memory."""

    def __init__(self) -> None:
        self.records: list[tuple[int, bytes]] = []

    def begin(self, machine: str, sections: list, ram_size: int) -> None:  # type: ignore[type-arg]
        pass

    def pages(self, first_page: int, data: memoryview) -> None:
        self.records.append((first_page, bytes(data)))

    def end(self) -> int:
        return 0


@pytest.mark.parametrize("to", ["qcow2", "stream"])
def test_chunks_a_fault_copies_are_packed_and_saved_as_they_were_at_the_stop(to: str) -> None:
    """A fault copies only its chunk's non-zero pages, packed, and notes which they were: every
    pattern of zero and non-zero pages comes back in place, in the snapshot and in a stream."""
    ram = GuestRAM(16 * MIB + 3 * PAGE)  # a short last chunk (8)
    wp = _wp(ram)
    img = Qcow2Image.in_memory(8 * MIB)
    try:
        view = np.ctypeslib.as_array((ctypes.c_uint8 * ram.size).from_address(ram.addr))
        rng = np.random.default_rng(9)
        per = CHUNK // PAGE
        patterns = {
            0: np.arange(per) % 3 == 0,  # scattered pages
            1: np.ones(per, dtype=bool),  # every page
            2: np.arange(per) >= per - 1,  # the last page only
            3: (np.arange(per) >= 100) & (np.arange(per) < 140),  # one run
            8: np.arange(3) < 3,  # the short chunk: all three pages
        }
        for c, pat in patterns.items():
            for p in np.flatnonzero(pat).tolist():
                view[c * CHUNK + p * PAGE + int(rng.integers(0, PAGE))] = int(rng.integers(1, 256))
        before = view.copy()
        protector = UffdProtector(wp)
        sink = _Records() if to == "stream" else None
        saver = CowSave(protector, ram, None, None, "m", [], sink=sink)
        saver.prepare()
        saver.arm()  # the stop instant; then the guest writes every one of those chunks and one zero chunk
        for c in (*patterns, 4):
            ctypes.memset(ram.addr + c * CHUNK + 17, 0xEE, 1)  # waits for the fault's packed copy
        if sink is None:
            saver.attach(img, img.snapshot_prepare(), [])
        try:
            size = saver.run()
        finally:
            protector.disarm()
        assert saver.stats.fault_chunks == len(patterns) + 1
        want = before.reshape(-1, PAGE)
        if sink is None:
            got = _stream_pages(img, saver, size, ram.size)
        else:
            got = np.zeros_like(want)
            for first, data in sink.records:
                got[first:first + len(data) // PAGE] = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE)
            assert sum(len(d) for _, d in sink.records) == saver.stats.bytes_written
        assert np.array_equal(got, want)
        assert np.array_equal(saver.nonzero, want.any(axis=1))
    finally:
        img.close()
        wp.close()
        ram.close()


def _armed_saver(ram: GuestRAM, wp: WriteProtector, img: Qcow2Image) -> tuple[CowSave, UffdProtector]:
    protector = UffdProtector(wp)
    saver = CowSave(protector, ram, None, None, "m", [])
    saver.prepare()
    saver.arm()
    saver.attach(img, img.snapshot_prepare(), [])
    return saver, protector


def _run_bounded(saver: CowSave) -> BaseException | int | None:
    """saver.run() on a thread: its size, its exception, or None if it did not end in 60 s."""
    out: list[BaseException | int] = []

    def go() -> None:
        try:
            out.append(saver.run())
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            out.append(err)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(60)
    return out[0] if out else None


def test_a_fault_that_cannot_copy_its_chunk_fails_the_save_and_lets_the_guest_go(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The copy allocates (numpy temporaries): a MemoryError there ends the save with that
    error, the faulting write goes through, and the saver does not wait for that chunk forever."""
    from emulator.migration import cow

    ram = GuestRAM(16 * MIB)
    wp = _wp(ram)
    img = Qcow2Image.in_memory(8 * MIB)
    try:
        ctypes.memset(ram.addr + 3 * CHUNK, 0x11, PAGE)
        saver, protector = _armed_saver(ram, wp, img)

        def no_memory(src: int, n: int, buf: object) -> np.ndarray:
            raise MemoryError("no memory for the copy")

        monkeypatch.setattr(cow, "_pack_chunk", no_memory)
        writer = threading.Thread(target=lambda: ctypes.memset(ram.addr + 3 * CHUNK + 9, 0x22, 1), daemon=True)
        writer.start()
        writer.join(60)
        try:
            assert not writer.is_alive(), "the faulting write was never let go"
            got = _run_bounded(saver)
        finally:
            protector.disarm()
        assert isinstance(got, MemoryError), got
        assert ctypes.string_at(ram.addr + 3 * CHUNK + 9, 1) == b"\x22"
    finally:
        img.close()
        wp.close()
        ram.close()


def test_a_saver_that_cannot_set_up_its_output_fails_the_save(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Before, the gatherer was made outside the saver's error handling: a failure there was
    lost on the worker thread and the save went on without its RAM."""
    from emulator.migration import cow

    ram = GuestRAM(16 * MIB)
    wp = _wp(ram)
    img = Qcow2Image.in_memory(8 * MIB)
    try:
        ctypes.memset(ram.addr + CHUNK, 0x33, PAGE)
        saver, protector = _armed_saver(ram, wp, img)

        def refuse(self: object, save: object) -> None:
            raise MemoryError("no gather buffers")

        monkeypatch.setattr(cow._Gatherer, "__init__", refuse)
        try:
            got = _run_bounded(saver)
        finally:
            protector.disarm()
        assert isinstance(got, MemoryError), got
    finally:
        img.close()
        wp.close()
        ram.close()


def test_the_scan_ahead_finds_zero_pages_for_the_saver_and_never_uses_a_written_chunk() -> None:
    """A second scan (on an idle CPU) finds the zero pages of the chunks ahead of the saver; the
    saver uses them, except for a chunk the guest wrote since (its fault's copy counts), and
    the stream is still the stop instant's, bit for bit."""
    ram = GuestRAM(64 * MIB)
    wp = _wp(ram)
    img = Qcow2Image.in_memory(8 * MIB)
    try:
        view = np.ctypeslib.as_array((ctypes.c_uint8 * ram.size).from_address(ram.addr))
        rng = np.random.default_rng(11)
        for c in range(28):
            if c != 20:  # chunk 12 stays zero-page mapped: skipped by both scans
                view[c * CHUNK:(c + 1) * CHUNK:PAGE] = 0  # real memory (a write), zero
                hit = c * CHUNK + rng.choice(CHUNK // PAGE, 9, replace=False) * PAGE + rng.integers(0, PAGE, 9)
                view[hit] = rng.integers(1, 256, 9, dtype=np.uint8)
        before = view.copy()
        saver, protector = _armed_saver(ram, wp, img)
        saver.scan_ahead = True
        ctypes.memset(ram.addr + 25 * CHUNK + 3, 0x11, 1)  # written before the saver starts: a fault copy
        with saver.lock:  # a copy in flight on chunk 0 holds the saver at its first span
            saver.state[0] = 1  # COPYING
        out: list[BaseException | int | None] = []
        runner = threading.Thread(target=lambda: out.append(_run_bounded(saver)))
        runner.start()
        try:
            for _ in range(6000):
                if saver.ahead is not None and not saver.ahead._thread.is_alive():
                    break
                threading.Event().wait(0.01)
            ahead = saver.ahead
            assert ahead is not None and not ahead._thread.is_alive()
            assert ahead.policy in ("SCHED_IDLE", "nice 19")
            scanned = np.flatnonzero(ahead.done).tolist()
            # every chunk beyond the saver's span and the next, but the zero-mapped and the written one
            assert scanned == [c for c in range(2 * SPAN, 28) if c not in (20, 25)]
            ctypes.memset(ram.addr + 23 * CHUNK + 5, 0x22, 1)  # scanned, then written: the copy counts
        finally:
            with saver.lock:
                saver.state[0] = 0  # the copy "ends": the saver claims chunk 0 from RAM
                saver.saved_cond.notify_all()
            runner.join(60)
            protector.disarm()
        assert not runner.is_alive() and isinstance(out[0], int), out
        assert saver.stats.ahead_chunks == len(scanned) - 1  # all but chunk 23
        saved = _stream_pages(img, saver, out[0], ram.size)
        assert np.array_equal(saved, before.reshape(-1, PAGE))
        assert np.array_equal(saver.nonzero, before.reshape(-1, PAGE).any(axis=1))
    finally:
        img.close()
        wp.close()
        ram.close()


def test_the_scan_ahead_starts_only_with_a_second_cpu_and_low_cpu_pressure(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On a busy host the scan-ahead thread could be preempted holding the interpreter lock and
    hold up the fault thread: a save starts it only with a CPU to spare."""
    import emulator.migration.cow as cow

    monkeypatch.setattr(cow.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cow, "cpu_pressure", lambda: 2.0)
    assert cow.scan_ahead_wanted() == (True, "")
    monkeypatch.setattr(cow, "cpu_pressure", lambda: None)  # a kernel without PSI
    assert cow.scan_ahead_wanted() == (True, "")
    monkeypatch.setattr(cow, "cpu_pressure", lambda: 35.0)
    assert cow.scan_ahead_wanted() == (False, "off (CPU pressure 35%)")
    monkeypatch.setattr(cow.os, "sched_getaffinity", lambda pid: {0})
    assert cow.scan_ahead_wanted() == (False, "off (one CPU)")


def test_cpu_pressure_reads_the_kernels_figure() -> None:
    import emulator.migration.cow as cow

    p = cow.cpu_pressure()
    try:
        with open("/proc/pressure/cpu") as f:
            line = f.readline()
    except OSError:
        assert p is None
        return
    assert line.startswith("some ") and p is not None and 0.0 <= p <= 100.0
