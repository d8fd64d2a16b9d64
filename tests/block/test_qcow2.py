"""qcow2 driver, iotests style: known patterns, snapshots, a check after every phase."""

from __future__ import annotations

import os

import numpy as np
import pytest

from emulator.block import Qcow2Image
from emulator.block.io import MemoryFile
from emulator.errors import OutOfRangeError, ReadOnlyError, SnapshotNotFoundError

CLUSTER_SIZES = [512, 4096, 65536, 2 << 20]


def clean(img: Qcow2Image) -> None:
    res = img.check()
    assert res.clean, res.messages[:10]


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_pattern_snapshot_revert(cs: int) -> None:
    size = 64 << 20
    img = Qcow2Image.in_memory(size, cluster_size=cs)
    # A write straddling several cluster boundaries, not aligned at either end.
    off, n = cs // 2 + 3, 3 * cs + 17
    img.write(off, b"\x11" * n)
    clean(img)
    img.snapshot_create("snap")
    clean(img)
    img.write(off + cs, b"\x22" * (cs + 5))
    clean(img)
    assert img.read(off + cs, cs + 5) == b"\x22" * (cs + 5)
    assert img.read(off, cs) == b"\x11" * cs
    img.snapshot_goto("snap")
    clean(img)
    assert img.read(off, n) == b"\x11" * n
    assert img.read(0, off) == bytes(off)
    assert img.read(off + n, 100) == bytes(100)
    # Writing after goto must copy-on-write, not touch the snapshot's clusters.
    img.write(off, b"\x33" * 10)
    clean(img)
    buf = bytearray(n)
    img.snapshot_read("snap", off, buf)
    assert bytes(buf) == b"\x11" * n
    img.snapshot_delete(name="snap")
    clean(img)
    assert img.read(off, 10) == b"\x33" * 10
    assert img.read(off + 10, n - 10) == b"\x11" * (n - 10)


def test_copied_flag_exact_after_every_operation() -> None:
    img = Qcow2Image.in_memory(8 << 20, cluster_size=4096)
    img.write(0, os.urandom(64 << 10))
    for i in range(3):
        img.snapshot_create(f"s{i}")
        img.write(i * 4096, b"x" * 100)
        clean(img)
    img.snapshot_delete(name="s1")
    clean(img)
    img.snapshot_goto("s0")
    clean(img)
    img.snapshot_delete(name="s0")
    img.snapshot_delete(name="s2")
    clean(img)
    # With no snapshots left every allocated cluster has refcount 1 and COPIED set.
    l2 = img.l2_cache[int(img.l1_table[0]) & 0x00FFFFFFFFFFFE00]
    assert all((int(e) >> 63) == 1 for e in l2 if e)


def test_zero_and_discard() -> None:
    cs = 4096
    img = Qcow2Image.in_memory(1 << 20, cluster_size=cs)
    img.write(0, b"\xaa" * (8 * cs))
    img.write_zeroes(cs + 100, 3 * cs)  # partial head and tail, two whole clusters
    exp = bytearray(b"\xaa" * (8 * cs))
    exp[cs + 100:4 * cs + 100] = bytes(3 * cs)
    assert img.read(0, 8 * cs) == bytes(exp)
    clean(img)
    assert img.discard(5 * cs + 1, 2 * cs) == cs  # only the whole cluster 6
    exp[6 * cs:7 * cs] = bytes(cs)
    assert img.read(0, 8 * cs) == bytes(exp)
    clean(img)
    alloc = img.allocation_map()
    assert not alloc[2] and not alloc[6] and alloc[0]


def test_l1_and_refcount_growth_small_clusters() -> None:
    """512-byte clusters: a refcount block covers 128 KiB, so the table must grow."""
    img = Qcow2Image.in_memory(64 << 20, cluster_size=512)
    data = np.random.default_rng(1).integers(0, 256, 12 << 20, dtype=np.uint8).tobytes()
    img.write(0, data)
    img.save_vmstate(0, data[:1 << 20])  # beyond the disk: the L1 grows
    clean(img)
    assert img.refcounts.table_clusters > 1
    assert img.read(0, len(data)) == data
    img.snapshot_create("big", vm_state_size=1 << 20)
    clean(img)
    buf = bytearray(1 << 20)
    img.load_vmstate(0, buf, snapshot_id=img.snapshots[0].id_str)
    assert bytes(buf) == data[:1 << 20]


def test_vmstate_dropped_from_active_l1_after_create() -> None:
    img = Qcow2Image.in_memory(16 << 20)
    state = os.urandom(3 << 20)
    img.save_vmstate(0, state)
    vm_l1 = img.l1_vm_state_index
    assert int(img.l1_table[vm_l1]) != 0
    sn = img.snapshot_create("with-state", vm_state_size=len(state))
    assert all(int(e) == 0 for e in img.l1_table[vm_l1:])
    buf = bytearray(len(state))
    img.load_vmstate(0, buf, snapshot_id=sn.id_str)
    assert bytes(buf) == state
    clean(img)


