"""A machine wired like the reference: ro firmware, a varstore (raw or qcow2), two qcow2 disks."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emulator.block import Qcow2Image
from emulator.block.node import BlockGraph
from emulator.guest import DATA_DIR, FIRMWARE_BIN, WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig

Factory = Callable[..., Machine]


@pytest.fixture
def make_vm(tmp_path: Path) -> Iterator[Factory]:
    made: list[tuple[Machine, BlockGraph]] = []

    def make(*, vars_format: str = "raw", workload: WorkloadSpec | None = None, ram: int = 32 << 20,
             start: bool = True, sub: str = "w", werror: str = "auto", rerror: str = "auto") -> Machine:
        w = tmp_path / sub
        w.mkdir(exist_ok=True)
        if vars_format == "raw":
            if not (w / "vars.fd").exists():
                shutil.copy(DATA_DIR / "firmware" / "vars-template.fd", w / "vars.fd")
            vars_file = w / "vars.fd"
        else:
            vars_file = w / "vars.qcow2"
            if not vars_file.exists():
                img = Qcow2Image.create(vars_file, 128 << 10)
                img.write(0, (DATA_DIR / "firmware" / "vars-template.fd").read_bytes())
                img.close()
        for d in ("disk0", "disk1"):
            if not (w / f"{d}.qcow2").exists():
                Qcow2Image.create(w / f"{d}.qcow2", 64 << 20).close()
        g = BlockGraph()
        g.add({"driver": "file", "filename": str(FIRMWARE_BIN), "node-name": "fw-code-file", "read-only": True})
        g.add({"driver": "raw", "file": "fw-code-file", "node-name": "fw-code", "read-only": True})
        g.add({"driver": "file", "filename": str(vars_file), "node-name": "fw-vars-file"})
        g.add({"driver": vars_format, "file": "fw-vars-file", "node-name": "fw-vars"})
        for d in ("disk0", "disk1"):
            g.add({"driver": "file", "filename": str(w / f"{d}.qcow2"), "node-name": f"{d}-file"})
            g.add({"driver": "qcow2", "file": f"{d}-file", "node-name": d})
        cfg = MachineConfig(ram_size=ram, pflash0="fw-code", pflash1="fw-vars",
                            disks=[DiskSpec("disk0", "disk0-dev", werror, rerror),
                                   DiskSpec("disk1", "disk1-dev", werror, rerror)],
                            workload=workload or WorkloadSpec("mixed", seed=11, working_set=4 << 20, batch_pages=64))
        m = Machine(cfg, g)
        made.append((m, g))
        if start:
            m.start()
        return m

    yield make
    for m, g in made:
        m.close()
        g.close()


def vmflags(addr: int) -> set[str]:
    """The VmFlags of the mapping that starts at ``addr`` (um/uw: userfaultfd missing/wp)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        start = line.split("-", 1)[0]
        if "-" in line and all(c in "0123456789abcdef" for c in start) and int(start, 16) == addr:
            for follow in lines[i + 1:]:
                if follow.startswith("VmFlags:"):
                    return set(follow.split()[1:])
    raise AssertionError(f"no mapping starts at {addr:#x}")


def wait_until(cond: Callable[[], bool], what: str = "a condition", timeout: float = 60) -> None:
    """Wait (generously) for a behaviour instead of sleeping a fixed time and hoping."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.005)


def progresses(m: Machine, timeout: float = 60) -> None:
    """The guest runs: its iteration counter moves on (within a generous timeout)."""
    it = m.lab.last.iterations
    wait_until(lambda: m.lab.last.iterations > it, "the guest to make progress", timeout)
