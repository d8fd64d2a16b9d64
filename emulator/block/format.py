"""qcow2 on-disk layouts: header, header extensions, snapshot table entries, masks.

Mirrors the structures of QEMU's block/qcow2.h (``QCowHeader``, ``QCowSnapshotHeader``,
``QCowSnapshotExtraData``) and the field descriptions of docs/interop/qcow2.txt.
Only layout lives here: parsing and packing of bytes, no live state and no I/O.
Imports neither unicorn nor asyncio.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from emulator.errors import ImageFormatError

QCOW_MAGIC = 0x514649FB  # "QFI\xfb"

# qcow2 spec: "L1 table entry", "Standard Cluster Descriptor"
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_BITS = 16

# Caps QEMU applies to what an image may ask of us (block/qcow2.h).
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024  # bytes
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024  # bytes
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS  # bytes of snapshot table
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_FILE_END = (1 << 63) - 1  # INT64_MAX: where qcow2_validate_table() lets a table end
QCOW2_MAX_HEADER_LENGTH = 1 << 20

# Incompatible feature bits (qcow2 spec: header bytes 72-79)
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
# Compatible feature bits (bytes 80-87)
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits (bytes 88-95)
QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Header extension types (qcow2 spec: "Header extensions")
QCOW2_EXT_MAGIC_END = 0
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441

FEATURE_TYPE_INCOMPATIBLE = 0
FEATURE_TYPE_COMPATIBLE = 1
FEATURE_TYPE_AUTOCLEAR = 2

# The feature name table QEMU 7.2 writes into every new v3 image.
QEMU_FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (FEATURE_TYPE_INCOMPATIBLE, 0, "dirty bit"),
    (FEATURE_TYPE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEATURE_TYPE_INCOMPATIBLE, 2, "external data file"),
    (FEATURE_TYPE_INCOMPATIBLE, 3, "compression type"),
    (FEATURE_TYPE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEATURE_TYPE_COMPATIBLE, 0, "lazy refcounts"),
    (FEATURE_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_TYPE_AUTOCLEAR, 1, "raw external data"),
)

_HEADER_V2 = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3 = struct.Struct(">QQQII")  # 32 more bytes: 72..103
HEADER_V2_SIZE = _HEADER_V2.size
HEADER_V3_SIZE = HEADER_V2_SIZE + _HEADER_V3.size  # 104
# Bytes 36..71 hold every pointer a metadata commit switches: l1_size,
# l1_table_offset, refcount_table_offset, refcount_table_clusters,
# nb_snapshots and snapshots_offset.  One write of them is one commit.
HEADER_POINTERS = struct.Struct(">IQQIIQ")
HEADER_POINTERS_OFFSET = 36
HEADER_INCOMPAT_OFFSET = 72
HEADER_AUTOCLEAR_OFFSET = 88

_EXT_HEADER = struct.Struct(">II")
_FEATURE_ENTRY = struct.Struct(">BB46s")

SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # QCowSnapshotHeader, 40 bytes
SNAPSHOT_EXTRA = struct.Struct(">QQQ")  # QCowSnapshotExtraData: vm_state_size_large, disk_size, icount
SNAPSHOT_EXTRA_V3_MIN = 16  # "Version 3 images must include extra data at least up to byte 55"


@dataclass(frozen=True)
class HeaderExtension:
    """One header extension, kept as raw bytes so unknown ones survive untouched."""

    magic: int
    data: bytes


@dataclass(frozen=True)
class QCowHeader:
    """The qcow2 header (qcow2 spec: "Header"), versions 2 and 3."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    backing_file_offset: int = 0
    backing_file_size: int = 0
    crypt_method: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 112
    compression_type: int = 0
    extensions: tuple[HeaderExtension, ...] = field(default=())
    backing_file: str = ""  # the name at backing_file_offset (qcow2 spec: "Header", bytes 8-15)

    @property
    def backing_format(self) -> str:
        """The backing file format header extension's text ("" when absent)."""
        for ext in self.extensions:
            if ext.magic == QCOW2_EXT_MAGIC_BACKING_FORMAT:
                return ext.data.decode("utf-8", "replace")
        return ""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def with_pointers(self, **kw: int) -> QCowHeader:
        return replace(self, **kw)  # type: ignore[arg-type]

    def pack_pointers(self) -> bytes:
        """Bytes 36..71: the fields a metadata commit switches in one write."""
        return HEADER_POINTERS.pack(
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )

    def pack(self) -> bytes:
        """The whole header with its extensions (used when creating an image)."""
        out = bytearray(
            _HEADER_V2.pack(
                QCOW_MAGIC,
                self.version,
                self.backing_file_offset,
                self.backing_file_size,
                self.cluster_bits,
                self.size,
                self.crypt_method,
                self.l1_size,
                self.l1_table_offset,
                self.refcount_table_offset,
                self.refcount_table_clusters,
                self.nb_snapshots,
                self.snapshots_offset,
            )
        )
        if self.version >= 3:
            out += _HEADER_V3.pack(
                self.incompatible_features,
                self.compatible_features,
                self.autoclear_features,
                self.refcount_order,
                self.header_length,
            )
            if self.header_length > HEADER_V3_SIZE:
                out.append(self.compression_type)
            out += bytes(self.header_length - len(out))
        for ext in self.extensions:
            out += _EXT_HEADER.pack(ext.magic, len(ext.data)) + ext.data
            out += bytes(-len(ext.data) % 8)
        out += _EXT_HEADER.pack(QCOW2_EXT_MAGIC_END, 0)
        return bytes(out)


