"""kill -9 at random points, shared by tests/stress/test_kill9.py (CI-sized) and bench/kill9.py.

One kill: a ``snaplab-system`` process boots the ``mixed`` guest (it stamps RAM and writes
disk0 all the time) on two qcow2 disks, is sent one operation over QMP (a ``snapshot-save``
with an engine of the registry, a ``snapshot-delete``, a ``snapshot-load`` with an engine of
the registry, whose background fill the kill may land in, or nothing but the guest's disk
writes), and gets SIGKILL after a random delay.  The delay is drawn up to a little past how
long that operation last took, so most kills land inside it.  Then, on the files:

* the real ``qemu-img check`` of both disks: leaks are fine, corruption is not;
* ``qemu-img snapshot -l``: every snapshot that existed before is still listed on both disks
  (a deleted one may be gone; a new one may be there, or on one disk only, a *partial* group
  snapshot, which QEMU can leave too: it is counted and removed);
* every listed snapshot loads, in a fresh in-process machine on copies of the images, with
  correct content: the RAM stamps agree with the guest's counter, disk0 is what the guest
  wrote from the disk it booted on up to that counter, and disk1 is what the host wrote there
  before that boot (tests/model/guestdisk.py).

The images live on across kills (a campaign), with fresh ones (of a random layout: cluster
size, refcount width) every ``reset_every`` kills and after a corruption.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulator.block import BlockGraph, Qcow2Image
from emulator.guest import WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig
from emulator.migration.engines import LOAD_ENGINES, SAVE_ENGINES
from tests.model.guestdisk import LAB_COUNTER, data_range, disk0_problem, ram_problems

BOUND_S = 60.0  # every wait on a process or a socket
RAM = 32 << 20
DISK = 8 << 20
DISKS = ("disk0", "disk1")
MAX_SNAPS = 4
SPEC = WorkloadSpec("mixed", seed=41, working_set=4 << 20, batch_pages=16, rate=32 << 20)
FIRST_GUESS_S = 0.2
LONGEST_S = 3.0  # an on-demand load waits for job-complete: its delays stop growing here
# each campaign's images: (cluster size, refcount bits); small clusters put a snapshot's VM
# state in many L2 tables and refcount blocks (4 KiB: the smallest a resume-first load reads)
LAYOUTS = [(65536, 16), (4096, 16), (16384, 64), (4096, 8)]  # how long an operation takes, until one has been seen to end


def scenarios() -> list[str]:
    """Every engine of the registry, a delete, and the guest's own disk writes."""
    return ([f"save:{e.name}" for e in SAVE_ENGINES] + [f"load:{e.name}" for e in LOAD_ENGINES]
            + ["delete", "guest-writes"])


@dataclass
class Snap:
    """What a snapshot must contain: the disks as that boot found them, where its VM state is."""

    vmstate: str
    base0: bytes
    disk1: bytes
    origin: str = ""  # which kill made it: its number, scenario, layout, whether it ended first


