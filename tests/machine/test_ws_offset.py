"""The dirty workload's working set placed away from the start of RAM (fw_cfg key 9)."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.guest import DATA_BASE, WorkloadSpec, expected_generations
from emulator.machine import Machine, MachineConfig

RAM = 32 << 20


def test_working_set_at_an_offset_is_stamped_there_and_matches_the_model() -> None:
    spec = WorkloadSpec("dirty", seed=7, working_set=2 << 20, pattern="random", batch_pages=32,
                        ws_offset=16 << 20)
    with Machine(MachineConfig(ram_size=RAM, workload=spec)) as m:
        while m.lab.last.iterations < 20_000:
            assert m.run_instructions(200_000) is None
        iters = m.ram.read_u64(0x7000)
        n = spec.pages(RAM)
        pages = np.frombuffer(m.ram.read(spec.base, n * 4096), dtype=np.uint64).reshape(n, 512)
        below = np.frombuffer(m.ram.read(DATA_BASE, spec.ws_offset), dtype=np.uint64)
    assert not below.any()  # nothing between DATA_BASE and the working set was written
    stamp = pages[:, 0]
    exp = expected_generations(spec, RAM, iters)
    newer = stamp > iters
    assert (stamp[~newer] == exp[~newer]).all()
    assert (stamp != 0).sum() > n // 2


def test_a_working_set_offset_past_ram_is_refused() -> None:
    with pytest.raises(ValueError, match="ws_offset"):
        WorkloadSpec("dirty", ws_offset=RAM).pages(RAM)
    with pytest.raises(ValueError, match="multiple of 4096"):
        WorkloadSpec("dirty", ws_offset=100)
