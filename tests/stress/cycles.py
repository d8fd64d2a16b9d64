"""Teardown stress cycles, shared by tests/stress (CI-sized) and bench/stress_teardown.py.

One cycle: create a machine, start it, begin a snapshot operation (a save with every engine
of the registry, a load with every load engine, ``migrate`` to a file, or nothing), then at
a random point (mid-save, mid-load, mid-lazy-fill, mid-migrate) tear it down (close, QMP
quit, quit from another thread, or, for a ``snaplab-system`` process, a signal).  Every wait
is bounded: a teardown that does not return in time is counted as a hang, never waited for.
Between cycles the process's threads, fds, userfaultfd registrations and RSS are sampled.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from emulator.block import BlockGraph, Qcow2Image
from emulator.guest import WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig
from emulator.migration.engines import load_engine_names, save_engine_names

BOUND_S = 60.0  # every wait: a teardown slower than this is a hang
RAM = 32 << 20
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def scenarios() -> list[str]:
    """Every engine of the registry, plus migrate and an idle guest."""
    return ([f"save:{e}" for e in save_engine_names()] + [f"load:{e}" for e in load_engine_names()]
            + ["migrate", "migrate:background", "idle"])


@dataclass
class Sample:
    threads: int
    fds: int
    uffd_fds: int
    uffd_ranges: int
    rss_kib: int


def sample() -> Sample:
    """This process's threads, fds, userfaultfd fds and registered ranges (VmFlags um/uw), RSS."""
    gc.collect()
    fds = os.listdir("/proc/self/fd")
    uffd = 0
    for fd in fds:
        try:
            uffd += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        except OSError:
            pass
    ranges = 0
    with open("/proc/self/smaps") as f:
        for line in f:
            if line.startswith("VmFlags:") and ({"um", "uw"} & set(line.split()[1:])):
                ranges += 1
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return Sample(len(os.listdir("/proc/self/task")), len(fds), uffd, ranges, rss)


@dataclass
class Tally:
    cycles: int = 0
    hangs: int = 0
    signal_deaths: int = 0
    bad_exits: int = 0
    shutdown_events: int = 0
    by_scenario: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def stress_machine(work: Path, seed: int) -> tuple[Machine, BlockGraph]:
    disk = work / "d0.qcow2"
    Qcow2Image.create(disk, 64 << 20).close()
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(disk), "node-name": "d0f"})
    g.add({"driver": "qcow2", "file": "d0f", "node-name": "disk0"})
    spec = WorkloadSpec("dirty", seed=seed, working_set=8 << 20, pattern="random", batch_pages=64)
    return Machine(MachineConfig(ram_size=RAM, workload=spec, disks=[DiskSpec("disk0", "disk0-dev")]), g), g


def _begin(m: Machine, scenario: str, work: Path) -> None:
    """Start the scenario's operation (its job runs on; the teardown lands in it)."""
    q = m.qmp()
    snap = {"vmstate": "disk0", "devices": ["disk0"]}
    kind, _, engine = scenario.partition(":")
    if kind == "save":
        q.execute("snapshot-save", {"job-id": "s", "tag": "s", **snap, "__org.snaplab_engine": engine})
    elif kind == "load":
        q.execute("snapshot-save", {"job-id": "base", "tag": "base", **snap})
        info = q.wait_job("base", BOUND_S)
        assert "error" not in info, info
        q.execute("snapshot-load", {"job-id": "l", "tag": "base", **snap, "__org.snaplab_engine": engine})
    elif kind == "migrate":
        if engine == "background":
            q.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "background-snapshot", "state": True}]})
        q.execute("migrate", {"uri": f"file:{work / 'mig.bin'}"})


def _teardown(m: Machine, how: str) -> None:
    if how == "qmp-quit":
        m.qmp().execute("quit")
        m.close()
    elif how == "quit-thread":
        t = threading.Thread(target=m.quit, daemon=True)
        t.start()
        m.close()
        t.join(BOUND_S)
    else:
        m.close()