@dataclass
class Tally:
    kills: int = 0
    mid_op: int = 0  # the operation had not concluded when the kill came
    corrupted: int = 0
    leaky: int = 0  # kills after which qemu-img check found leaks
    leaked_clusters: int = 0  # summed over those checks (a leak stays until the images are reset)
    unloadable: int = 0
    wrong_content: int = 0
    missing: int = 0  # an earlier snapshot no longer listed
    partial: int = 0
    unopenable: int = 0
    hangs: int = 0
    io_errors: int = 0  # BLOCK_IO_ERROR events: a guest disk request the block layer failed
    by_scenario: Counter[str] = field(default_factory=Counter)
    mid_by_scenario: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def bad(self) -> int:
        return (self.corrupted + self.unloadable + self.wrong_content + self.missing + self.unopenable
                + self.hangs + self.io_errors)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise FileNotFoundError("qemu-img is not installed (apt-get install -y qemu-utils)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=BOUND_S)


def read_disk(path: Path) -> bytes:
    with Qcow2Image.open(path, read_only=True) as img:
        return img.read(0, img.size)


def machine_on(work: Path) -> tuple[Machine, BlockGraph]:
    """An in-process machine (not started) on the images in ``work``."""
    g = BlockGraph()
    for d in DISKS:
        g.add({"driver": "file", "filename": str(work / f"{d}.qcow2"), "node-name": f"{d}-file"})
        g.add({"driver": "qcow2", "file": f"{d}-file", "node-name": d})
    cfg = MachineConfig(ram_size=RAM, workload=SPEC, disks=[DiskSpec(d, f"{d}-dev") for d in DISKS])
    return Machine(cfg, g), g


def system_argv(work: Path, sock: Path) -> list[str]:
    argv = [sys.executable, "-m", "emulator.cli", "-m", f"{RAM >> 20}M", "-snaplab-workload",
            f"mixed,seed={SPEC.seed},ws={SPEC.working_set >> 20}M,batch={SPEC.batch_pages},rate={SPEC.rate >> 20}M"]
    for d in DISKS:
        argv += ["-blockdev", f"driver=file,filename={work / f'{d}.qcow2'},node-name={d}-file",
                 "-blockdev", f"driver=qcow2,file={d}-file,node-name={d}",
                 "-device", f"virtio-blk-pci,drive={d},id={d}-dev"]
    return argv + ["-qmp", f"unix:{sock},server=on,wait=off"]


class Campaign:
    """Images that live across kills, and what their snapshots must contain."""

    def __init__(self, root: Path, rng: random.Random, tally: Tally, reset_every: int = 25,
                 keep: Path | None = None) -> None:
        self.root, self.rng, self.tally, self.reset_every = root, rng, tally, reset_every
        self.keep = keep  # where the images of a failed check are copied, for a post-mortem
        self.work = root / "images"
        self.snaps: dict[str, Snap] = {}
        self.seq = 0
        self.took: dict[str, float] = {}  # scenario -> how long it last took, command to conclusion
        self.history: list[str] = []  # the kills since the images were made, for a failure report
        self.reported: set[str] = set()  # snapshots whose wrong content has been reported with history
        self.reset()

    def reset(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        cluster_size, refcount_bits = self.rng.choice(LAYOUTS)
        self.layout = f"cluster {cluster_size}, refcount bits {refcount_bits}"
        for d in DISKS:
            Qcow2Image.create(self.work / f"{d}.qcow2", DISK, cluster_size=cluster_size,
                              refcount_bits=refcount_bits).close()
        self.snaps = {}
        self.history = []

    def pick(self) -> str:
        """A scenario, moved to one that makes sense (nothing to load or delete: a save)."""
        s = self.rng.choice(scenarios())
        if (s.startswith("load") or s == "delete") and not self.snaps:
            s = f"save:{self.rng.choice(SAVE_ENGINES).name}"
        if s.startswith("save") and len(self.snaps) >= MAX_SNAPS:
            s = "delete"
        return s

    def one_kill(self) -> None:
        """Host-write disk1, boot, start an operation, kill -9 it, then check everything."""
        if self.tally.kills and self.tally.kills % self.reset_every == 0:
            self.reset()
        with Qcow2Image.open(self.work / "disk1.qcow2") as img:
            off = self.rng.randrange(DISK)
            img.write(off, bytes([self.rng.randrange(1, 256)]) * min(DISK - off, self.rng.randrange(1, 3 << 16)))
        base0, base1 = read_disk(self.work / "disk0.qcow2"), read_disk(self.work / "disk1.qcow2")
        scenario = self.pick()
        before = set(self.snaps)
        self.seq += 1
        tag, vmstate = f"s{self.seq}", self.rng.choice(DISKS)
        if scenario == "delete" or scenario.startswith("load"):
            tag = self.rng.choice(sorted(self.snaps))
            vmstate = self.snaps[tag].vmstate
        concluded = self._run_and_kill(scenario, tag, vmstate)
        self.tally.kills += 1
        self.tally.by_scenario[scenario] += 1
        if not concluded:
            self.tally.mid_op += 1
            self.tally.mid_by_scenario[scenario] += 1
        self.history.append(f"{self.tally.kills}:{scenario}:{tag}@{vmstate}{'' if concluded else '(mid)'}")
        if self._check_images(scenario):
            origin = (f"kill {self.tally.kills} ({scenario}, {'mid-operation' if not concluded else 'after it'}, "
                      f"{self.layout})")
            new = Snap(vmstate, base0, base1, origin) if scenario.startswith("save") else None
            self._check_snapshots(scenario, before, tag, new)

    def _run_and_kill(self, scenario: str, tag: str, vmstate: str) -> bool:
        """Boot, send the operation, SIGKILL after a random delay; whether its job concluded."""
        sock = self.root / "qmp.sock"
        sock.unlink(missing_ok=True)
        proc = subprocess.Popen(system_argv(self.work, sock), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            f = _connect(proc, sock)
            if f is None:
                self.tally.unopenable += 1
                err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
                self.tally.failures.append(f"{scenario}: snaplab-system did not serve: {err}")
                return True
            time.sleep(self.rng.uniform(0.02, 0.3))  # the guest writes its disk meanwhile
            kind, _, engine = scenario.partition(":")
            cmd = _command(kind, engine, tag, vmstate)
            sent = time.time()
            if cmd is not None:
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
            delay = self.rng.uniform(0, 1.3 * self.took.get(scenario, FIRST_GUESS_S))
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(BOUND_S)
            done, io_errors = _concluded_at(f)
            if io_errors:
                self.tally.io_errors += len(io_errors)
                self.tally.failures.append(f"kill {self.tally.kills + 1} {scenario}: BLOCK_IO_ERROR {io_errors[0]}")
        except (subprocess.TimeoutExpired, OSError) as err:
            self.tally.hangs += 1
            self.tally.failures.append(f"{scenario}: {err!r}")
            proc.kill()
            proc.wait(BOUND_S)
            return True
        finally:
            if proc.stderr:
                proc.stderr.close()
        if done is not None:
            self.took[scenario] = max(done - sent, 0.001)
        elif cmd is not None:  # it takes at least that long: the next delays reach further
            self.took[scenario] = min(max(self.took.get(scenario, FIRST_GUESS_S), delay), LONGEST_S)
        return cmd is None or done is not None

    def _check_images(self, scenario: str) -> bool:
        """qemu-img check on both disks: leaks fine, corruption counted (and the campaign reset)."""
        leaky = False
        for d in DISKS:
            out = qemu_img("check", "--output=json", str(self.work / f"{d}.qcow2"))
            if out.returncode not in (0, 3):
                self.tally.corrupted += 1
                self.tally.failures.append(f"{scenario}: qemu-img check {d}: rc {out.returncode} "
                                           f"{out.stdout[-400:]} {out.stderr[-200:]}")
                self.reset()
                return False
            if out.returncode == 3:
                leaky = True
                self.tally.leaked_clusters += int(json.loads(out.stdout).get("leaks", 0))
        self.tally.leaky += leaky
        return True

    def _check_snapshots(self, scenario: str, before: set[str], tag: str, new: Snap | None) -> None:
        """Every earlier snapshot listed and loadable with its content; partial ones removed."""
        listed = [_tags(self.work / f"{d}.qcow2") for d in DISKS]
        on_all, on_any = set.intersection(*listed), set.union(*listed)
        for gone in before - on_all:
            if scenario == "delete" and gone == tag:
                continue
            self.tally.missing += 1
            self.tally.failures.append(f"{scenario}: snapshot {gone} no longer listed on both disks")
        for part in on_any - on_all:
            self.tally.partial += 1
            for d, tags in zip(DISKS, listed, strict=True):
                if part in tags:
                    with Qcow2Image.open(self.work / f"{d}.qcow2") as img:
                        img.snapshot_delete(name=part)
        if new is not None and tag in on_all:
            self.snaps[tag] = new
        self.snaps = {t: s for t, s in self.snaps.items() if t in on_all}
        unknown = on_all - set(self.snaps)
        for t in sorted(unknown):
            self.tally.failures.append(f"{scenario}: snapshot {t} appeared from nowhere")
            self.tally.wrong_content += 1
        self._verify_loads(scenario)

    def _verify_loads(self, scenario: str) -> None:
        """Load each snapshot in a machine on copies of the images; check RAM and disks."""
        if not self.snaps:
            return
        copy = self.root / "verify"
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        for d in DISKS:
            shutil.copyfile(self.work / f"{d}.qcow2", copy / f"{d}.qcow2")
        m, g = machine_on(copy)
        try:
            for t, s in sorted(self.snaps.items()):
                try:
                    m.snapshots.load_snapshot(t, s.vmstate, list(DISKS))
                except Exception as err:  # noqa: BLE001 - counted, the campaign goes on
                    self.tally.unloadable += 1
                    self.tally.failures.append(f"{scenario}: snapshot {t} does not load: {err!r}")
                    continue
                problem = self._content_problem(m, g, s)
                if problem is not None:
                    self.tally.wrong_content += 1
                    self.tally.failures.append(f"kill {self.tally.kills} {scenario}: snapshot {t} "
                                               f"(made by {s.origin}, vmstate on {s.vmstate}): {problem}")
                    if t not in self.reported:
                        self.reported.add(t)
                        self.tally.failures.append(f"  kills since the images were made: {' '.join(self.history)}")
                    self._keep_images(t)
        finally:
            m.close()
            g.close()
            shutil.rmtree(copy, ignore_errors=True)

    def _keep_images(self, tag: str) -> None:
        """Copy the campaign's images (not the verified copies) aside, once per snapshot."""
        if self.keep is None:
            return
        dest = self.keep / f"kill{self.tally.kills}-{tag}"
        if any(self.keep.glob(f"kill*-{tag}")):
            return
        dest.mkdir(parents=True)
        for d in DISKS:
            shutil.copyfile(self.work / f"{d}.qcow2", dest / f"{d}.qcow2")

    @staticmethod
    def _content_problem(m: Machine, g: BlockGraph, s: Snap) -> str | None:
        n = m.ram.read_u64(LAB_COUNTER)
        a, size = data_range(SPEC, RAM)
        problem = ram_problems(SPEC, RAM, m.ram.read(a, size), n)
        if problem is not None:
            return f"RAM: {problem}"
        img0, img1 = g["disk0"].format_image, g["disk1"].format_image
        problem = disk0_problem(SPEC, s.base0, n, m.ram.read_u64, img0.read(0, img0.size))
        if problem is not None:
            return problem
        if img1.read(0, img1.size) != s.disk1:
            return "disk1 is not what the host wrote"
        return None


def _command(kind: str, engine: str, tag: str, vmstate: str) -> dict[str, Any] | None:
    if kind == "save":
        return {"execute": "snapshot-save", "arguments": {"job-id": "op", "tag": tag, "vmstate": vmstate,
                                                          "devices": list(DISKS), "__org.snaplab_engine": engine}}
    if kind == "load":
        return {"execute": "snapshot-load", "arguments": {"job-id": "op", "tag": tag, "vmstate": vmstate,
                                                          "devices": list(DISKS), "__org.snaplab_engine": engine}}
    if kind == "delete":
        return {"execute": "snapshot-delete", "arguments": {"job-id": "op", "tag": tag, "devices": list(DISKS)}}
    return None


def _connect(proc: subprocess.Popen[bytes], sock: Path) -> Any:
    """The QMP connection after negotiation (None if the process died first)."""
    end = time.monotonic() + BOUND_S
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > end:
            return None
        time.sleep(0.01)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(BOUND_S)
    s.connect(str(sock))
    f = s.makefile("rwb")
    s.close()  # the file keeps the connection
    f.readline()
    f.write(b'{"execute": "qmp_capabilities"}\n')
    f.flush()
    f.readline()
    return f


def _concluded_at(f: Any) -> tuple[float | None, list[str]]:
    """After the kill, from what the process sent: when the job concluded (its event's
    timestamp), and every BLOCK_IO_ERROR it reported (a guest disk write that failed is
    dropped from the disk while the guest's counter goes on)."""
    concluded = None
    io_errors: list[str] = []
    try:
        for line in f:
            msg = json.loads(line)
            data = msg.get("data", {})
            if msg.get("event") == "BLOCK_IO_ERROR":
                io_errors.append(json.dumps(data, sort_keys=True))
            if concluded is None and msg.get("event") == "JOB_STATUS_CHANGE" and data.get("status") == "concluded":
                ts = msg["timestamp"]
                concluded = float(ts["seconds"]) + ts["microseconds"] / 1e6
    except (OSError, ValueError):
        pass
    finally:
        f.close()
    return concluded, io_errors


def _tags(path: Path) -> set[str]:
    out = qemu_img("snapshot", "-l", str(path))
    if out.returncode != 0:
        raise RuntimeError(f"qemu-img snapshot -l {path}: {out.stderr}")
    return {ln.split()[1] for ln in out.stdout.splitlines()[2:] if ln.strip()}


def summary(t: Tally, seconds: float) -> str:
    """A table: kills per scenario (and how many mid-operation), then the totals."""
    rows = [f"{'scenario':<22}{'kills':>7}{'mid-op':>8}"]
    for s in scenarios():
        rows.append(f"{s:<22}{t.by_scenario[s]:>7}{t.mid_by_scenario[s]:>8}")
    rows.append(f"{'total':<22}{t.kills:>7}{t.mid_op:>8}")
    rows.append(f"corrupted images {t.corrupted}, kills leaving leaks {t.leaky} ({t.leaked_clusters} clusters), "
                f"unloadable snapshots {t.unloadable}, wrong content {t.wrong_content}, missing {t.missing}, "
                f"partial group snapshots {t.partial}, unopenable {t.unopenable}, hangs {t.hangs}, "
                f"guest I/O errors {t.io_errors}; {seconds:.0f} s")
    return "\n".join(rows + [f"  {x}" for x in t.failures[:20]])


def run(kills: int, seed: int, root: Path, reset_every: int = 25, keep: Path | None = None) -> Tally:
    """``kills`` kills in a campaign under ``root`` (images of failed checks copied to ``keep``)."""
    tally = Tally()
    camp = Campaign(root, random.Random(seed), tally, reset_every, keep)
    while tally.kills < kills:
        camp.one_kill()
    os.sync()
    return tally
