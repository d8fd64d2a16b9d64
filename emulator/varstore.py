"""The UEFI-style variable store on pflash1: format, parser and template builder.

Layout (little-endian; full description in docs/varstore.md)::

    0   "SNVS"  u32 version=1  u32 store size  u32 header size=64  ... zero to 64
    64  records, each 8-byte aligned, until a u16 that is not 0x55AA (erased flash: 0xFFFF):
        +0  u16 start id 0x55AA
        +2  u8  state: 0x7F header valid, 0x3F added, 0x3E deleted (NOR: bits only cleared)
        +3  u8  reserved (0xFF)
        +4  u32 attributes (1 non-volatile, 2 boot service, 4 runtime)
        +8  u32 name size (bytes of UTF-16LE, NUL included)
        +12 u32 data size
        +16 GUID (16 bytes, as stored)
        +32 name, then data, then padding to 8

Mirrors the ideas of EDK2's authenticated-variable store (VARIABLE_STORE_HEADER,
VARIABLE_HEADER with StartId 0x55AA and State VAR_ADDED / VAR_DELETED) at OVMF_VARS.fd's size.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from emulator.errors import VarstoreError

STORE_SIZE = 128 * 1024
HEADER = struct.Struct("<4sIII")
HEADER_SIZE = 64
RECORD = struct.Struct("<HBBIII16s")
START_ID = 0x55AA
VAR_HEADER_VALID_ONLY = 0x7F
VAR_ADDED = 0x3F
VAR_DELETED = 0x3E
ATTR_NV_BS_RT = 7
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
SNAPLAB_VENDOR = uuid.UUID(bytes_le=bytes.fromhex("6c6162736e6170009e3779b97f4a7c15"))


@dataclass(frozen=True)
class Variable:
    name: str
    guid: uuid.UUID
    attributes: int
    data: bytes
    state: int
    offset: int

    @property
    def live(self) -> bool:
        return self.state == VAR_ADDED


def parse(store: bytes) -> list[Variable]:
    """Every record in the store, in order (deleted ones too); bounded by the store size."""
    magic, version, size, hsize = HEADER.unpack_from(store, 0)
    if magic != b"SNVS":
        raise VarstoreError("varstore: bad magic (expected 'SNVS')")
    if version != 1 or hsize != HEADER_SIZE or size != len(store):
        raise VarstoreError(f"varstore: unsupported header (version {version}, size {size}, header {hsize})")
    out = []
    pos = HEADER_SIZE
    while pos + RECORD.size <= len(store):
        start, state, _, attrs, nsize, dsize, guid = RECORD.unpack_from(store, pos)
        if start != START_ID:
            break
        end = pos + RECORD.size + nsize + dsize
        if end > len(store):
            raise VarstoreError(f"varstore: record at {pos:#x} runs past the end of the store")
        name = store[pos + 32:pos + 32 + nsize].decode("utf-16-le").rstrip("\0")
        data = bytes(store[pos + 32 + nsize:end])
        out.append(Variable(name, uuid.UUID(bytes_le=bytes(guid)), attrs, data, state, pos))
        pos = (end + 7) & ~7
    return out


def live(store: bytes) -> dict[tuple[str, uuid.UUID], Variable]:
    return {(v.name, v.guid): v for v in parse(store) if v.live}


def boot_count(store: bytes) -> int:
    v = live(store).get(("BootCount", SNAPLAB_VENDOR))
    return int.from_bytes(v.data[:4], "little") if v else 0


def record(name: str, guid: uuid.UUID, data: bytes, attributes: int = ATTR_NV_BS_RT,
           state: int = VAR_ADDED) -> bytes:
    n = (name + "\0").encode("utf-16-le")
    body = RECORD.pack(START_ID, state, 0xFF, attributes, len(n), len(data), guid.bytes_le) + n + data
    return body + b"\xff" * (-len(body) % 8)


def template(size: int = STORE_SIZE) -> bytes:
    """A fresh store: header, BootOrder = [0x0001], Boot0001 = "snaplab workload"."""
    buf = bytearray(b"\xff" * size)
    head = HEADER.pack(b"SNVS", 1, size, HEADER_SIZE)
    buf[0:HEADER_SIZE] = head + bytes(HEADER_SIZE - len(head))
    pos = HEADER_SIZE
    for rec in (record("BootOrder", EFI_GLOBAL_VARIABLE, struct.pack("<H", 1)),
                record("Boot0001", EFI_GLOBAL_VARIABLE, struct.pack("<IH", 1, 0) + "snaplab workload\0".encode("utf-16-le"))):
        buf[pos:pos + len(rec)] = rec
        pos += len(rec)
    return bytes(buf)
