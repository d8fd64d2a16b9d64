"""A copy-on-write save's fault path when every chunk buffer is taken (back-pressure).

Each buffer holds a chunk the fault path copied and the in-order saver has not reached yet.
A guest write to another unsaved chunk then waits: until the saver gives a buffer back, or
reaches that chunk itself and saves it from RAM, or the save fails and lets every chunk go.
Before a fix the fault thread could wait for a buffer that nobody would give back, forever.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from emulator.block import Qcow2Image
from emulator.block.io import BlkdebugFile
from emulator.errors import BlockIOError
from emulator.memory import GuestRAM
from emulator.migration.cow import CHUNK, PROT_RWX, PROT_RX, CowSave, TlbProtector
from emulator.migration.vmstate import PAGE, RamLayout, load_state


def _ram(mib: int, seed: int) -> tuple[GuestRAM, np.ndarray]:
    """Guest RAM with random bytes in every other page (zero pages in between: the compact
    stream must leave them out), and a numpy view of it."""
    ram = GuestRAM(mib << 20, hugepages=False)
    view = np.ctypeslib.as_array((ctypes.c_uint8 * ram.size).from_address(ram.addr))
    rng = np.random.default_rng(seed)
    pages = view.reshape(-1, PAGE)
    pages[::2] = rng.integers(1, 256, size=(len(pages[::2]), PAGE), dtype=np.uint8)
    return ram, view


def _saver(ram: GuestRAM, img: Qcow2Image) -> CowSave:
    protector = TlbProtector(ram, lambda perms: None, lambda: None, PROT_RX, PROT_RWX)
    saver = CowSave(protector, ram, None, None, "m", [], max_buffers=1)
    saver.attach(img, img.snapshot_prepare(), [])
    return saver


def _waiting(saver: CowSave, c: int) -> tuple[threading.Thread, list[bool]]:
    """A guest write to chunk ``c`` from another thread (it waits: no buffer is free)."""
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(saver.save_or_wait(c)), daemon=True)
    t.start()
    return t, got


def test_a_failing_save_lets_a_starved_fault_go() -> None:
    ram, _ = _ram(96, 1)
    img = Qcow2Image.in_memory(8 << 20)
    f = BlkdebugFile(img.file)
    img.replace_file(f)
    try:
        saver = _saver(ram, img)
        pending = saver.out.p  # type: ignore[union-attr]
        assert saver.save_or_wait(45)  # the fault path takes the one buffer
        starved, got = _waiting(saver, 46)
        f.fill(256 << 10)  # room for the stream's header, not for the first 32 MiB write
        with pytest.raises(BlockIOError, match="No space left on device"):
            saver.run()
        starved.join(timeout=60)
        assert not starved.is_alive(), "a fault stayed waiting for a buffer"
        assert len(got) == 1
        assert (saver.state == 2).all()  # every chunk let go
        img.snapshot_abort(pending)
        res = img.check()
        assert (res.leaks, res.corruptions) == (0, 0)
    finally:
        img.close()
        ram.close()


def test_a_starved_fault_is_served_and_the_stream_holds_the_stop_instant() -> None:
    """The fault on chunk 13 waits while chunk 12's copy holds the only buffer; the saver
    reaches both; the guest's later writes to chunk 12 are not in the stream (its copy is), and
    the stream is compact: the stop instant's non-zero pages, in page order, nothing else."""
    ram, view = _ram(32, 2)
    before = view.copy()
    img = Qcow2Image.in_memory(8 << 20)
    try:
        saver = _saver(ram, img)
        assert saver.save_or_wait(12)
        view[12 * CHUNK:13 * CHUNK] = 0xEE  # the guest writes chunk 12 after its copy
        starved, got = _waiting(saver, 13)
        size = saver.run()
        starved.join(timeout=60)
        assert not starved.is_alive() and len(got) == 1
        assert saver.stats.fault_chunks + saver.stats.bg_chunks == 16
        sn = img.snapshot_finish(saver.out.p, "s", vm_state_size=size, date_sec=0,  # type: ignore[union-attr]
                                 date_nsec=0, vm_clock_nsec=0)
        stream = bytearray(size)
        img.load_vmstate(0, stream, snapshot_id=sn.id_str)
        assert (img.check().leaks, img.check().corruptions) == (0, 0)
    finally:
        img.close()
        ram.close()

    class Reader:
        def read(self, pos: int, n: int) -> bytes:
            return bytes(stream[pos:pos + n])

        def readinto(self, pos: int, buf: memoryview) -> None:
            buf[:] = stream[pos:pos + len(buf)]

    got_layout: list[RamLayout] = []
    load_state(Reader(), size, "m", [], got_layout.append)
    lay = got_layout[0]
    want_nz = before.reshape(-1, PAGE).any(axis=1)
    assert not lay.sparse and lay.nonzero.tolist() == want_nz.tolist()
    data = np.frombuffer(bytes(stream[lay.data_offset:lay.data_offset + int(want_nz.sum()) * PAGE]), dtype=np.uint8)
    assert np.array_equal(data.reshape(-1, PAGE), before.reshape(-1, PAGE)[want_nz])


def test_a_buffer_a_fault_still_copies_into_is_not_given_back_until_the_copy_ends(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A save that fails while a fault copies a chunk gives its buffers back to the process's
    pool, but not that one (another save could take it and be written over): the fault
    gives it back when its copy ends."""
    import emulator.migration.cow as cow

    ram, _ = _ram(32, 3)
    img = Qcow2Image.in_memory(8 << 20)
    copying, go_on = threading.Event(), threading.Event()
    used: list[ctypes.Array[ctypes.c_char]] = []
    real = cow._pack_chunk

    def slow_pack(src: int, n: int, buf: ctypes.Array[ctypes.c_char]) -> np.ndarray:
        used.append(buf)
        copying.set()
        assert go_on.wait(60)
        return real(src, n, buf)

    monkeypatch.setattr(cow, "_pack_chunk", slow_pack)
    fault: threading.Thread | None = None
    try:
        saver = _saver(ram, img)
        fault, got = _waiting(saver, 5)
        assert copying.wait(60)
        in_pool = lambda b: any(b is x for x in cow.WARM_BUFFERS._free)  # noqa: E731
        saver.fail(RuntimeError("the disk went away"))  # its buffers go back, but for the one in use
        assert not in_pool(used[0])
        go_on.set()
        fault.join(60)
        assert not fault.is_alive() and got == [True]
        assert in_pool(used[0])  # given back by the fault, once its copy ended
        assert not saver._copies  # and not kept as the failed save's copy
    finally:
        go_on.set()
        if fault is not None:
            fault.join(60)  # (before RAM goes: the copy reads it)
        img.close()
        ram.close()