def feature_table_extension(names: tuple[tuple[int, int, str], ...] = QEMU_FEATURE_NAMES) -> HeaderExtension:
    """The feature name table extension (type, bit, 46-byte name per entry)."""
    data = b"".join(_FEATURE_ENTRY.pack(t, b, n.encode()) for t, b, n in names)
    return HeaderExtension(QCOW2_EXT_MAGIC_FEATURE_TABLE, data)


def parse_feature_table(data: bytes) -> dict[tuple[int, int], str]:
    names: dict[tuple[int, int], str] = {}
    for off in range(0, len(data) - _FEATURE_ENTRY.size + 1, _FEATURE_ENTRY.size):
        t, b, raw = _FEATURE_ENTRY.unpack_from(data, off)
        names[(t, b)] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return names


def new_image_layout(size: int, cluster_size: int, refcount_bits: int, version: int,
                     backing_file: str = "", backing_fmt: str = "") -> list[tuple[int, bytes]]:
    """What qcow2_co_create() writes for a new, empty image: (offset, bytes) in write order.

    Laid out as qemu-img 7.2 does: the header (with the backing format extension, then the
    feature name table on v3, then the backing file name right after the end marker, as
    qcow2_update_header() places them) padded to a cluster, the refcount table in cluster 1,
    the refcount blocks after it, then a zeroed L1 table.  Options QEMU refuses raise
    ImageFormatError naming the option.
    """
    if cluster_size & (cluster_size - 1) or not (1 << MIN_CLUSTER_BITS) <= cluster_size <= (1 << MAX_CLUSTER_BITS):
        raise ImageFormatError("cluster_size", "Cluster size must be a power of two between 512 and 2048k")
    if refcount_bits not in (8, 16, 32, 64):
        raise ImageFormatError("refcount_bits", "Refcount width must be 8, 16, 32 or 64 bits in snaplab")
    if version not in (2, 3):
        raise ImageFormatError("version", f"Unsupported qcow2 version {version}")
    if version == 2 and refcount_bits != 16:
        raise ImageFormatError("refcount_bits", "Different refcount widths than 16 bits require compatibility level 1.1 or above")
    if size < 0 or size % 512:
        raise ImageFormatError("size", "Image size must be a non-negative multiple of 512 bytes")
    cbits = cluster_size.bit_length() - 1
    order = refcount_bits.bit_length() - 1
    l2_bits = cbits - 3
    l1_size = -(-size // (1 << (cbits + l2_bits)))
    if l1_size * 8 > (32 << 20):
        raise ImageFormatError("size", "Image is too big for this cluster size")
    l1_clusters = -(-(l1_size * 8) // cluster_size)
    epb = 1 << (cbits + 3 - order)  # refcount entries per block
    rt_clusters = 1
    nblocks = 1
    while True:  # the refcount blocks must count themselves and the table
        total = 1 + rt_clusters + nblocks + l1_clusters
        need_blocks = -(-total // epb)
        need_rt = -(-(need_blocks * 8) // cluster_size)
        if need_blocks == nblocks and need_rt == rt_clusters:
            break
        nblocks, rt_clusters = need_blocks, need_rt
    rt_off = cluster_size
    rb_off = rt_off + rt_clusters * cluster_size
    l1_off = rb_off + nblocks * cluster_size
    exts: tuple[HeaderExtension, ...] = (feature_table_extension(),) if version == 3 else ()
    if backing_fmt:
        exts = (HeaderExtension(QCOW2_EXT_MAGIC_BACKING_FORMAT, backing_fmt.encode()), *exts)
    name = backing_file.encode()
    if len(name) > 1023:
        raise ImageFormatError("backing_file", "Backing file name too long")
    header = QCowHeader(
        version=version, cluster_bits=cbits, size=size, l1_size=l1_size,
        l1_table_offset=l1_off if l1_size else 0, refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters, nb_snapshots=0, snapshots_offset=0,
        refcount_order=order, header_length=112 if version == 3 else 72, extensions=exts)
    raw = header.pack()
    if len(raw) + len(name) > cluster_size:
        header = replace(header, extensions=tuple(e for e in exts if e.magic != QCOW2_EXT_MAGIC_FEATURE_TABLE))
        raw = header.pack()
    if name:
        header = replace(header, backing_file_offset=len(raw), backing_file_size=len(name), backing_file=backing_file)
        raw = header.pack() + name
    table = b"".join((rb_off + i * cluster_size).to_bytes(8, "big") for i in range(nblocks))
    entry = refcount_bits // 8
    used = 1 + rt_clusters + nblocks + l1_clusters
    writes = [
        (0, raw + bytes(cluster_size - len(raw))),
        (rt_off, table + bytes(rt_clusters * cluster_size - len(table))),
        (rb_off, (1).to_bytes(entry, "big") * used + bytes((nblocks * epb - used) * entry)),
    ]
    if l1_clusters:
        writes.append((l1_off, bytes(l1_clusters * cluster_size)))
    return writes


def parse_header(buf: bytes, file_size: int, *, for_check: bool = False) -> QCowHeader:
    """Parse and validate a header; errors name the offending field.

    Mirrors the checks at the top of QEMU's qcow2_do_open(), with its bounds, in its order:
    the version-independent fields, the version 3 fields, the feature-independent field
    checks, the metadata tables, then the header extensions.  ``buf`` must hold at least the
    first cluster or the whole file if smaller.  ``for_check`` is QEMU's ``BDRV_O_CHECK``
    open: tables are held only to QEMU's own rules (aligned, no overflow; a table past the
    end of the file reads as zeros, for the check to report), and the snapshot table is left
    to the check (:func:`emulator.block.snapshot.read_snapshots_for_check`).
    """
    h = _parse_v2_fields(buf)
    if h.version == 3:
        h = _parse_v3_fields(buf, h)
    _check_fields(h)
    _check_tables(h, file_size, for_check)
    if h.version == 3:
        h = replace(h, extensions=_parse_extensions(buf, h.header_length, h.backing_file_offset, h.cluster_size))
    elif h.backing_file_offset:  # qcow2_do_open() reads a version 2 image's extensions too
        try:
            h = replace(h, extensions=_parse_extensions(buf, 72, h.backing_file_offset, h.cluster_size))
        except ImageFormatError:
            pass  # an old image with its backing name right after the header: no extensions
    if h.backing_file_offset:
        raw = bytes(buf[h.backing_file_offset:h.backing_file_offset + h.backing_file_size])
        try:
            h = replace(h, backing_file=raw.decode())
        except UnicodeDecodeError as err:
            raise ImageFormatError("backing_file_offset", "Backing file name is not valid UTF-8") from err
    return h


def _parse_v2_fields(buf: bytes) -> QCowHeader:
    """Bytes 0..71, present in every version: magic, version and cluster size are checked."""
    if len(buf) < HEADER_V2_SIZE:
        raise ImageFormatError("magic", "Image is not in qcow2 format: file too short for a header")
    (
        magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _HEADER_V2.unpack_from(buf, 0)
    if magic != QCOW_MAGIC:
        raise ImageFormatError("magic", "Image is not in qcow2 format")
    if version not in (2, 3):
        raise ImageFormatError("version", f"Unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageFormatError("cluster_bits", f"Unsupported cluster size: 2^{cluster_bits}")
    return QCowHeader(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size,
        crypt_method=crypt_method,
        refcount_order=4,
        header_length=HEADER_V2_SIZE,
    )


def _parse_v3_fields(buf: bytes, h: QCowHeader) -> QCowHeader:
    """Bytes 72..103 (feature bits, refcount_order, header_length) and the compression type."""
    if len(buf) < HEADER_V3_SIZE:
        raise ImageFormatError("header_length", "qcow2 header is truncated")
    incompat, compat, autoclear, refcount_order, header_length = _HEADER_V3.unpack_from(buf, HEADER_V2_SIZE)
    if header_length < HEADER_V3_SIZE:
        raise ImageFormatError("header_length", "qcow2 header too short")
    if header_length > h.cluster_size:
        raise ImageFormatError("header_length", "qcow2 header exceeds cluster size")
    if header_length > len(buf):
        raise ImageFormatError("header_length", "qcow2 header is truncated")
    compression_type = buf[HEADER_V3_SIZE] if header_length > HEADER_V3_SIZE else 0
    return replace(h, incompatible_features=incompat, compatible_features=compat, autoclear_features=autoclear,
                   refcount_order=refcount_order, header_length=header_length, compression_type=compression_type)


def _check_fields(h: QCowHeader) -> None:
    """refcount_order, encryption and the backing file name's place."""
    if h.refcount_order > 6:
        raise ImageFormatError("refcount_order", "Reference count entry width too large; may not exceed 64 bits")
    if h.crypt_method != 0:
        raise ImageFormatError("crypt_method", f"Unsupported encryption method: {h.crypt_method}")
    cluster_size = h.cluster_size
    if h.backing_file_offset:
        if (h.backing_file_offset > cluster_size or h.backing_file_size > 1023
                or h.backing_file_offset + h.backing_file_size > cluster_size):
            raise ImageFormatError("backing_file_offset", "Backing file name too long or outside the header cluster")


def _check_tables(h: QCowHeader, file_size: int, for_check: bool = False) -> None:
    """The refcount table, the snapshot table and the active L1 table: sizes and places
    (``for_check``: no end-of-file test, no snapshot table, as with QEMU's ``BDRV_O_CHECK``)."""
    cluster_size = h.cluster_size
    if for_check:
        file_size = QCOW_MAX_FILE_END
    # Refcount table (qcow2_do_open: "Reference count table too large", "...offset invalid")
    if h.refcount_table_clusters == 0:
        raise ImageFormatError("refcount_table_clusters", "Image does not contain a reference count table")
    if h.refcount_table_clusters * cluster_size > QCOW_MAX_REFTABLE_SIZE:
        raise ImageFormatError("refcount_table_clusters", "Reference count table too large")
    _check_table("refcount_table_offset", "Reference count table", h.refcount_table_offset,
                 h.refcount_table_clusters * cluster_size, cluster_size, file_size)
    # Snapshot table (in a check, read and judged by the check: qcow2_check_read_snapshot_table)
    if not for_check:
        check_snapshot_table_pointer(h, file_size)
    # L1 table
    if h.l1_size * 8 > QCOW_MAX_L1_SIZE:
        raise ImageFormatError("l1_size", "Active L1 table too large")
    l2_bits = h.cluster_bits - 3
    shift = h.cluster_bits + l2_bits
    min_l1 = -(-h.size // (1 << shift))
    if h.size > (1 << 62) or min_l1 * 8 > QCOW_MAX_L1_SIZE:
        raise ImageFormatError("size", "Image is too big")
    if h.l1_size < min_l1:
        raise ImageFormatError("l1_size", "L1 table is too small")
    if h.l1_size:
        _check_table("l1_table_offset", "Active L1 table", h.l1_table_offset, h.l1_size * 8, cluster_size, file_size)


def check_snapshot_table_pointer(h: QCowHeader, file_size: int = 0) -> None:
    """The snapshot table's count and place (qcow2_validate_table() on it); ``file_size`` 0:
    no end-of-file test (QEMU has none)."""
    if h.nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise ImageFormatError("nb_snapshots", "Snapshot table too large")
    if h.nb_snapshots:
        _check_table("snapshots_offset", "Snapshot table", h.snapshots_offset,
                     h.nb_snapshots * SNAPSHOT_HEADER.size, h.cluster_size, file_size or QCOW_MAX_FILE_END)
    elif h.snapshots_offset % h.cluster_size:
        raise ImageFormatError("snapshots_offset", "Snapshot table offset invalid")


def _check_table(fieldname: str, what: str, offset: int, length: int, cluster_size: int, file_size: int) -> None:
    """QEMU's qcow2_validate_table(): aligned, inside the file, no overflow."""
    if offset % cluster_size:
        raise ImageFormatError(fieldname, f"{what} offset invalid: {offset:#x} is not cluster-aligned")
    if offset == 0:
        raise ImageFormatError(fieldname, f"{what} offset invalid: it overlaps the header")
    if offset + length > file_size:
        raise ImageFormatError(fieldname, f"{what} offset invalid: {offset:#x}+{length:#x} lies past the end of the file ({file_size:#x})")


def _parse_extensions(buf: bytes, start: int, end_hint: int, cluster_size: int) -> tuple[HeaderExtension, ...]:
    """Read header extensions up to the end marker (qcow2_read_extensions)."""
    end = min(len(buf), cluster_size)
    if end_hint:
        end = min(end, end_hint)
    exts: list[HeaderExtension] = []
    off = start
    while True:
        if off + _EXT_HEADER.size > end:
            raise ImageFormatError("header extension", f"Header extension at {off:#x} runs past the header cluster")
        magic, length = _EXT_HEADER.unpack_from(buf, off)
        off += _EXT_HEADER.size
        if magic == QCOW2_EXT_MAGIC_END:
            return tuple(exts)
        if off + length > end:
            raise ImageFormatError("header extension", f"Header extension {magic:#x} has length {length}, too large")
        exts.append(HeaderExtension(magic, bytes(buf[off:off + length])))
        off += (length + 7) & ~7


@dataclass(frozen=True)
class QCowSnapshotHeader:
    """One snapshot table entry as stored (qcow2 spec: "Snapshot table entry")."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None  # None: no icount stored; -1: "icount was disabled"
    unknown_extra: bytes = b""

    def pack(self) -> bytes:
        ident = self.id_str.encode()
        name = self.name.encode()
        extra = bytearray(SNAPSHOT_EXTRA.pack(
            self.vm_state_size,
            self.disk_size or 0,
            (self.icount if self.icount is not None else -1) & 0xFFFFFFFFFFFFFFFF,
        ))
        extra += self.unknown_extra
        head = SNAPSHOT_HEADER.pack(
            self.l1_table_offset,
            self.l1_size,
            len(ident),
            len(name),
            self.date_sec,
            self.date_nsec,
            self.vm_clock_nsec,
            min(self.vm_state_size, 0xFFFFFFFF),
            len(extra),
        )
        out = head + bytes(extra) + ident + name
        return out + bytes(-len(out) % 8)


def parse_snapshot_table(buf: bytes, nb_snapshots: int, version: int, *,
                         incomplete: list[int] | None = None) -> tuple[list[QCowSnapshotHeader], int]:
    """Parse ``nb_snapshots`` entries from ``buf``; returns them and the bytes used (to the
    end of the last entry: QEMU's ``snapshots_size``).

    Mirrors qcow2_read_snapshots(): every length is checked against the buffer and
    QEMU's caps, and errors name the field of the entry that is wrong.  A version 3 entry
    with less than 16 bytes of extra data is refused, or, given ``incomplete``, listed there
    (what qcow2_check_read_snapshot_table() counts as a corruption).
    """
    out: list[QCowSnapshotHeader] = []
    off = end = 0
    for i in range(nb_snapshots):
        where = f"snapshot[{i}]"
        if off + SNAPSHOT_HEADER.size > len(buf):
            raise ImageFormatError(f"{where}", "Snapshot table entry runs past the end of the snapshot table")
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state32,
         extra_size) = SNAPSHOT_HEADER.unpack_from(buf, off)
        off += SNAPSHOT_HEADER.size
        if extra_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise ImageFormatError(f"{where}.extra_data_size", f"Too much extra metadata in snapshot table entry {i}")
        if off + extra_size + id_len + name_len > len(buf):
            raise ImageFormatError(f"{where}.extra_data_size", "Snapshot table entry runs past the end of the snapshot table")
        extra = buf[off:off + extra_size]
        off += extra_size
        vm_state = vm_state32
        disk_size: int | None = None
        icount: int | None = None
        if extra_size >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if extra_size >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_size >= 24:
            raw = struct.unpack_from(">Q", extra, 16)[0]
            icount = raw - (1 << 64) if raw >= 1 << 63 else raw
        if version >= 3 and extra_size < SNAPSHOT_EXTRA_V3_MIN and incomplete is not None:
            incomplete.append(i)
        elif version >= 3 and extra_size < SNAPSHOT_EXTRA_V3_MIN:
            raise ImageFormatError(f"{where}.extra_data_size", "Extra snapshot data is too small for a version 3 image")
        if l1_size * 8 > QCOW_MAX_L1_SIZE and incomplete is None:  # (a check reports it)
            raise ImageFormatError(f"{where}.l1_size", f"Snapshot L1 table too large in snapshot table entry {i}")
        try:
            ident = bytes(buf[off:off + id_len]).decode()
            name = bytes(buf[off + id_len:off + id_len + name_len]).decode()
        except UnicodeDecodeError as err:
            raise ImageFormatError(f"{where}.name", "Snapshot id or name is not valid UTF-8") from err
        off += id_len + name_len
        end = off
        off += -off % 8
        out.append(QCowSnapshotHeader(l1_off, l1_size, ident, name, date_sec, date_nsec, vm_clock,
                                      vm_state, disk_size, icount, bytes(extra[24:])))
    return out, end
