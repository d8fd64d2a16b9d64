"""A corpus of corrupted images: each gets a clear error naming the field, fast."""

from __future__ import annotations

import struct
import time
import warnings
from collections.abc import Callable

import pytest

from emulator.block import Qcow2Image
from emulator.block.io import MemoryFile
from emulator.errors import (
    ImageCorruptError,
    ImageFormatError,
    ReadOnlyError,
    SnaplabError,
    UnsupportedFeatureError,
)


def base_image(with_snapshot: bool = False) -> bytearray:
    f = MemoryFile()
    img = Qcow2Image.create(f, 8 << 20)
    img.write(0, b"\x5a" * 100_000)
    if with_snapshot:
        img.snapshot_create("s")
    return f.data


def put(buf: bytearray, off: int, fmt: str, val: int) -> None:
    struct.pack_into(fmt, buf, off, val)


def snap_off(buf: bytearray) -> int:
    return int(struct.unpack_from(">Q", buf, 64)[0])


CASES: list[tuple[str, Callable[[bytearray], None], type[Exception], str, bool]] = [
    ("bad magic", lambda b: put(b, 0, ">I", 0x12345678), ImageFormatError, "magic", False),
    ("version", lambda b: put(b, 4, ">I", 4), ImageFormatError, "version", False),
    ("cluster_bits small", lambda b: put(b, 20, ">I", 8), ImageFormatError, "cluster_bits", False),
    ("cluster_bits big", lambda b: put(b, 20, ">I", 22), ImageFormatError, "cluster_bits", False),
    ("reftable unaligned", lambda b: put(b, 48, ">Q", 0x10200), ImageFormatError, "refcount_table_offset", False),
    ("reftable past eof", lambda b: put(b, 48, ">Q", 1 << 40), ImageFormatError, "refcount_table_offset", False),
    ("reftable huge", lambda b: put(b, 56, ">I", 0xFFFFFFFF), ImageFormatError, "refcount_table_clusters", False),
    ("no reftable", lambda b: put(b, 56, ">I", 0), ImageFormatError, "refcount_table_clusters", False),
    ("l1 huge", lambda b: put(b, 36, ">I", 0x7FFFFFFF), ImageFormatError, "l1_size", False),
    ("l1 too small", lambda b: put(b, 36, ">I", 0), ImageFormatError, "l1_size", False),
    ("l1 unaligned", lambda b: put(b, 40, ">Q", 0x30008), ImageFormatError, "l1_table_offset", False),
    ("l1 past eof", lambda b: put(b, 40, ">Q", 1 << 45), ImageFormatError, "l1_table_offset", False),
    ("l1 on header", lambda b: put(b, 40, ">Q", 0), ImageFormatError, "l1_table_offset", False),
    ("size huge", lambda b: put(b, 24, ">Q", 1 << 63), ImageFormatError, "size", False),
    ("header_length", lambda b: put(b, 100, ">I", 1 << 20), ImageFormatError, "header_length", False),
    ("header_length short", lambda b: put(b, 100, ">I", 64), ImageFormatError, "header_length", False),
    ("refcount_order", lambda b: put(b, 96, ">I", 9), ImageFormatError, "refcount_order", False),
    ("extension length", lambda b: put(b, 116, ">I", 0x7FFFFFFF), ImageFormatError, "header extension", False),
    ("crypt", lambda b: put(b, 32, ">I", 2), ImageFormatError, "crypt_method", False),
    ("nb_snapshots huge", lambda b: put(b, 60, ">I", 1 << 20), ImageFormatError, "nb_snapshots", True),
    ("snapshots past eof", lambda b: put(b, 64, ">Q", 1 << 40), ImageFormatError, "snapshots_offset", True),
    ("snapshot extra size", lambda b: put(b, snap_off(b) + 36, ">I", 5000), ImageFormatError,
     "snapshot[0].extra_data_size", True),
    ("snapshot name not utf-8", lambda b: put(b, snap_off(b) + 65, ">B", 0xFF), ImageFormatError,
     "snapshot[0].name", True),
    ("snapshot id runs past table", lambda b: (put(b, snap_off(b) + 12, ">H", 0xFFFF), b.__delitem__(
        slice(snap_off(b) + 80, None)), put(b, 48, ">Q", 0x10000)), ImageFormatError, "snapshot", True),
    ("snapshot l1 size", lambda b: put(b, snap_off(b) + 8, ">I", 0x7FFFFFFF), ImageFormatError,
     "snapshot[0].l1_size", True),
    ("snapshot l1 offset", lambda b: put(b, snap_off(b), ">Q", 0x123), ImageFormatError,
     "snapshot[0].l1_table_offset", True),
    ("nb_snapshots too many for table", lambda b: put(b, 60, ">I", 300), ImageFormatError, "snapshot", True),
    ("unknown incompatible bit", lambda b: put(b, 72, ">Q", 1 << 10), UnsupportedFeatureError,
     "Unknown incompatible feature: 400", False),
    ("extended l2", lambda b: put(b, 72, ">Q", 1 << 4), UnsupportedFeatureError, "extended L2 entries", False),
    ("truncated", lambda b: b.__delitem__(slice(50, None)), ImageFormatError, "magic", False),
]