def in_process_cycle(work: Path, rng: random.Random, tally: Tally, max_delay: float = 0.03) -> None:
    """One in-process cycle in ``work`` (a fresh directory)."""
    scenario = rng.choice(scenarios())
    how = rng.choice(["close", "qmp-quit", "quit-thread"])
    m, g = stress_machine(work, rng.randrange(1 << 32))
    tally.cycles += 1
    tally.by_scenario[scenario] += 1
    try:
        m.start()
        _begin(m, scenario, work)
        time.sleep(rng.random() * max_delay)  # a random point of the operation (not asserted)
    except Exception as err:  # noqa: BLE001 - a refused operation is not a teardown failure
        tally.failures.append(f"{scenario}: {err!r}")
    closer = threading.Thread(target=_teardown, args=(m, how), daemon=True)
    closer.start()
    closer.join(BOUND_S)
    if closer.is_alive():
        tally.hangs += 1
        tally.failures.append(f"{scenario}/{how}: hung in {m.query_status()}")
        return
    if m.state.value != "shutdown" or m.runctl.vcpu_alive():
        tally.failures.append(f"{scenario}/{how}: {m.state.value}, vCPU alive {m.runctl.vcpu_alive()}")
    g.close()


def _qmp(sock: Path) -> tuple[socket.socket, object]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(BOUND_S)
    s.connect(str(sock))
    f = s.makefile("rwb")
    f.readline()
    f.write(b'{"execute": "qmp_capabilities"}\n')
    f.flush()
    f.readline()
    return s, f


def process_cycle(work: Path, rng: random.Random, tally: Tally, max_delay: float = 0.05) -> None:
    """One ``snaplab-system`` process: start, a save (random engine) or migrate over QMP,
    a signal at a random point; it must exit 0 (never die by the signal) within the bound."""
    disk, sock = work / "d0.qcow2", work / "qmp.sock"
    Qcow2Image.create(disk, 64 << 20).close()
    scenario = rng.choice([s for s in scenarios() if not s.startswith("load")])
    sig = rng.choice(SIGNALS)
    tally.cycles += 1
    tally.by_scenario[f"process-{scenario}"] += 1
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "-m", "32M", "-snaplab-workload", "dirty,seed=1,ws=8M",
         "-blockdev", f"driver=file,filename={disk},node-name=d0f", "-blockdev", "driver=qcow2,file=d0f,node-name=disk0",
         "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev", "-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + BOUND_S
        while not sock.exists() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.01)
        if proc.poll() is not None:
            tally.bad_exits += 1
            tally.failures.append(f"process {scenario}: exited {proc.returncode} before serving: "
                                  + (proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""))
            return
        s, f = _qmp(sock)
        kind, _, engine = scenario.partition(":")
        cmd: dict[str, object] = {"execute": "query-status"}
        if kind == "save":
            cmd = {"execute": "snapshot-save", "arguments": {"job-id": "s", "tag": "s", "vmstate": "disk0",
                                                             "devices": ["disk0"], "__org.snaplab_engine": engine}}
        elif kind == "migrate":
            cmd = {"execute": "migrate", "arguments": {"uri": f"file:{work / 'mig.bin'}"}}
        f.write(json.dumps(cmd).encode() + b"\n")  # type: ignore[attr-defined]
        f.flush()  # type: ignore[attr-defined]
        time.sleep(rng.random() * max_delay)
        proc.send_signal(sig)
        tally.shutdown_events += _saw_shutdown(f)
        s.close()
        rc = proc.wait(BOUND_S)
    except (subprocess.TimeoutExpired, OSError) as err:
        tally.hangs += 1
        tally.failures.append(f"process {scenario}/{sig.name}: {err!r}")
        proc.kill()
        proc.wait(BOUND_S)
        return
    if rc < 0:
        tally.signal_deaths += 1
    if rc != 0:
        tally.bad_exits += 1
        err_text = proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else ""
        tally.failures.append(f"process {scenario}/{sig.name}: exit {rc} {err_text}")


def _saw_shutdown(f: object) -> bool:
    """Read events until SHUTDOWN or the end of the connection (bounded by the socket timeout)."""
    try:
        for line in f:  # type: ignore[attr-defined]
            if json.loads(line).get("event") == "SHUTDOWN":
                return True
    except (OSError, ValueError):
        pass
    return False
