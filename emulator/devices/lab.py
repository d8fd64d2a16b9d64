"""The lab port: the workload's progress reports, and a pvpanic-like panic port.

The guest keeps counters in its lab page (RAM 0x7000: iterations, bytes dirtied, disk ops,
errors, workload id) and rings the doorbell (OUT 0x510) once per batch, so reporting costs one
host call per batch, never one per store.  Each ring appends a sample (virtual ns, host
monotonic ns, counters) to a bounded ring buffer the lab reads to plot progress and stalls.
The ring is one numpy array, not a deque of objects: at ~10,000 samples a second a deque
would hold up to a million objects for the cyclic garbage collector to walk in every full
collection, with the GIL held, on whichever thread allocated.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LAB_PAGE = 0x7000


@dataclass(frozen=True)
class ProgressSample:
    vclock_ns: int
    host_ns: int
    iterations: int
    bytes_dirtied: int
    disk_ops: int
    errors: int


class LabPort:
    name = "lab"
    version = 1
    ports = range(0x505, 0x511)

    def __init__(self, read_ram: Callable[[int, int], bytes], clock_ns: Callable[[], int],
                 on_panic: Callable[[int], None], keep: int = 1 << 20) -> None:
        self._read = read_ram
        self._clock = clock_ns
        self._on_panic = on_panic
        self._ring = np.zeros((keep, 6), dtype=np.uint64)  # pages committed as they fill
        self._count = 0  # samples ever appended; the ring holds the last min(count, keep)
        self._samples_lock = threading.Lock()
        self.listeners: list[Callable[[ProgressSample], None]] = []
        self.last = ProgressSample(0, 0, 0, 0, 0, 0)

    def port_in(self, port: int, size: int) -> int:
        return 0

    def port_out(self, port: int, size: int, value: int) -> None:
        if port == 0x505:
            self._on_panic(value)
        elif port == 0x510:
            it, dirtied, disk, errors = struct.unpack("<4Q", self._read(LAB_PAGE, 32))
            s = ProgressSample(self._clock(), time.monotonic_ns(), it, dirtied, disk, errors)
            self.last = s
            with self._samples_lock:
                self._ring[self._count % len(self._ring)] = (s.vclock_ns, s.host_ns, it, dirtied, disk, errors)
                self._count += 1
            for cb in self.listeners:
                cb(s)

    def history_array(self, last: int | None = None) -> np.ndarray:
        """The samples (or the ``last`` ones), oldest first, as rows of the six fields of
        :class:`ProgressSample`: a copy, safe while the vCPU thread keeps appending."""
        with self._samples_lock:
            n, keep = self._count, len(self._ring)
            want = min(n, keep) if last is None else max(0, min(last, n, keep))
            end = n % keep
            if want <= end:
                return self._ring[end - want:end].copy()
            return np.concatenate((self._ring[keep - (want - end):], self._ring[:end]))

    def history(self, last: int | None = None) -> list[ProgressSample]:
        """The samples (or the ``last`` ones), oldest first."""
        return [ProgressSample(*row) for row in self.history_array(last).tolist()]

    def reset(self) -> None:
        pass

    def save_state(self) -> bytes:
        s = self.last
        return struct.pack("<6Q", s.vclock_ns, s.host_ns, s.iterations, s.bytes_dirtied, s.disk_ops, s.errors)

    def prepare_state(self, data: bytes, version: int) -> Callable[[], None]:
        last = ProgressSample(*struct.unpack("<6Q", data))

        def apply() -> None:
            self.last = last
        return apply
