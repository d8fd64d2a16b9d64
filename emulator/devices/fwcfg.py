"""fw_cfg at 0x560: 64-bit configuration values for the firmware and the workload.

OUT 0x560 selects a key; IN 0x564 / 0x568 read the low / high half (QEMU's fw_cfg, reduced
to numbered 64-bit items).  Keys are listed in data/guest/workloads.asm.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

KEY_SIGNATURE, KEY_RAM_SIZE, KEY_WORKLOAD, KEY_SEED, KEY_WORKING_SET = 0, 1, 2, 3, 4
KEY_NS_PER_BATCH, KEY_PATTERN, KEY_DISK_SECTORS, KEY_BATCH_PAGES, KEY_WS_OFFSET = 5, 6, 7, 8, 9


class FwCfg:
    name = "fw_cfg"
    version = 1
    ports = range(0x560, 0x570)

    def __init__(self, items: dict[int, int]) -> None:
        self.items = {KEY_SIGNATURE: 0x50414E53, **items}
        self.selected = 0

    def port_in(self, port: int, size: int) -> int:
        val = self.items.get(self.selected, 0)
        if port == 0x564:
            return val & 0xFFFFFFFF
        if port == 0x568:
            return (val >> 32) & 0xFFFFFFFF
        return 0

    def port_out(self, port: int, size: int, value: int) -> None:
        if port == 0x560:
            self.selected = value

    def reset(self) -> None:
        self.selected = 0

    def save_state(self) -> bytes:
        return struct.pack("<Q", self.selected)

    def prepare_state(self, data: bytes, version: int) -> Callable[[], None]:
        (selected,) = struct.unpack("<Q", data)

        def apply() -> None:
            self.selected = selected
        return apply