def test_snapshot_ids_and_lookup() -> None:
    img = Qcow2Image.in_memory(1 << 20)
    a = img.snapshot_create("a")
    b = img.snapshot_create("b")
    assert (a.id_str, b.id_str) == ("1", "2")
    img.snapshot_delete(name="a")
    c = img.snapshot_create("c")
    assert c.id_str == "3"  # ids are never reused below the maximum
    assert img.find_snapshot("2").name == "b"
    with pytest.raises(SnapshotNotFoundError):
        img.snapshot_goto("nope")
    with pytest.raises(SnapshotNotFoundError):
        img.snapshot_delete(name="a")


def test_bounds_and_read_only() -> None:
    f = MemoryFile()
    img = Qcow2Image.create(f, 1 << 20)
    with pytest.raises(OutOfRangeError):
        img.write((1 << 20) - 1, b"ab")
    with pytest.raises(OutOfRangeError):
        img.read(-1, 1)
    ro = Qcow2Image(f, read_only=True)
    with pytest.raises(ReadOnlyError):
        ro.write(0, b"x")
    with pytest.raises(ReadOnlyError):
        ro.snapshot_create("x")


def test_reopen_roundtrip_and_v2() -> None:
    for version in (2, 3):
        f = MemoryFile()
        img = Qcow2Image.create(f, 4 << 20, version=version)
        img.write(12345, b"hello")
        img.snapshot_create("s", vm_clock_nsec=5_000_000_123)
        img.close()
        again = Qcow2Image(f)
        assert again.version == version
        assert again.read(12345, 5) == b"hello"
        (sn,) = again.snapshot_list()
        assert (sn.name, sn.vm_clock_nsec, sn.disk_size) == ("s", 5_000_000_123, 4 << 20)
        clean(again)


def test_unknown_header_extension_preserved() -> None:
    from emulator.block.format import HeaderExtension, QCowHeader, feature_table_extension

    f = MemoryFile()
    Qcow2Image.create(f, 1 << 20)
    # Rewrite the header with an extra, unknown extension after the feature table.
    img = Qcow2Image(f)
    h = img.header
    ext = HeaderExtension(0x12345678, b"keep me, please")
    raw = QCowHeader(**{**h.__dict__, "extensions": (feature_table_extension(), ext)}).pack()
    f.pwrite(0, raw)
    img = Qcow2Image(f)
    img.write(0, b"x" * 70000)
    img.snapshot_create("s")
    img.snapshot_delete(name="s")
    again = Qcow2Image(f)
    assert ext in again.header.extensions
    clean(again)


def test_dirty_bit_is_repaired_on_open() -> None:
    import struct

    f = MemoryFile()
    img = Qcow2Image.create(f, 1 << 20, cluster_size=4096)
    img.write(0, b"x" * 20000)
    img.close()
    # An unclean shutdown with lazy refcounts: dirty bit set, one refcount too low, one leak.
    struct.pack_into(">Q", f.data, 72, 1)
    rb = int.from_bytes(bytes(f.data[48:56]), "big")
    rb_off = int.from_bytes(bytes(f.data[rb:rb + 8]), "big")
    struct.pack_into(">H", f.data, rb_off + 2 * 5, 0)
    ro = Qcow2Image(f, read_only=True)
    assert ro.check().corruptions >= 1  # read-only: reported, not repaired
    again = Qcow2Image(f)
    assert any("dirty bit" in m for m in again.messages)
    assert again.check().clean and not again.header.incompatible_features & 1
    assert again.read(0, 20000) == b"x" * 20000


def test_allocation_does_not_rescan_from_a_spare_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Metadata commits keep spare clusters near the start of the file; data allocation skips
    them, and its hint must move past them.  Left behind, every allocation scanned every refcount
    block from there again: a 32 MiB VM state with 512-byte clusters took 10 s into the holes a
    delete left, 0.35 s with the hint moving.  Counted as refcount blocks looked at, per L2
    table's slice of the write (256 slices here): a few each, fresh space or holes."""
    from emulator.block import refcount

    calls = [0]
    real = refcount.Refcounts.block

    def counting(self: refcount.Refcounts, b: int) -> np.ndarray | None:
        calls[0] += 1
        return real(self, b)

    monkeypatch.setattr(refcount.Refcounts, "block", counting)
    data = np.random.default_rng(1).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    img = Qcow2Image.in_memory(8 << 20, cluster_size=512)
    slices = (8 << 20) // (512 * 64)
    calls[0] = 0
    img.save_vmstate(0, data)
    assert calls[0] <= 8 * slices, calls
    img.snapshot_create("a", vm_state_size=len(data))
    img.snapshot_delete(name="a")
    assert img.refcounts.spare and img.refcounts.spare[0] < 64  # spare clusters near the start
    calls[0] = 0
    img.save_vmstate(0, data)  # into the holes the delete left
    assert calls[0] <= 8 * slices, calls
    clean(img)
    buf = bytearray(len(data))
    img.load_vmstate(0, memoryview(buf))
    assert bytes(buf) == data
