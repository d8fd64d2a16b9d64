"""A ready-wired machine for notebooks: read-only firmware, a varstore, a qcow2 disk, in a
scratch directory, like the reference command line (docs/reference/qemu-7.2-qmp.md)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from emulator.block import BlockGraph, Qcow2Image
from emulator.guest import DATA_DIR, FIRMWARE_BIN, WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig
from lab import scratch


@dataclass
class Session:
    machine: Machine
    graph: BlockGraph
    workdir: Path

    def __post_init__(self) -> None:
        # Removed at close, when collected or at exit (the machine quits by its own exit hook);
        # if this process is killed outright, by the next one that makes a session.
        self._discard = scratch.tie(self, self.workdir)

    def close(self) -> None:
        self.machine.close()
        self.graph.close()
        self._discard()


def default_machine(*, ram_mib: int = 64, seed: int = 1, workload: str = "dirty", varstore: str = "raw",
                    dirty_rate_mib_s: int = 50) -> Session:
    """The default guest: ``dirty`` workload (seeded), raw varstore (as OVMF_VARS.fd) or qcow2."""
    wd = scratch.make("snaplab-nb-")
    template = DATA_DIR / "firmware" / "vars-template.fd"
    if varstore == "raw":
        shutil.copy(template, wd / "vars.fd")
        vars_file, vars_drv = wd / "vars.fd", "raw"
    else:
        img = Qcow2Image.create(wd / "vars.qcow2", 128 << 10)
        img.write(0, template.read_bytes())
        img.close()
        vars_file, vars_drv = wd / "vars.qcow2", "qcow2"
    Qcow2Image.create(wd / "disk0.qcow2", 1 << 30).close()
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(FIRMWARE_BIN), "node-name": "fw-code-file", "read-only": True})
    g.add({"driver": "raw", "file": "fw-code-file", "node-name": "fw-code", "read-only": True})
    g.add({"driver": "file", "filename": str(vars_file), "node-name": "fw-vars-file"})
    g.add({"driver": vars_drv, "file": "fw-vars-file", "node-name": "fw-vars"})
    g.add({"driver": "file", "filename": str(wd / "disk0.qcow2"), "node-name": "disk0-file"})
    g.add({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"})
    ram = ram_mib << 20
    w = WorkloadSpec(workload, seed=seed, working_set=ram // 2, rate=dirty_rate_mib_s << 20)
    cfg = MachineConfig(ram_size=ram, pflash0="fw-code", pflash1="fw-vars",
                        disks=[DiskSpec("disk0", "disk0-dev")], workload=w)
    return Session(Machine(cfg, g), g, wd)


def wait_for_serial(m: Machine, text: str, timeout: float = 10.0, count: int = 1) -> str:
    """The serial output once ``text`` is in it ``count`` times (TimeoutError after ``timeout`` s)."""
    import time

    end = time.monotonic() + timeout
    while m.serial.text().count(text) < count:
        if time.monotonic() > end:
            raise TimeoutError(f"no {text!r} on the serial port")
        time.sleep(0.01)
    return m.serial.text()
