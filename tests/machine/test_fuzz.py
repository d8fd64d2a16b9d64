"""Fuzz: guests running random bytes and random device requests never break the host side."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import keystone

from emulator.block import Qcow2Image
from emulator.block.node import BlockGraph
from emulator.machine import DiskSpec, Machine, MachineConfig
from emulator.runstate import RunState

RAM = 32 << 20
PORTS = [0x3F8, 0x3FD, 0x505, 0x510, 0x520, 0x524, 0x528, 0x52C, 0x530, 0x534, 0x538, 0x540, 0x544, 0x548,
         0x54C, 0x550, 0x560, 0x564, 0x568, 0x80, 0xCF8, 0xFFFF]


def test_random_instruction_streams() -> None:
    rng = random.Random(2024)
    with Machine(MachineConfig(ram_size=RAM)) as m:
        for _ in range(300):
            m.system_reset()
            m.ram.write(0x300000, bytes(rng.getrandbits(8) for _ in range(512)))
            m.cpu.pc = 0x300000
            fault = m.run_instructions(2000)
            assert fault is None or (fault.cause and isinstance(fault.pc, int))
            # Some streams exit with the guest halted on random data; the loop keeps going.
        m.system_reset()
        m.start()
        time.sleep(0.05)
        m.stop()
        assert m.state == RunState.PAUSED


def _port_program(rng: random.Random) -> str:
    lines = []
    for _ in range(200):
        port = rng.choice(PORTS)
        if rng.random() < 0.3:
            lines.append(f"mov dx, {port}; in eax, dx")
        else:
            val = rng.choice([0, 1, 2, 3, 0x1000, 0xFFFFFFFF, rng.getrandbits(32), 0x7F000])
            lines.append(f"mov dx, {port}; mov eax, {val}; out dx, eax")
    lines.append("hlt")
    return "\n".join(lines)


def test_random_device_requests(tmp_path: Path) -> None:
    rng = random.Random(7)
    disk = tmp_path / "d.qcow2"
    Qcow2Image.create(disk, 4 << 20).close()
    vars_ = tmp_path / "vars.fd"
    vars_.write_bytes(b"\xff" * (128 << 10))
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(disk), "node-name": "df"})
    g.add({"driver": "qcow2", "file": "df", "node-name": "disk0"})
    g.add({"driver": "file", "filename": str(vars_), "node-name": "vf"})
    g.add({"driver": "raw", "file": "vf", "node-name": "vars"})
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
    cfg = MachineConfig(ram_size=RAM, pflash1="vars", disks=[DiskSpec("disk0")])
    with Machine(cfg, g) as m:
        canary = bytes(range(256)) * 16
        m.ram.write(RAM - 4096, canary)
        for _ in range(60):
            m.system_reset()
            # Random descriptors where the guest may point the controller.
            for addr in (0, 0x1000, 0x7F000):
                m.ram.write(addr, struct.pack("<IIQQII", rng.randrange(5), rng.choice([1, 8, 0, 4096, 2**32 - 1]),
                                              rng.choice([0, 7, 8191, 2**63, rng.getrandbits(64)]),
                                              rng.choice([0x2000, RAM - 512, 2**64 - 1, rng.getrandbits(64)]),
                                              0, rng.choice([0, 1, 2**32 - 1])))
            code, _ = ks.asm(_port_program(rng), 0x300000)
            m.ram.write(0x300000, bytes(code))
            m.cpu.pc = 0x300000
            fault = m.run_instructions(5000)
            assert fault is None or "panic" in fault.cause, fault
        assert m.ram.read(RAM - 4096, 4096) == canary
        m.system_reset()
        m.start()
        m.stop()
    g.close()
    img = Qcow2Image.open(disk)
    assert img.check().clean
    assert len(vars_.read_bytes()) == 128 << 10
