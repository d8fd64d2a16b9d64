"""The lab port's machine-code doorbell (emulator.devices.doorbell): the same samples as the Python
path, without a Python call; every other port still reaches Python, errors included."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from emulator.cpu import X86CPU
from emulator.devices.doorbell import DOORBELL_CODE, ControlBlock, build_doorbell
from emulator.devices.lab import LabPort
from emulator.guest import LAB_PAGE, assemble
from emulator.machine import Machine, MachineConfig
from emulator.memory import GuestRAM
from tests.machine.test_machine import graph_with, wait_for

CODE = 0x10000
PROGRAM = """
    mov dx, 0x3f8
    mov al, 0x41
    out dx, al
    mov dx, 0x510
    out dx, al
    out dx, al
    hlt
"""


def test_doorbell_code_rebuilds_byte_for_byte() -> None:
    assert build_doorbell() == DOORBELL_CODE


class _Bare:
    """A CPU with 16 MiB of RAM running :data:`PROGRAM`, its OUTs to a recording Python hook."""

    def __init__(self, offset: int | None, raise_on: int | None = None) -> None:
        self.ram = GuestRAM(16 << 20)
        self.cpu = X86CPU()
        self.cpu.map_ram(0, 16 << 20, self.ram.addr)
        self.ram.write(CODE, assemble(PROGRAM, CODE))
        self.ram.write(LAB_PAGE, np.array([11, 22, 33, 44], dtype="<u8").tobytes())
        self.ring = np.zeros((4, 6), dtype=np.uint64)
        self.block = ControlBlock(0x510, self.ring)
        self.block.set_counters(self.ram.addr + LAB_PAGE)
        self.block.set_clock_offset(offset)
        self.python: list[tuple[int, int]] = []
        self.raise_on = raise_on
        self.cpu.hook_ports(lambda port, size: 0, self._out, self.block)

    def _out(self, port: int, size: int, value: int) -> None:
        self.python.append((port, value))
        if port == self.raise_on:
            raise RuntimeError(f"device at {port:#x} failed")

    def run(self) -> None:
        self.cpu.pc = CODE
        self.cpu.run()

    def close(self) -> None:
        self.ram.close()


def test_native_doorbell_appends_the_row_and_passes_other_ports_on() -> None:
    b = _Bare(offset=-1000)
    try:
        assert b.cpu.native_out
        t0 = time.monotonic_ns()
        b.run()
        t1 = time.monotonic_ns()
        assert b.python == [(0x3F8, 0x41)]  # the serial port went to Python, the doorbell did not
        assert b.block.count == 2
        for row in b.ring[:2].tolist():
            vclock, host = row[0], row[1]
            assert t0 <= host <= t1 and vclock == host - 1000
            assert row[2:] == [11, 22, 33, 44]
        assert not b.ring[2:].any()
    finally:
        b.close()


def test_doorbell_goes_to_python_while_the_clock_is_stopped() -> None:
    b = _Bare(offset=None)
    try:
        b.run()
        assert b.python == [(0x3F8, 0x41), (0x510, 0x41), (0x510, 0x41)]
        assert b.block.count == 0  # the Python hook here records nothing: the lab port would
    finally:
        b.close()


def test_an_error_in_a_python_port_handler_behind_the_native_hook_reaches_the_caller() -> None:
    b = _Bare(offset=0, raise_on=0x3F8)
    try:
        with pytest.raises(RuntimeError, match="device at 0x3f8 failed"):
            b.run()
        assert b.python[0] == (0x3F8, 0x41)
    finally:
        b.close()


def test_history_copies_again_when_the_writer_overtook_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader racing the writer (simulated: rows appended during the copy) copies again,
    and after three overtaken tries keeps only the rows the writer cannot have reached."""
    import emulator.devices.lab as lab_mod

    monkeypatch.setattr(lab_mod, "SLACK", 2)
    lab = LabPort(lambda addr, n: bytes(n), lambda: 5, lambda code: None, keep=4)
    for i in range(6):
        lab.doorbell.append((i, i, i, 0, 0, 0))
    assert lab.history_array()[:, 0].tolist() == [2, 3, 4, 5]  # 6 rows in the ring, 4 kept
    real, bursts = lab_mod._copy_rows, [3]

    def racing(ring: np.ndarray, n: int, want: int) -> np.ndarray:
        for _ in range(bursts.pop(0) if bursts else 0):
            lab.doorbell.append((9, 9, 9, 0, 0, 0))
        return real(ring, n, want)

    monkeypatch.setattr(lab_mod, "_copy_rows", racing)
    assert lab.history_array()[:, 0].tolist() == [5, 9, 9, 9]  # overtaken once: copied again
    bursts[:] = [3, 3, 3]
    got = lab.history_array()[:, 0].tolist()
    assert got == [9, 9]  # overtaken three times: 3 + 1 (maybe being written) - 2 slack dropped


