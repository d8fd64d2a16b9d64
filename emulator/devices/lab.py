"""The lab port: the workload's progress reports, and a pvpanic-like panic port.

The guest keeps counters in its lab page (RAM 0x7000: iterations, bytes dirtied, disk ops,
errors, workload id) and rings the doorbell (OUT 0x510) once per batch, so reporting costs one
host call per batch, never one per store.  Each ring appends a sample (virtual ns, host
monotonic ns, counters) to a bounded ring buffer the lab reads to plot progress and stalls.
The ring is one numpy array, not a deque of objects: at ~10,000 samples a second a deque
would hold up to a million objects for the cyclic garbage collector to walk in every full
collection, with the GIL held, on whichever thread allocated.  While the guest runs, the
append is done by machine code without the GIL (emulator.devices.doorbell); :meth:`port_out` is the
same append in Python, for when the hook cannot (the clock stopped, no native hook).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from emulator.devices.doorbell import ControlBlock

LAB_PAGE = 0x7000
SLACK = 1 << 16  # ring rows beyond those kept: a reader's copy is not overwritten while it is made


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
        self._keep = keep
        # SLACK more rows than kept: the rows the writer fills while a reader copies
        self._ring = np.zeros((keep + SLACK, 6), dtype=np.uint64)  # pages committed as they fill
        self.doorbell = ControlBlock(0x510, self._ring)  # the ring's count lives in it
        self._loaded: tuple[int, ProgressSample] | None = None  # (count then, sample) of a load

    @property
    def last(self) -> ProgressSample:
        """The latest sample (or the one a load restored, until the guest rings again)."""
        n = self.doorbell.count
        if self._loaded is not None and self._loaded[0] == n:
            return self._loaded[1]
        if n == 0:
            return ProgressSample(0, 0, 0, 0, 0, 0)
        return ProgressSample(*self._ring[(n - 1) % len(self._ring)].tolist())

    def port_in(self, port: int, size: int) -> int:
        return 0

    def port_out(self, port: int, size: int, value: int) -> None:
        if port == 0x505:
            self._on_panic(value)
        elif port == 0x510:
            it, dirtied, disk, errors = struct.unpack("<4Q", self._read(LAB_PAGE, 32))
            self.doorbell.append((self._clock(), time.monotonic_ns(), it, dirtied, disk, errors))

    @property
    def count(self) -> int:
        """Samples appended so far: a bookmark for :meth:`history_since`."""
        return self.doorbell.count

    def history_array(self, last: int | None = None) -> np.ndarray:
        """The samples (or the ``last`` ones), oldest first, as rows of the six fields of
        :class:`ProgressSample`: a copy, safe while the vCPU thread keeps appending (the ring
        has :data:`SLACK` rows more than it keeps; a copy the writer overtook anyway is made
        again, and after three tries its overwritten rows are dropped from its start)."""
        return self._recent(lambda n: n if last is None else last)[0]

    def history_since(self, mark: int) -> tuple[np.ndarray, int]:
        """The samples appended after the first ``mark`` (at most the newest the ring keeps), as
        :meth:`history_array` gives them, and the count they end at: the next call's mark, so
        successive calls join without a gap or a sample read twice."""
        return self._recent(lambda n: n - mark)

    def _recent(self, wanted: Callable[[int], int]) -> tuple[np.ndarray, int]:
        """The ``wanted(count)`` newest samples (bounded by the count and what the ring keeps)
        and the count they end at."""
        for _ in range(3):
            n = self.doorbell.count
            want = max(0, min(wanted(n), n, self._keep))
            rows = _copy_rows(self._ring, n, want)
            lost = self.doorbell.count + 1 - n - (len(self._ring) - want)  # + 1: a row being written
            if lost <= 0:
                return rows, n
        return rows[lost:], n

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
            self._loaded = (self.doorbell.count, last)
        return apply


def _copy_rows(ring: np.ndarray, n: int, want: int) -> np.ndarray:
    """The ``want`` rows before the ``n``-th append, oldest first (a copy)."""
    end = n % len(ring)
    if want <= end:
        return ring[end - want:end].copy()
    return np.concatenate((ring[len(ring) - (want - end):], ring[:end]))
