"""Hostile VM-state streams (issue #20 item 7): whatever is truncated, flipped, resized or
renamed, parse_state / prepare_state and load_sequential end with LoadVMError in QEMU's words
("Error -22 while loading VM state: ...") or load a state, never another exception, never a
read or an allocation the stream's own size does not justify, and a refused stream changes no
device.  The machine's real save handlers are used, so the CPU, flash, disk controller and
the other devices decode what the fuzzer made of their payloads."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.board import MACHINE_NAME
from emulator.errors import LoadVMError
from emulator.machine import Machine, MachineConfig
from emulator.migration.loading_set import LSET_MAGIC
from emulator.migration.vmstate import (
    MAX_SECTION_SIZE,
    PAGE,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_START,
    RAM_IDSTR,
    ParsedState,
    SaveHandler,
    SequentialStream,
    load_sequential,
    parse_state,
    prepare_state,
    save_state,
)

RAM = 32 << 20
HUGE = [0, 1, 0x7F, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 32, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]


@dataclass
class Fields:
    """Where a stream's framing is: (offset, width) of every length, section id and kind."""

    lengths: list[tuple[int, int]]
    sids: list[int]
    kinds: list[int]


def framing(data: bytes) -> Fields:
    """Walk a well-formed stream (either form) and note where its framing fields are."""
    f = Fields([], [], [])
    pos = 8

    def u(width: int) -> int:
        return int.from_bytes(data[pos:pos + width], "big")

    while True:
        f.kinds.append(pos)
        kind = data[pos]
        pos += 1
        if kind == QEMU_VM_EOF:
            return f
        if kind == QEMU_VM_CONFIGURATION:
            f.lengths.append((pos, 4))
            pos += 4 + u(4)
            continue
        f.sids.append(pos)
        pos += 4
        f.lengths.append((pos, 1))
        idstr = data[pos + 1:pos + 1 + data[pos]].decode()
        pos += 1 + data[pos] + 8
        if idstr == RAM_IDSTR and kind == QEMU_VM_SECTION_START:
            f.lengths.append((pos, 4))
            flags = struct.unpack_from(">QIIQQ", data, pos + 4)[2]
            pos += 4 + 32
            while True:
                f.kinds.append(pos)
                f.sids.append(pos + 1)
                k = data[pos]
                if k == QEMU_VM_SECTION_END:
                    f.kinds.append(pos + 5)
                    f.sids.append(pos + 6)
                    pos += 10
                    break
                if flags & 2:  # streamed: u64 first page, u32 pages, data
                    f.lengths += [(pos + 5, 8), (pos + 13, 4)]
                    pos += 17 + int.from_bytes(data[pos + 13:pos + 17], "big") * PAGE
                else:  # bitmap part, then data part up to the end of the pages
                    f.lengths.append((pos + 5, 8))
                    pos += 13 + int.from_bytes(data[pos + 5:pos + 13], "big")
            continue
        f.lengths.append((pos, 4))
        pos += 4 + u(4)
        f.kinds.append(pos)
        f.sids.append(pos + 1)
        pos += 5


