"""The vmstate stream: every handler round-trips; bad streams are refused before any change."""

from __future__ import annotations

import ctypes
import struct
import threading

import numpy as np
import pytest

from emulator.errors import LoadVMError
from emulator.migration.vmstate import (
    PAGE,
    Handler,
    RamLayout,
    load_state,
    nonzero_pages,
    pages_nonzero,
    read_grouped,
    save_state,
)


class Buf:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, pos: int, data: bytes | memoryview) -> None:
        end = pos + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[pos:end] = data

    def read(self, pos: int, n: int) -> bytes:
        return bytes(self.data[pos:pos + n])

    def readinto(self, pos: int, buf: memoryview) -> None:
        buf[:] = self.data[pos:pos + len(buf)]


def test_every_machine_handler_round_trips(make_vm) -> None:  # type: ignore[no-untyped-def]
    m = make_vm()
    import time
    time.sleep(0.1)
    m.stop()
    before = {h.idstr: h.save() for h in m.savevm_handlers()}
    assert set(before) == {"machine", "cpu", "clock", "serial", "lab", "timer", "disk", "flash", "fw_cfg"}
    for h in m.savevm_handlers():
        h.load(before[h.idstr], h.version_id)
    after = {h.idstr: h.save() for h in m.savevm_handlers()}
    before.pop("clock"), after.pop("clock")  # the clock is read at save time
    assert before == after


def test_ram_layout_is_page_indexed_and_zero_pages_are_flags() -> None:
    ram = np.zeros(64 * PAGE, dtype=np.uint8)
    for p in (1, 2, 3, 10, 63):
        ram[p * PAGE + 5] = p
    buf = Buf()
    seen = {}
    h = Handler("dev", 2, lambda: b"hello", lambda d, v: seen.update(dev=(d, v)))
    st = save_state(buf, "m", [h], ram)
    assert st.nonzero == 5 and st.ram_data_offset % PAGE == 0
    assert st.size < st.ram_data_offset + 6 * PAGE  # zero pages take no room
    got: list[RamLayout] = []
    load_state(buf, st.size, "m", [h], got.append)
    assert seen["dev"] == (b"hello", 2)
    (lay,) = got
    assert lay.nonzero.sum() == 5 and list(np.flatnonzero(lay.nonzero)) == [1, 2, 3, 10, 63]
    for p in (1, 2, 3, 10, 63):  # any page can be read at random
        page = buf.read(int(lay.page_offset[p]), PAGE)
        assert page[5] == p and page.count(0) == PAGE - 1
    assert nonzero_pages(ram).tolist() == lay.nonzero.tolist()


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_the_zero_page_scan_is_exact_in_any_number_of_threads(threads: int) -> None:
    pages = 4 * 4096 * 3 + 7  # slices that do not divide evenly, a tail page
    ram = np.zeros(pages * PAGE, dtype=np.uint8)
    rng = np.random.default_rng(5)
    hit = rng.choice(pages, 500, replace=False)
    hit = np.concatenate((hit, [0, pages - 1, 4096 * 4 - 1, 4096 * 4, 4096 * 8]))
    ram[hit * PAGE + rng.integers(0, PAGE, hit.size)] = rng.integers(1, 256, hit.size, dtype=np.uint8)
    want = np.zeros(pages, dtype=bool)
    want[hit] = True
    assert np.array_equal(nonzero_pages(ram, threads), want)
    assert np.array_equal(nonzero_pages(ram[: 3 * PAGE], threads), want[:3])  # smaller than a step