def test_native_ring_wraps() -> None:
    b = _Bare(offset=0)
    try:
        b.block.words[5] = len(b.ring) - 1  # COUNT: the next row is the ring's last
        b.run()
        assert b.block.count == len(b.ring) + 1
        assert b.ring[-1, 2:].tolist() == [11, 22, 33, 44] and b.ring[0, 2:].tolist() == [11, 22, 33, 44]
        assert not b.ring[1:-1].any()
    finally:
        b.close()


def test_without_executable_memory_the_python_hook_serves_every_port(monkeypatch: pytest.MonkeyPatch) -> None:
    import emulator.devices.doorbell as db

    def refuse() -> int:
        raise PermissionError(13, "mprotect refused")

    monkeypatch.setattr(db._Code, "address", staticmethod(refuse))
    b = _Bare(offset=0)
    try:
        assert not b.cpu.native_out
        b.run()
        assert b.python == [(0x3F8, 0x41), (0x510, 0x41), (0x510, 0x41)]
    finally:
        b.close()


def test_a_loaded_sample_is_last_until_the_guest_rings_again() -> None:
    lab = LabPort(lambda addr, n: bytes(n), lambda: 5, lambda code: None, keep=8)
    lab.doorbell.append((1, 2, 3, 4, 5, 6))
    loaded = np.array([7, 8, 9, 10, 11, 12], dtype="<u8").tobytes()
    lab.prepare_state(loaded, 1)()
    assert lab.last.iterations == 9 and lab.save_state() == loaded
    lab.doorbell.append((13, 14, 15, 16, 17, 18))
    assert lab.last.iterations == 15


@pytest.mark.parametrize("mode", ["native", "python"])
def test_machine_samples_and_virtual_clock_through_stop_and_cont(tmp_path: Path, mode: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths give the same samples: counters that grow, a virtual clock that stands
    still while the VM is stopped (its first sample after ``cont`` is not later by the pause)."""
    monkeypatch.setenv("SNAPLAB_DOORBELL", mode)
    calls = []
    orig = LabPort.port_out
    monkeypatch.setattr(LabPort, "port_out", lambda self, p, s, v: (calls.append(p), orig(self, p, s, v))[1])
    g = graph_with(tmp_path)
    with Machine(MachineConfig(ram_size=32 << 20, pflash1="fw-vars"), g) as m:
        assert m.board.cpu.native_out == (mode == "native")
        m.start()
        wait_for(lambda: m.lab.last.iterations > 1000)
        m.runctl.stop()
        before = m.lab.history_array()
        time.sleep(0.3)
        assert m.lab.doorbell.count == len(before)  # nothing rings while stopped
        m.cont()
        wait_for(lambda: m.lab.doorbell.count > len(before) + 10)
        after = m.lab.history_array()[len(before):].astype(np.int64)
        last = before[-1].astype(np.int64)
        vgap, hgap = after[0, 0] - last[0], after[0, 1] - last[1]
        assert vgap > 0 and hgap - vgap >= 0.3e9  # the virtual clock stood still for the pause
        rows = np.concatenate((before.astype(np.int64), after))
        assert (np.diff(rows[:, 0]) >= 0).all() and (np.diff(rows[:, 2]) >= 0).all()
        assert rows[-1, 2] > rows[0, 2]
    g.close()
    assert (0x510 in calls) == (mode == "python")
