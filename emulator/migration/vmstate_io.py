"""The VM-state area of a qcow2 node as a stream: QEMU's ``qemu_fopen_bdrv()``.

Reads and writes go to the image's vmstate area, past the end of the virtual disk
(``bdrv_save_vmstate`` / ``bdrv_load_vmstate``); a snapshot id reads a snapshot's VM state.
A read the file refuses is QEMU's ``Error -5 while loading VM state`` (the QEMUFile's error).
"""

from __future__ import annotations

from emulator.block.qcow2 import Qcow2Image
from emulator.errors import BlockIOError, LoadVMError


def load_error(err: BlockIOError) -> LoadVMError:
    """qemu_loadvm_state()'s result when the file below fails: ``Error -5 while loading VM
    state`` (-errno of the failed read), with the cause (docs/deviations.md, 22)."""
    cause = err.__cause__
    code = cause.errno if isinstance(cause, OSError) and cause.errno else 5
    return LoadVMError(err.strerror, -code)


class VMStateStream:
    """The vmstate area of ``img`` (or of one of its snapshots) as a positioned stream."""

    def __init__(self, img: Qcow2Image, snapshot_id: str | None = None, direct: bool = False) -> None:
        self.img = img
        self.snapshot_id = snapshot_id
        self.direct = direct  # reads and writes around the page cache (Qcow2Image.save_vmstate, load_vmstate)

    def write(self, pos: int, data: bytes | memoryview) -> None:
        self.img.save_vmstate(pos, data, direct=self.direct)

    def write_bulk(self, pos: int, data: memoryview) -> None:
        """A large run of RAM data: with ``direct``, whole clusters written without the image
        lock, so that several writers keep the disk busy (Qcow2Image.save_vmstate_bulk)."""
        if self.direct:
            self.img.save_vmstate_bulk(pos, data)
        else:
            self.img.save_vmstate(pos, data)

    def read(self, pos: int, n: int) -> bytes:
        buf = bytearray(n)
        self.readinto(pos, memoryview(buf))
        return bytes(buf)

    def readinto(self, pos: int, buf: memoryview) -> None:
        try:
            self.img.load_vmstate(pos, buf, self.snapshot_id, direct=self.direct)
        except BlockIOError as err:
            raise load_error(err) from err
