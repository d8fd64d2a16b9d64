"""A copy-on-write save whose writer fails while a guest write waits for a chunk buffer.

Every buffer is queued and a fault is waiting for one (back-pressure) when the disk refuses
the writer's first chunk: the waiting fault must be let go (its chunk unsaved), the save must
fail with the disk's error, and nothing may stay blocked.  Before the fix the fault thread
waited for a buffer that nobody would give back, forever.
"""

from __future__ import annotations

import threading

import pytest

from emulator.block import Qcow2Image
from emulator.block.io import BlkdebugFile
from emulator.errors import BlockIOError
from emulator.memory import GuestRAM
from emulator.migration.cow import PROT_RWX, PROT_RX, CowSave, TlbProtector


def test_a_failing_writer_lets_a_starved_fault_go() -> None:
    ram = GuestRAM(16 << 20, hugepages=False)
    img = Qcow2Image.in_memory(8 << 20)
    f = BlkdebugFile(img.file)
    img.replace_file(f)
    try:
        ram.write(0, b"\x5a" * 4096)  # chunk 0 has data: the writer must write it
        protector = TlbProtector(ram, lambda perms: None, lambda: None, PROT_RX, PROT_RWX)
        saver = CowSave(protector, ram, None, None, "m", [], max_buffers=1)
        pending = img.snapshot_prepare()
        saver.attach(img, pending, [])
        assert saver.save_or_wait(0)  # the fault path takes the one buffer and queues chunk 0
        waited: list[bool] = []
        starved = threading.Thread(target=lambda: waited.append(saver.save_or_wait(1)), daemon=True)
        starved.start()  # chunk 1: no buffer left, it waits for the writer
        f.fill(256 << 10)  # room for the stream's header, not for a 2 MiB chunk
        with pytest.raises(BlockIOError, match="No space left on device"):
            saver.run()
        starved.join(timeout=60)
        assert not starved.is_alive(), "a fault stayed waiting for a buffer"
        assert waited == [True]
        assert (saver.state == 2).all()  # every chunk let go
        img.snapshot_abort(pending)
        res = img.check()
        assert (res.leaks, res.corruptions) == (0, 0)
    finally:
        img.close()
        ram.close()