@pytest.mark.parametrize("name,mutate,exc,text,snap", CASES, ids=[c[0] for c in CASES])
def test_corrupt_header_fields(name: str, mutate: Callable[[bytearray], None], exc: type[Exception],
                               text: str, snap: bool) -> None:
    buf = base_image(snap)
    mutate(buf)
    t0 = time.monotonic()
    with pytest.raises(exc) as info:
        Qcow2Image(MemoryFile(buf))
    assert time.monotonic() - t0 < 2.0
    assert text in str(info.value)
    assert isinstance(info.value, SnaplabError)


def test_self_referencing_l1_reads_and_checks_without_hang() -> None:
    buf = base_image()
    l1_off = int(struct.unpack_from(">Q", buf, 40)[0])
    put(buf, l1_off, ">Q", l1_off | (1 << 63))  # L1[0] -> the L1 table itself
    img = Qcow2Image(MemoryFile(buf))
    t0 = time.monotonic()
    try:
        img.read(0, 1 << 20)
    except ImageCorruptError:
        pass
    res = img.check()
    assert res.corruptions > 0
    assert time.monotonic() - t0 < 5


def test_write_onto_metadata_marks_corrupt_and_goes_read_only() -> None:
    buf = base_image()
    l1_off = int(struct.unpack_from(">Q", buf, 40)[0])
    l2_off = int(struct.unpack_from(">Q", buf, l1_off)[0]) & 0x00FFFFFFFFFFFE00
    # L2[0] claims the refcount table cluster as its (exclusively owned) data.
    put(buf, l2_off, ">Q", 0x10000 | (1 << 63))
    f = MemoryFile(buf)
    img = Qcow2Image(f)
    before = bytes(f.data[0x10000:0x20000])
    with pytest.raises(ImageCorruptError, match="Preventing invalid write on metadata"):
        img.write(0, b"boom")
    assert bytes(f.data[0x10000:0x20000]) == before  # nothing overwritten
    with pytest.raises(ReadOnlyError):
        img.write(70000, b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = Qcow2Image(f)
    assert again.read_only and any("corrupt" in str(w.message) for w in caught)
    assert any("corrupt" in m for m in again.messages)


def test_refcount_underflow_is_refused_not_written() -> None:
    buf = base_image()
    # Refcount of the first data cluster dropped to 0 while L2 still points at it.
    f = MemoryFile(buf)
    img = Qcow2Image(f)
    l2 = img.l2_cache.get(int(img.l1_table[0]) & 0x00FFFFFFFFFFFE00)
    if l2 is None:
        img.read(0, 1)
        l2 = img.l2_cache[int(img.l1_table[0]) & 0x00FFFFFFFFFFFE00]
    data_cluster = (int(l2[0]) & 0x00FFFFFFFFFFFE00) >> 16
    put(buf, 0x20000 + 2 * data_cluster, ">H", 0)
    img = Qcow2Image(MemoryFile(buf))
    res = img.check()
    assert res.corruptions >= 1
    assert any(f"ERROR cluster {data_cluster} refcount=0 reference=1" in m for m in res.messages)
    img.snapshot_create("s")  # +1 works from the wrong base ...
    with pytest.raises(ImageCorruptError):
        img.snapshot_delete(name="s")
        img.write(0, b"x" * 65536)
        img.write(0, b"y" * 65536)
        img.write_zeroes(0, 65536)
        img.write_zeroes(0, 65536)
