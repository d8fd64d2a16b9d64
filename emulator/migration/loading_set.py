"""A snapshot's loading set: the RAM chunks a guest touches first after a restore, in order.

snaplab's own addition to the VM-state stream (QEMU has none): a versioned trailer *after*
the stream's EOF marker, so a reader that stops at EOF (QEMU's ``qemu_loadvm_state``, or an
older snaplab) sees no loading set at all.  Every save writes it empty, with room for every
2 MiB chunk of RAM (4 bytes per chunk: 2 KiB per GiB); the first lazy load that records one
writes it in place (REAP, ASPLOS'21: record the pages touched after the first restore,
prefetch exactly those next time; FaaSnap, EuroSys'22: in access order).  Layout, big-endian
like the rest of the stream::

    8 bytes  magic "SNAPLSET"
    u32      version (1)
    u32      capacity: chunk entries reserved
    u32      count: entries recorded (0: none yet)
    u32      source: 0 none, 1 recorded after a restore, 2 recorded in a copy-on-write save's window
    u32      window: milliseconds after RESUME the recording covered
    u32      reserved (0)
    u32      chunk index, ``capacity`` times (the first ``count`` in first-touch order)

A copy-on-write save records its set itself (source 2): the chunks the guest wrote in the first
:data:`WINDOW_S` after the stop, in the order of their first write faults.  A restored guest
starts from that same instant, so it touches them again first; a chunk it only reads is not in
that set (write protection sees writes only), and it is read at its fault.

A trailer that does not parse (damaged, or a newer version) reads as absent: the loading set
only orders the fill, it never decides what RAM contains.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

LSET_MAGIC = b"SNAPLSET"
LSET_VERSION = 1
LSET_CHUNK = 2 << 20  # the granularity of lazy restore (postcopy.py / cow.py CHUNK)
SOURCE_NONE, SOURCE_RESTORE, SOURCE_COW_WINDOW = 0, 1, 2
WINDOW_S = 0.5  # how long after RESUME (or a copy-on-write save's stop) first touches are recorded
_HEAD = struct.Struct(">8sIIIIII")
HEAD_SIZE = _HEAD.size


@dataclass
class LoadingSet:
    """Where a snapshot's trailer lies in its VM state, and what it holds."""

    pos: int  # stream offset of the trailer
    capacity: int
    chunks: np.ndarray  # uint32, first-touch order
    source: int = SOURCE_NONE
    window_ms: int = 0

    @property
    def recorded(self) -> bool:
        return len(self.chunks) > 0

    def encode(self) -> bytes:
        """The whole trailer, ready to be written at :attr:`pos`."""
        n = min(len(self.chunks), self.capacity)
        body = np.zeros(self.capacity, dtype=">u4")
        body[:n] = self.chunks[:n]
        return _HEAD.pack(LSET_MAGIC, LSET_VERSION, self.capacity, n, self.source, self.window_ms, 0) + body.tobytes()


def capacity_for(ram_size: int) -> int:
    return -(-ram_size // LSET_CHUNK)


def empty_trailer(ram_size: int) -> bytes:
    """What every save writes after EOF: room for every chunk, nothing recorded."""
    return LoadingSet(0, capacity_for(ram_size), np.zeros(0, dtype=np.uint32)).encode()


def recorded_trailer(ram_size: int, chunks: list[int], source: int, window_ms: int) -> bytes:
    """A trailer holding ``chunks`` (first-touch order) as the loading set, with room for every
    chunk (so a later recording can be written in place too)."""
    return LoadingSet(0, capacity_for(ram_size), np.array(chunks, dtype=np.uint32), source, window_ms).encode()


def parse_trailer(data: bytes, pos: int, ram_size: int) -> LoadingSet | None:
    """The trailer in ``data`` (the stream's bytes after EOF, starting at stream offset ``pos``);
    None when there is none or it does not parse."""
    if len(data) < HEAD_SIZE:
        return None
    magic, version, cap, count, source, window_ms, _ = _HEAD.unpack_from(data)
    if magic != LSET_MAGIC or version != LSET_VERSION or count > cap or len(data) < HEAD_SIZE + 4 * cap:
        return None
    if cap != capacity_for(ram_size):
        return None
    chunks = np.frombuffer(data, dtype=">u4", count=count, offset=HEAD_SIZE).astype(np.uint32)
    if count and int(chunks.max()) >= cap:
        return None
    return LoadingSet(pos, cap, chunks, source, window_ms)
