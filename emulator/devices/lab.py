"""The lab port: the workload's progress reports, and a pvpanic-like panic port.

The guest keeps counters in its lab page (RAM 0x7000: iterations, bytes dirtied, disk ops,
errors, workload id) and rings the doorbell (OUT 0x510) once per batch, so reporting costs one
host call per batch, never one per store.  Each ring appends a sample (virtual ns, host
monotonic ns, counters) to a bounded ring buffer the lab reads to plot progress and stalls.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

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
        self.samples: deque[ProgressSample] = deque(maxlen=keep)  # read it through history()
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
                self.samples.append(s)
            for cb in self.listeners:
                cb(s)

    def history(self) -> list[ProgressSample]:
        """A copy of the samples, safe while the vCPU thread keeps appending."""
        with self._samples_lock:
            return list(self.samples)

    def reset(self) -> None:
        pass

    def save_state(self) -> bytes:
        s = self.last
        return struct.pack("<6Q", s.vclock_ns, s.host_ns, s.iterations, s.bytes_dirtied, s.disk_ops, s.errors)

    def load_state(self, data: bytes, version: int) -> None:
        self.last = ProgressSample(*struct.unpack("<6Q", data))