def _pattern(kind: str, pages: int, rng: np.random.Generator) -> np.ndarray:
    """Pages as rows of words, filled so each of pages_nonzero's paths runs."""
    rows = np.zeros((pages, PAGE // 8), dtype=np.uint64)
    if kind == "random":  # every first word non-zero: one word per page read
        rows[:] = rng.integers(1, 2**63, rows.shape, dtype=np.uint64)
    elif kind == "stamped":  # few first words non-zero: the rest read by runs
        rows[rng.choice(pages, pages // 20 + 1, replace=False), 0] = 7
    elif kind == "mid-page":  # data after a zero first word: runs read again, row by row
        rows[rng.choice(pages, pages // 30 + 1, replace=False), rng.integers(1, PAGE // 8)] = 9
        rows[rng.choice(pages, pages // 20 + 1, replace=False), 0] = 7
    elif kind == "mostly mid-page":  # most runs need a second look: every row's maximum
        rows[::2, PAGE // 8 - 1] = 1
    elif kind == "last word":  # the one non-zero word is a page's last (a run's end)
        rows[rng.choice(pages, min(3, pages), replace=False), PAGE // 8 - 1] = 1
    elif kind == "half known":  # most first words non-zero: the rest gathered, row maxima
        rows[: pages * 3 // 4, 0] = 5
        rows[pages - 2, 100] = 3
    return rows


@pytest.mark.parametrize("kind", ["zero", "random", "stamped", "mid-page", "mostly mid-page", "last word",
                                  "half known"])
@pytest.mark.parametrize("pages", [1, 2, 3, 512, 517])
def test_pages_nonzero_is_exact_on_every_path(kind: str, pages: int) -> None:
    rng = np.random.default_rng(pages)
    rows = _pattern(kind, pages, rng)
    want = rows.max(axis=1) != 0
    assert np.array_equal(pages_nonzero(rows), want)
    out = np.ones(pages, dtype=bool)
    assert pages_nonzero(rows, out=out) is out and np.array_equal(out, want)
    every_other = np.repeat(rows, 2, axis=0)[::2]  # a strided view: not one flat stretch
    assert not every_other.flags.c_contiguous or pages == 1
    assert np.array_equal(pages_nonzero(every_other), want)


@pytest.mark.parametrize("mutate,text", [
    (lambda b, st: b.data.__setitem__(slice(0, 4), b"XXXX"), "bad magic"),
    (lambda b, st: struct.pack_into(">I", b.data, 4, 9), "unsupported VM state stream version 9"),
    (lambda b, st: b.data.__setitem__(slice(b.data.find(b"dev"), b.data.find(b"dev") + 3), b"zzz"),
     "Unknown savevm section or instance 'zzz' 0"),
    (lambda b, st: struct.pack_into(">I", b.data, b.data.find(b"dev") + 7, 3), "unsupported version 3 for 'dev' v2"),
    (lambda b, st: b.data.__setitem__(slice(st.size - 5000, None), b""), "truncated"),
    (lambda b, st: b.data.__setitem__(slice(b.data.find(b"\x01m"), b.data.find(b"\x01m") + 2), b"\x01x"),
     "Machine type received is 'x' and local is 'm'"),
])
def test_bad_streams_fail_cleanly(mutate, text: str) -> None:  # type: ignore[no-untyped-def]
    ram = np.zeros(16 * PAGE, dtype=np.uint8)
    ram[PAGE:3 * PAGE] = 7
    buf = Buf()
    applied: list[bytes] = []
    h = Handler("dev", 2, lambda: b"state", lambda d, v: applied.append(d))
    st = save_state(buf, "m", [h], ram)
    mutate(buf, st)
    with pytest.raises(LoadVMError, match=text) as e:
        load_state(buf, min(st.size, len(buf.data)), "m", [h], lambda lay: applied.append(b"ram"))
    assert "while loading VM state" in str(e.value)
    assert applied == []  # nothing was applied


@pytest.mark.parametrize("pages", [1, 7, 8, 511, 512, 513, 1000, 4099])
def test_packed_layout_ranges_match_the_unpacked_bitmap(pages: int) -> None:
    """RamLayout keeps the bitmap packed; every range view and stream offset must equal what
    the fully unpacked bitmap gives, including bits past the last page set (garbage)."""
    rng = np.random.default_rng(pages)
    nz = rng.random(pages) < 0.4
    packed = np.packbits(nz, bitorder="little")
    if pages % 8:
        packed[-1] |= 0xFF << (pages % 8) & 0xFF  # junk past the end must be ignored
    lay = RamLayout(pages * PAGE, pages, 1 << 20, packed)
    assert lay.nonzero.tolist() == nz.tolist()
    want = (1 << 20) + (np.cumsum(nz) - 1) * PAGE
    got = lay.page_offsets(0, pages)
    assert got[nz].tolist() == want[nz].tolist()
    for first in sorted({0, 1, 5, 8, 300, 511, 512, 700, pages - 1} & set(range(pages))):
        for n in (1, 9, 512, pages):
            n = min(n, pages - first)
            assert lay.nonzero_range(first, n).tolist() == nz[first:first + n].tolist(), (first, n)
            sub = lay.page_offsets(first, n)
            m = nz[first:first + n]
            assert sub[m].tolist() == want[first:first + n][m].tolist(), (first, n)


@pytest.mark.parametrize("align", [PAGE, 65536, 2 << 20])
def test_sparse_stream_data_offset_is_aligned_and_loads(align: int) -> None:
    """A copy-on-write save aligns RAM data on the image's clusters (whole-cluster writes)."""
    from emulator.migration.vmstate import begin_sparse_stream, finish_sparse_stream

    ram = np.zeros(128 * PAGE, dtype=np.uint8)
    ram[7 * PAGE + 1] = 7
    buf = Buf()
    h = Handler("dev", 1, lambda: b"x" * 300, lambda d, v: None)
    sp = begin_sparse_stream(buf, "m", [(h, b"x" * 300)], ram.size, align=align)
    assert sp.data_offset % align == 0 and sp.data_offset >= PAGE
    buf.write(sp.data_offset + 7 * PAGE, ram[7 * PAGE:8 * PAGE].tobytes())
    size = finish_sparse_stream(buf, sp, nonzero_pages(ram))
    got: list[RamLayout] = []
    load_state(buf, size, "m", [h], got.append)
    assert list(np.flatnonzero(got[0].nonzero)) == [7]
    assert buf.read(int(got[0].page_offset[7]), PAGE)[1] == 7


def _cpu_env(uc) -> bytes:  # type: ignore[no-untyped-def]
    """The raw CPUX86State a context holds (struct uc_context: a 40-byte header, then data)."""
    ctx = uc.context_save()
    addr = ctypes.cast(ctx.context, ctypes.c_void_p).value
    size = ctypes.c_size_t.from_address(addr).value
    assert 0 < size < 1 << 20
    return ctypes.string_at(addr + 40, size)


def test_prepared_cpu_state_is_written_only_when_applied(make_vm) -> None:  # type: ignore[no-untyped-def]
    """A lazy load builds the CPU state before its stop and restores it inside: the prepared
    write changes nothing until it runs, and then leaves exactly (every byte of CPUX86State)
    what a reset followed by set_state leaves, its TLB flush queued for the next run."""
    from emulator.guest import FW_ENTRY

    m = make_vm()
    m.stop()
    now = m.cpu.get_state()
    want = dict(now, RAX=0x1234_5678_9ABC, R15=7, XMM3=(1 << 100) | 5, ST2=0,
                GDTR_BASE=now["GDTR_BASE"] + 0x40, IDTR_LIMIT=0x7F)  # system registers too
    assert want != now
    import unicorn.x86_const as x86

    from emulator import cpu as cpu_mod

    with cpu_mod._SCRATCH_LOCK:  # the scratch engine holds another context (as after a decode)
        cpu_mod._scratch().reg_write(x86.UC_X86_REG_MSR, (0xC0000082, 0x1234_5000))  # LSTAR
    write = m.cpu.prepare_state(want)
    assert m.cpu.get_state() == now
    m.cpu.reset(FW_ENTRY)
    m.cpu.set_state(want)
    expected = _cpu_env(m.cpu.uc)
    m.cpu.set_state(now)
    assert _cpu_env(m.cpu.uc) != expected
    write()
    assert m.cpu.get_state() == want
    assert _cpu_env(m.cpu.uc) == expected
    assert m.cpu._tlb_flush_pending and m.cpu._tb_flush_pending
    m.cpu.set_state(now)
    assert m.cpu.get_state() == now


def test_prepare_state_refuses_a_bad_payload_before_anything_is_applied() -> None:
    from emulator.migration.vmstate import ParsedState, prepare_state

    applied: list[str] = []

    def bad_prepare(d: bytes, v: int):  # type: ignore[no-untyped-def]
        raise ValueError("cpu state is 3 bytes, expected 700")

    good = Handler("clock", 1, lambda: b"", lambda d, v: applied.append("clock"))
    bad = Handler("cpu", 1, lambda: b"", lambda d, v: applied.append("cpu"), prepare_fn=bad_prepare)
    with pytest.raises(LoadVMError, match="device 'cpu': cpu state is 3 bytes"):
        prepare_state(ParsedState([(good, b"", 1), (bad, b"xyz", 1)], None))
    assert applied == []
    apply = prepare_state(ParsedState([(good, b"", 1)], None))
    assert applied == []
    apply()
    assert applied == ["clock"]


def test_read_grouped_reads_nearby_runs_at_once_and_places_every_byte() -> None:
    """Runs close in the file share one read (through the gap), far or over-large ones do not;
    every run lands at its own place, whatever the grouping."""
    rng = np.random.default_rng(5)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    calls: list[tuple[int, int]] = []

    def read(pos: int, buf: memoryview) -> None:
        calls.append((pos, len(buf)))
        buf[:] = src[pos:pos + len(buf)].tobytes()

    # (file offset, length, destination offset): 0-2 lie within the gap of each other,
    # 3 is far, 4 follows 3 but would overflow the 64 KiB bounce buffer, 5 lies before 4.
    runs = [(0, 4096, 81920), (8192, 8192, 0), (20480, 4096, 40960),
            (500_000, 40960, 102400), (545_000, 40960, 200000), (300_000, 4096, 16384)]
    src_offs = np.array([r[0] for r in runs], dtype=np.int64)
    lens = np.array([r[1] for r in runs], dtype=np.int64)
    dst_offs = np.array([r[2] for r in runs], dtype=np.int64)
    dst = (ctypes.c_char * 262144)()
    bounce = np.zeros((16, 4096), dtype=np.uint8)
    reads = read_grouped(read, memoryview(dst).cast("B"), ctypes.addressof(dst), dst_offs, src_offs, lens,
                         bounce, gap=8192)
    assert calls == [(0, 24576), (500_000, 40960), (545_000, 40960), (300_000, 4096)]
    assert reads == len(calls)
    got = np.frombuffer(dst, dtype=np.uint8)
    for s, n, d in runs:
        assert np.array_equal(got[d:d + n], src[s:s + n]), (s, n, d)
    assert read_grouped(read, memoryview(dst).cast("B"), ctypes.addressof(dst), dst_offs[:0], src_offs[:0],
                        lens[:0], bounce, gap=8192) == 0


def _patterned_ram(pages: int) -> np.ndarray:
    """Scattered pages, whole runs, and runs that cross scan windows and gather groups."""
    ram = np.zeros(pages * PAGE, dtype=np.uint8)
    rng = np.random.default_rng(11)
    hit = np.concatenate((rng.choice(pages, pages // 5, replace=False), np.arange(290, 420), [0, pages - 1]))
    ram[hit * PAGE + rng.integers(0, PAGE, hit.size)] = rng.integers(1, 256, hit.size, dtype=np.uint8)
    return ram


@pytest.mark.parametrize("cluster_size", [2048, 4096, 65536])
def test_windowed_scan_and_parallel_writers_write_the_same_stream(tmp_path, monkeypatch, cluster_size: int) -> None:  # type: ignore[no-untyped-def]
    """A save that scans in windows and writes through several unlocked writers into a qcow2
    VM-state area gives the very bytes of a one-pass, one-writer save, and loads back."""
    from emulator.block import Qcow2Image
    from emulator.migration import vmstate
    from emulator.migration.vmstate_io import VMStateStream

    pages = 2048 + 5
    ram = _patterned_ram(pages)
    h = Handler("dev", 2, lambda: b"state", lambda d, v: None)
    align = max(PAGE, cluster_size)
    one = Buf()
    st_one = save_state(one, "m", [h], ram, nz=nonzero_pages(ram), align=align)
    monkeypatch.setattr(vmstate, "SCAN_WINDOW", 300)  # windows end inside gather groups
    monkeypatch.setattr(vmstate, "GATHER_PAGES", 64)
    monkeypatch.setattr(vmstate, "SAVE_WRITERS", 3)
    img = Qcow2Image.create(tmp_path / "d.qcow2", 1 << 20, cluster_size=cluster_size)
    try:
        bulk_calls: list[int] = []
        stream = VMStateStream(img, direct=True)
        real = stream.write_bulk
        monkeypatch.setattr(stream, "write_bulk", lambda pos, data: (bulk_calls.append(pos), real(pos, data)))
        st = save_state(stream, "m", [h], ram, align=align, threads=2)
        assert (st.size, st.ram_data_offset, st.nonzero) == (st_one.size, st_one.ram_data_offset, st_one.nonzero)
        assert st.ram_data_offset % align == 0 and len(bulk_calls) > 3
        assert stream.read(0, st.size) == bytes(one.data[:st_one.size])
        got: list[RamLayout] = []
        load_state(stream, st.size, "m", [h], got.append)
        assert np.array_equal(got[0].nonzero, nonzero_pages(ram))
        assert img.check().corruptions == 0
    finally:
        img.close()


def test_a_failing_writer_fails_the_save_and_stops_every_writer(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from emulator.migration import vmstate

    monkeypatch.setattr(vmstate, "GATHER_PAGES", 16)
    ram = _patterned_ram(1024)

    class Failing(Buf):
        calls = 0

        def write_bulk(self, pos: int, data: memoryview) -> None:
            Failing.calls += 1
            if Failing.calls == 3:
                raise OSError(28, "No space left on device")
            self.write(pos, data)

    before = threading.active_count()
    with pytest.raises(OSError, match="No space left"):
        save_state(Failing(), "m", [], ram, threads=2)
    assert threading.active_count() <= before + vmstate.SAVE_WRITERS  # idle warm workers at most
    assert not [t for t in threading.enumerate() if t.name.startswith("zero-scan")]
