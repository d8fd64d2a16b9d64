"""The VM-state area of a qcow2 node as a stream: QEMU's ``qemu_fopen_bdrv()``.

Reads and writes go to the image's vmstate area, past the end of the virtual disk
(``bdrv_save_vmstate`` / ``bdrv_load_vmstate``); a snapshot id reads a snapshot's VM state.
"""

from __future__ import annotations

from emulator.block.qcow2 import Qcow2Image


class VMStateStream:
    """The vmstate area of ``img`` (or of one of its snapshots) as a positioned stream."""

    def __init__(self, img: Qcow2Image, snapshot_id: str | None = None) -> None:
        self.img = img
        self.snapshot_id = snapshot_id

    def write(self, pos: int, data: bytes | memoryview) -> None:
        self.img.save_vmstate(pos, data)

    def read(self, pos: int, n: int) -> bytes:
        buf = bytearray(n)
        self.img.load_vmstate(pos, buf, self.snapshot_id)
        return bytes(buf)

    def readinto(self, pos: int, buf: memoryview) -> None:
        self.img.load_vmstate(pos, buf, self.snapshot_id)
