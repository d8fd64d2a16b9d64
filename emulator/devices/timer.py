"""Virtual clock and one-shot wake-up timer at 0x520.

IN 0x520 latches the virtual clock (ns, advances only while the guest runs) and returns its
low half; IN 0x524 returns the latched high half.  OUT 0x528 / 0x52C set a deadline (low,
then high half, which arms it): a following HLT sleeps until the clock reaches it, like an
APIC one-shot timer and an interrupt would.
"""

from __future__ import annotations

import struct
from collections.abc import Callable


class Timer:
    name = "timer"
    version = 1
    ports = range(0x520, 0x530)

    def __init__(self, clock_ns: Callable[[], int]) -> None:
        self._clock = clock_ns
        self.latched_high = 0
        self.deadline_low = 0
        self.deadline = 0  # 0: not armed

    def port_in(self, port: int, size: int) -> int:
        if port == 0x520:
            now = self._clock()
            self.latched_high = now >> 32
            return now & 0xFFFFFFFF
        if port == 0x524:
            return self.latched_high
        return 0

    def port_out(self, port: int, size: int, value: int) -> None:
        if port == 0x528:
            self.deadline_low = value & 0xFFFFFFFF
        elif port == 0x52C:
            self.deadline = ((value & 0xFFFFFFFF) << 32) | self.deadline_low

    def take_deadline(self) -> int:
        d, self.deadline = self.deadline, 0
        return d

    def reset(self) -> None:
        self.latched_high = self.deadline_low = self.deadline = 0

    def save_state(self) -> bytes:
        return struct.pack("<3Q", self.latched_high, self.deadline_low, self.deadline)

    def prepare_state(self, data: bytes, version: int) -> Callable[[], None]:
        latched_high, deadline_low, deadline = struct.unpack("<3Q", data)

        def apply() -> None:
            self.latched_high, self.deadline_low, self.deadline = latched_high, deadline_low, deadline
        return apply
