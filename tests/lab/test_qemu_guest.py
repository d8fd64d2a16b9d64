"""snaplab's guest programs on the real QEMU (emulator/qemu_guest.py, lab/qemu.py): the image
rebuilds byte for byte, boots under qemu-system-x86_64, reports progress on its debug console,
and runs the same page sequence as on snaplab (every data page's generation stamp equals the
host model's at the guest's own iteration counter)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from emulator import qemu_guest
from emulator.guest import DATA_BASE, WorkloadSpec, expected_generations
from lab import qemu as qemu_lab


def _need_qemu() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-system-x86_64 is missing in CI (.ci/run installs qemu-system-x86)")
        pytest.skip("qemu-system-x86_64 is not installed")


def test_qemu_image_rebuilds_byte_for_byte() -> None:
    assert qemu_guest.rebuild(write=False) == qemu_guest.IMAGE.read_bytes()


def test_progress_records_resynchronise_after_boot_text() -> None:
    rec = bytes([0xA5]) + (5).to_bytes(8, "little")
    its, tail = qemu_guest.parse_progress(b"SeaBIOS (version 1.16)\n" + rec + rec[:4])
    assert its == [5] and tail == rec[:4]
    its, tail = qemu_guest.parse_progress(tail + rec[4:] + bytes([0xA5]) + (0xA5A5).to_bytes(8, "little"))
    assert its == [5, 0xA5A5] and tail == b""


def test_configured_image_refuses_a_working_set_in_the_pci_hole() -> None:
    with pytest.raises(ValueError, match="does not fit below QEMU q35's PCI hole"):
        qemu_guest.configured_image(WorkloadSpec("dirty", working_set=3 << 30), 4 << 30)


def _wait_samples(progress: qemu_lab.ProgressReader, n: int, timeout: float = 60) -> list[tuple[int, int]]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = progress.history()
        if len(got) >= n:
            return got
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} progress reports within {timeout} s: {progress.history()[-3:]}")


def test_the_dirty_workload_runs_the_same_pages_on_qemu(tmp_path: Path) -> None:
    _need_qemu()
    mib = 64
    spec = WorkloadSpec("dirty", seed=7, working_set=8 << 20, rate=64 << 20, pattern="random", batch_pages=64)
    with qemu_lab.running_guest(tmp_path, mib, spec) as (q, progress, _argv):
        samples = _wait_samples(progress, 20)
        its = [i for _, i in samples]
        assert its == sorted(its) and its[-1] > its[0]  # reports arrive in order, the guest advances
        q.cmd("stop")
        regs = q.cmd("human-monitor-command", {"command-line": "info registers"})
        counter = int(re.search(r"R13=([0-9a-f]{16})", regs).group(1), 16)  # type: ignore[union-attr]
        n = spec.pages(mib << 20)
        dump = tmp_path / "data.bin"
        q.cmd("pmemsave", {"val": DATA_BASE, "size": n * 4096, "filename": str(dump)})
        stamps = np.fromfile(dump, np.uint64).reshape(n, 512)[:, 0]
    expected = expected_generations(spec, mib << 20, counter)
    assert counter > 1000
    assert np.array_equal(stamps, expected), f"{int((stamps != expected).sum())} pages differ"