@st.composite
def damaged(draw: st.DrawFn, data: bytes, fields: Fields) -> bytes:
    """One to three kinds of damage: truncation, flipped bits, a wrong or huge length field,
    an unknown section id or kind, inserted or deleted bytes."""
    d = bytearray(data)
    head = min(len(d), fields.kinds[-1] + 1)
    anywhere = st.integers(0, len(d) - 1)
    in_head = st.integers(0, head - 1)
    for _ in range(draw(st.integers(1, 3))):
        if not d:
            break
        what = draw(st.sampled_from(["truncate", "flip", "length", "sid", "kind", "insert", "delete"]))
        if what == "truncate":
            del d[draw(st.one_of(in_head, anywhere, st.integers(max(0, len(d) - 16), len(d) - 1))):]
        elif what == "flip":
            i = draw(st.one_of(in_head, anywhere)) % len(d)
            d[i] ^= 1 << draw(st.integers(0, 7))
        elif what == "length":
            off, width = draw(st.sampled_from(fields.lengths))
            v = draw(st.one_of(st.sampled_from(HUGE), st.integers(0, 1 << 20))) % (1 << (8 * width))
            d[off:off + width] = v.to_bytes(width, "big")
        elif what == "sid":
            off = draw(st.sampled_from(fields.sids))
            d[off:off + 4] = draw(st.integers(0, 0xFFFF_FFFF)).to_bytes(4, "big")
        elif what == "kind":
            d[draw(st.sampled_from(fields.kinds)) % len(d)] = draw(st.integers(0, 255))
        elif what == "insert":
            i = draw(st.one_of(in_head, anywhere))
            d[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            i = draw(st.one_of(in_head, anywhere))
            del d[i:i + draw(st.integers(1, 16))]
    return bytes(d)


class Reader:
    """The snapshot form's reader; every read must be justified by the stream's size."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, pos: int, n: int) -> bytes:
        assert 0 <= n <= max(1 << 16, len(self.data)), n
        return self.data[pos:pos + n]

    def readinto(self, pos: int, buf: memoryview) -> None:
        buf[:] = self.data[pos:pos + len(buf)].ljust(len(buf), b"\0")


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    m = Machine(MachineConfig(ram_size=RAM))  # never started: its devices are only loaded
    yield m
    m.close()
    m.graph.close()


def device_state(handlers: list[SaveHandler]) -> dict[str, bytes]:
    return {h.idstr: h.save() for h in handlers if h.idstr != "clock"}  # the clock is read at save time


def guest_ram() -> np.ndarray:
    ram = np.zeros(RAM, np.uint8)
    ram[3 * PAGE:5 * PAGE] = 0x11
    ram[100 * PAGE + 7] = 0x22
    ram[-PAGE] = 0x33
    return ram


def snapshot_stream(handlers: list[SaveHandler]) -> bytes:
    out = bytearray()

    class W:
        def write(self, pos: int, data: bytes | memoryview) -> None:
            out.extend(bytes(max(0, pos + len(data) - len(out))))  # the header is written last
            out[pos:pos + len(data)] = data

    st_ = save_state(W(), MACHINE_NAME, handlers, guest_ram())
    return bytes(out[:st_.size])


def sequential_stream(handlers: list[SaveHandler]) -> bytes:
    out = bytearray()
    s = SequentialStream(out.extend)
    ram = guest_ram()
    s.begin(MACHINE_NAME, [(h, h.save()) for h in handlers], RAM)
    for first, n in ((3, 2), (100, 1), (RAM // PAGE - 1, 1)):
        s.pages(first, memoryview(ram[first * PAGE:(first + n) * PAGE]))
    s.end()
    return bytes(out)


def assert_clean(err: LoadVMError) -> None:
    text = str(err)
    assert text.startswith(f"Error {err.errno} while loading VM state: ") and err.errno in (-5, -22), text
    assert err.qmp_class == "GenericError"


def test_the_walker_sees_every_field(machine: Machine) -> None:
    hs = machine.savevm_handlers()
    for data in (snapshot_stream(hs), sequential_stream(hs)):
        f = framing(data)
        eof = f.kinds[-1]
        assert data[eof] == QEMU_VM_EOF
        assert len(f.lengths) >= 2 * len(hs)
        if eof != len(data) - 1:  # a snapshot's loading-set trailer follows EOF
            assert data[eof + 1:eof + 9] == LSET_MAGIC


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_a_damaged_snapshot_stream_is_refused_cleanly_before_any_change(machine: Machine, data: st.DataObject) -> None:
    hs = machine.savevm_handlers()
    good = snapshot_stream(hs)
    bad = data.draw(damaged(good, framing(good)))
    before = device_state(hs)
    try:
        parsed = parse_state(Reader(bad), len(bad), MACHINE_NAME, hs)
        prepare_state(parsed)  # every payload decoded, nothing applied
        if parsed.layout is not None:
            lay = parsed.layout
            lay.page_offsets(0, min(lay.pages, 4096))
    except LoadVMError as err:
        assert_clean(err)
    assert device_state(hs) == before


@FUZZ
@given(data=st.data())
def test_a_damaged_migration_stream_is_refused_cleanly(machine: Machine, data: st.DataObject) -> None:
    hs = machine.savevm_handlers()
    machine.cpu.reset(machine.cpu.pc)
    good = sequential_stream(hs)
    bad = data.draw(damaged(good, framing(good)))
    f = io.BytesIO(bad)
    placed: list[tuple[int, int]] = []

    def read(n: int) -> bytes:
        assert 0 <= n <= MAX_SECTION_SIZE, n  # a buffered pipe allocates what is asked for
        return f.read(n)

    def place(first: int, chunk: bytes) -> None:
        assert len(chunk) % PAGE == 0 and (first * PAGE + len(chunk)) <= RAM
        placed.append((first, len(chunk) // PAGE))

    before = device_state(hs)
    try:
        load_sequential(read, MACHINE_NAME, hs, place, RAM)
    except LoadVMError as err:
        assert_clean(err)
        assert device_state(hs) == before  # devices are applied only once all of them decoded


def test_huge_lengths_are_refused_before_they_are_read(machine: Machine) -> None:
    """Each length field set to its largest value: a clean error and no read past the bound."""
    hs = machine.savevm_handlers()
    for good, sequential in ((snapshot_stream(hs), False), (sequential_stream(hs), True)):
        for off, width in framing(good).lengths:
            bad = good[:off] + b"\xff" * width + good[off + width:]
            with pytest.raises(LoadVMError) as e:
                if sequential:
                    f = io.BytesIO(bad)

                    def read(n: int, f: io.BytesIO = f) -> bytes:
                        assert n <= MAX_SECTION_SIZE, n
                        return f.read(n)

                    load_sequential(read, MACHINE_NAME, hs, lambda first, chunk: None, RAM)
                else:
                    prepare_state(parse_state(Reader(bad), len(bad), MACHINE_NAME, hs))
            assert_clean(e.value)


def test_a_register_file_the_cpu_model_refuses_changes_nothing(machine: Machine) -> None:
    """A segment selector past the GDT made Unicorn raise UcError (a #GP) from inside the batch
    write, half-way through the live register file; now the scratch engine refuses it first."""
    cpu = machine.cpu
    now = cpu.get_state()
    with pytest.raises(ValueError, match="refused by the CPU model"):
        cpu.set_state(dict(now, FS=0x1000, RAX=0x1234))
    assert cpu.get_state() == now
    with pytest.raises(ValueError, match="refused by the CPU model"):
        cpu.prepare_state(dict(now, GS=0xFFFF))


@pytest.mark.parametrize("device, bad", [
    ("disk", lambda good: good[:28] + b"\x01"),  # a pending request flagged, its fields cut off (found by the fuzz above)
    ("flash", lambda good: good[:12] + struct.pack("<I", 4096) + bytes(100)),  # a bank cut short
    ("timer", lambda good: good[:10]),
    ("lab", lambda good: good + b"x"),
    ("clock", lambda good: good[:3]),
])
def test_a_bad_device_section_fails_before_any_section_is_applied(machine: Machine, device: str, bad) -> None:  # type: ignore[no-untyped-def]
    """Every section is decoded before any is applied: a CPU section that would change the
    registers, then a device's bad one, leave every device as it was (before, a device that
    decoded while applying was half changed, and the CPU applied before it)."""
    hs = machine.savevm_handlers()
    by = {h.idstr: h for h in hs}
    before = device_state(hs)
    cpu = bytearray(by["cpu"].save())
    cpu[:8] = (int.from_bytes(cpu[:8], "little") ^ 0x1000).to_bytes(8, "little")  # another register value
    h = by[device]
    pending = [(by["cpu"], bytes(cpu), by["cpu"].version_id), (h, bad(h.save()), h.version_id)]
    with pytest.raises(LoadVMError) as err:
        prepare_state(ParsedState(pending, None))()
    assert_clean(err.value)
    assert device_state(hs) == before
