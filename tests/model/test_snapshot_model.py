"""Stateful model test of internal snapshots on a running machine (issue #20, item 3).

A hypothesis ``RuleBasedStateMachine`` drives a real :class:`~emulator.machine.Machine` with
two qcow2 disks through QMP: ``snapshot-save`` with every save engine of the registry (VM state
on either disk), ``snapshot-load`` with every load engine, ``snapshot-delete``, overwriting a
tag (HMP ``savevm`` or delete + save), host writes to RAM and to disk1, and closing the machine
and reopening the images from their files (then either loading a snapshot, as ``-loadvm``, or
booting afresh; meanwhile the real qemu-img may take, delete or read snapshots of disk1).
Snapshots are taken of both disks or of disk0 alone (``devices``); a load of a disk0-only
snapshot names disk0 alone too (naming both is refused: the tag is missing on disk1), and
leaves disk1 as it is.  The machine also has a raw firmware variable store (pflash1, as
OVMF_VARS.fd): every QMP operation names its devices, so it is left out, as the seed thread
asks; HMP ``savevm`` (all writable devices) is refused because of it, with QEMU's error; and
no snapshot operation changes it (only a boot does: the firmware counts boots in it).  All the while the guest (the ``mixed`` workload) stamps RAM pages and writes
disk0, so the saves run against a guest that writes both.

The model (pure Python) knows, for every snapshot: which disk holds its VM state, the host RAM
pages and disk1's bytes at the save, the window of the guest's counter the save fell in, and
the base disk0 content of the guest run it was taken in.  After every step, with the VM
stopped and the images flushed: ``qemu-img check`` (the real one) on both disks, the
snapshot tables as ``qemu-img snapshot -l`` lists them, disk1 and every snapshot's disk1 bytes,
the host RAM pages, the RAM stamps against the counter (``expected_generations``) and disk0
against what the guest wrote since its base (tests/model/guestdisk.py).

CI-sized by default (8 examples of up to 20 steps).  A longer run:
``SNAPLAB_MODEL_EXAMPLES=100 SNAPLAB_MODEL_STEPS=50 python -m pytest tests/model``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from emulator import varstore
from emulator.block import BlockGraph, Qcow2Image
from emulator.errors import SnaplabError
from emulator.guest import PAGE, WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig
from emulator.migration.engines import LOAD_ENGINES, SAVE_ENGINES
from tests.migration.conftest import wait_until
from tests.model.guestdisk import (
    LAB_COUNTER,
    data_range,
    disk0_problem,
    first_bad_sample,
    ram_problems,
)

RAM = 32 << 20
DISK = 8 << 20
DISKS = ("disk0", "disk1")
TAGS = ("a", "b", "c")
SUBSETS = (DISKS, ("disk0",))  # the disks a snapshot is taken of (the guest writes disk0)
EXT = "offline"  # the disk-only snapshot the real qemu-img takes of disk1
HOST_PAGES = 8  # at the top of RAM, above the workload's data pages
HOST_BASE = RAM - HOST_PAGES * PAGE
SPEC = WorkloadSpec("mixed", seed=29, working_set=4 << 20, batch_pages=16, rate=32 << 20)
# (cluster size, refcount bits, qcow2 version, made by the real qemu-img): small clusters make
# the snapshots' VM state span many L2 tables and refcount blocks
LAYOUTS = [(65536, 16, 3, False), (4096, 16, 3, False), (512, 16, 3, False), (4096, 8, 3, False),
           (65536, 64, 3, False), (65536, 16, 2, False), (65536, 16, 3, True), (1024, 8, 3, True)]
BOUND_S = 60.0
EXAMPLES = int(os.environ.get("SNAPLAB_MODEL_EXAMPLES", "8"))
STEPS = int(os.environ.get("SNAPLAB_MODEL_STEPS", "20"))


@dataclass(frozen=True)
class Snap:
    """What one snapshot must contain."""

    vmstate: str
    devices: tuple[str, ...]
    host_ram: dict[int, int]
    disk1: bytes
    base0: bytes  # disk0 when the guest run it was taken in began
    counter_lo: int  # the guest's counter before the command ...
    counter_hi: int  # ... and after the job concluded
    vars: bytes | None = None  # the variable store's file when saved (None: the firmware was still writing it)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    """The real qemu-img (the judge of every image here)."""
    exe = shutil.which("qemu-img")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-img is not installed; .ci/run must install qemu-utils")
        pytest.skip("qemu-img is not installed (apt-get install -y qemu-utils)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=BOUND_S)


def listed_tags(path: Path) -> dict[str, str]:
    """``qemu-img snapshot -l``: tag -> VM SIZE."""
    out = qemu_img("snapshot", "-l", "-U", str(path))
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines()[2:] if ln.strip()]
    return {r[1]: r[2] + r[3] for r in rows}


class SnapshotModel(RuleBasedStateMachine):
    """Random save/load/delete/overwrite/reopen sequences against the model above."""

    def __init__(self) -> None:
        super().__init__()
        self.work = Path(tempfile.mkdtemp(prefix="snaplab-model-"))
        self.disk1 = bytearray(DISK)
        self.host_ram: dict[int, int] = {}
        self.base0 = bytes(DISK)
        self.snaps: dict[str, Snap] = {}
        self.jobs = 0
        self.history: list[str] = []  # every job and reopen so far, for a failure's message
        self.booted = False
        self.cluster_size: dict[str, int] = {}
        self.ext: bytes | None = None  # disk1 at qemu-img's disk-only snapshot EXT
        self.vars: bytes | None = None  # the variable store since the last boot's firmware wrote it

    @initialize(layouts=st.lists(st.sampled_from(LAYOUTS), min_size=len(DISKS), max_size=len(DISKS)))
    def boot(self, layouts: list[tuple[int, int, int, bool]]) -> None:
        """The two images (cluster size, refcount width, version, which tool makes it), a boot."""
        for d, (cluster_size, refcount_bits, version, real) in zip(DISKS, layouts, strict=True):
            self.cluster_size[d] = cluster_size
            path = self.work / f"{d}.qcow2"
            if real:
                opts = f"cluster_size={cluster_size},refcount_bits={refcount_bits},compat={version - 2 and '1.1' or '0.10'}"
                out = qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(path), str(DISK))
                assert out.returncode == 0, out.stderr
            else:
                Qcow2Image.create(path, DISK, cluster_size=cluster_size, refcount_bits=refcount_bits,
                                  version=version).close()
        self.history.append(f"boot {layouts}")
        (self.work / "vars.fd").write_bytes(varstore.template())
        self.m, self.g = self._open()
        self.m.start()
        self.q = self.m.qmp()
        self.booted = True

    # -- the machine ------------------------------------------------------------------------
    def _open(self) -> tuple[Machine, BlockGraph]:
        g = BlockGraph()
        for d in DISKS:
            g.add({"driver": "file", "filename": str(self.work / f"{d}.qcow2"), "node-name": f"{d}-file"})
            g.add({"driver": "qcow2", "file": f"{d}-file", "node-name": d})
        g.add({"driver": "file", "filename": str(self.work / "vars.fd"), "node-name": "vars-file"})
        g.add({"driver": "raw", "file": "vars-file", "node-name": "vars"})
        cfg = MachineConfig(ram_size=RAM, workload=SPEC, pflash1="vars",
                            disks=[DiskSpec(d, f"{d}-dev") for d in DISKS])
        return Machine(cfg, g), g

    def _job(self, cmd: str, args: dict[str, Any]) -> str | None:
        """Run a snapshot job to its end; its error, or None."""
        self.jobs += 1
        self.history.append(f"{cmd} {args} at {time.monotonic_ns()} ns")
        jid = f"j{self.jobs}"
        self.q.execute(cmd, {"job-id": jid, **args})
        while True:  # a load engine that waits for job-complete says so with 'ready'
            ev = self.q.wait_event("JOB_STATUS_CHANGE", BOUND_S, match={"id": jid})
            if ev.data["status"] == "ready":
                if self.m.running:  # let the guest fault some pages in first
                    goal = self._counter() + 4 * SPEC.batch_pages
                    wait_until(lambda g=goal: self._counter() > g, "the guest to run", BOUND_S)
                self.q.execute("job-complete", {"id": jid})
            elif ev.data["status"] == "concluded":
                break
        self.history[-1] += f", concluded at {time.monotonic_ns()} ns"
        (info,) = [j for j in self.q.execute("query-jobs") if j["id"] == jid]
        self.q.execute("job-dismiss", {"id": jid})
        self.q.events()
        return info.get("error")

    def _refused(self, engine: Any, vmstate: str, err: str | None) -> bool:
        """A load that resumes first reads VM state a page at a time: not from small clusters
        (docs/deviations.md).  Then it is refused, and nothing changed."""
        cs = self.cluster_size[vmstate]
        if not engine.resumes_early or cs >= 4096:
            return False
        assert err == f"lazy restore needs a cluster size of at least 4 KiB, not {cs}", err
        return True

    def _vars(self) -> bytes:
        return self.g["vars"].image.read(0, self.g["vars"].image.size)  # type: ignore[union-attr, no-any-return]

    def _counter(self) -> int:
        return self.m.ram.read_u64(LAB_COUNTER)

    def _save(self, tag: str, engine: str, vmstate: str, devices: tuple[str, ...] = DISKS) -> None:
        lo = self._counter()
        err = self._job("snapshot-save", {"tag": tag, "vmstate": vmstate, "devices": list(devices),
                                          "__org.snaplab_engine": engine})
        assert err is None, (err, self.history)
        # the store is in the VM state whatever ``devices`` says (pflash is migrated as RAM)
        at_save = self._vars() if lo > 0 else None
        self.snaps[tag] = Snap(vmstate, devices, dict(self.host_ram), bytes(self.disk1), self.base0, lo,
                               self._counter(), at_save)

    def _restored(self, tag: str, paused: bool) -> None:
        """The model after a load of ``tag``.  Loaded into a paused VM, the counter must fall
        in the save's window; into a running one, the guest has run on from there since."""
        s = self.snaps[tag]
        self.host_ram, self.base0 = dict(s.host_ram), s.base0
        if "disk1" in s.devices:  # a disk0-only snapshot leaves disk1 as it is
            self.disk1 = bytearray(s.disk1)
        if s.counter_lo == 0:  # saved before the workload ran: the firmware may write the store again
            self.vars = None
        else:  # a load writes the store's saved contents back to its file, as QEMU's pflash_post_load
            self.vars = s.vars
        if not paused:
            self.m.stop()
        try:
            n = self._counter()
            assert s.counter_lo <= n and (n <= s.counter_hi or not paused), (tag, s.counter_lo, n, s.counter_hi)
            self._check_guest(n)
        finally:
            if not paused:
                self.m.cont()

    # -- rules --------------------------------------------------------------------------------
    @rule(tag=st.sampled_from(TAGS), engine=st.sampled_from(SAVE_ENGINES), vmstate=st.sampled_from(DISKS),
          devices=st.sampled_from(SUBSETS))
    def save(self, tag: str, engine: Any, vmstate: str, devices: tuple[str, ...]) -> None:
        if vmstate not in devices:
            vmstate = devices[0]
        if tag in self.snaps:  # disk0 is in every subset, so the tag is found there
            err = self._job("snapshot-save", {"tag": tag, "vmstate": vmstate, "devices": list(devices),
                                              "__org.snaplab_engine": engine.name})
            assert err == f"Snapshot '{tag}' already exists in one or more devices", err
            return
        self._save(tag, engine.name, vmstate, devices)

    @rule(tag=st.sampled_from(TAGS), engine=st.sampled_from([None, *SAVE_ENGINES]))
    def overwrite(self, tag: str, engine: Any) -> None:
        """HMP ``savevm`` (QEMU's overwrite: VM state on the first disk), or delete + save."""
        if engine is None:  # all writable devices: the raw variable store refuses (QEMU's text)
            assert self.q.hmp(f"savevm {tag}") == "Error: Device 'vars' is writable but does not support snapshots\r\n"
            return
        if tag in self.snaps:
            assert self._job("snapshot-delete", {"tag": tag, "devices": list(DISKS)}) is None
            del self.snaps[tag]
        self._save(tag, engine.name, "disk1")

    @rule(tag=st.sampled_from(TAGS), engine=st.sampled_from(LOAD_ENGINES), paused=st.booleans())
    def load(self, tag: str, engine: Any, paused: bool) -> None:
        """A load into the running VM, or into a stopped one (which stays stopped, as in QEMU)."""
        vmstate = self.snaps[tag].vmstate if tag in self.snaps else "disk0"
        devices = self.snaps[tag].devices if tag in self.snaps else DISKS
        if paused:
            self.m.stop()
        try:
            if devices != DISKS:  # naming a disk the snapshot is not on: refused, nothing changes
                err = self._job("snapshot-load", {"tag": tag, "vmstate": vmstate, "devices": list(DISKS),
                                                  "__org.snaplab_engine": engine.name})
                assert err == f"Snapshot '{tag}' does not exist in one or more devices", err
                if not paused and engine.name == "blocking":  # QEMU's loadvm: stopped first, and a
                    assert self.m.state.value == "restore-vm", self.m.state  # failed load leaves it
                    self.m.cont()  # stopped (tests/migration/test_snapshot_qmp.py); lazy loads check first
                assert self.m.running != paused, self.m.state
            err = self._job("snapshot-load", {"tag": tag, "vmstate": vmstate, "devices": list(devices),
                                              "__org.snaplab_engine": engine.name})
            if tag not in self.snaps:
                assert err is not None
                return
            if self._refused(engine, vmstate, err):
                return
            assert err is None, (err, self.history)
            assert self.m.running != paused, self.m.state
            self._restored(tag, paused)
        finally:
            if paused:
                self.m.cont()

    @rule(tag=st.sampled_from(TAGS))
    def delete(self, tag: str) -> None:
        err = self._job("snapshot-delete", {"tag": tag, "devices": list(DISKS)})
        assert err is None, err  # QEMU's bdrv_all_delete_snapshot skips a disk without the tag
        self.snaps.pop(tag, None)

    @rule(page=st.integers(0, HOST_PAGES - 1), value=st.integers(1, 255))
    def write_ram(self, page: int, value: int) -> None:
        self.m.ram.write(HOST_BASE + page * PAGE, bytes([value]) * PAGE)
        self.host_ram[page] = value

    @rule(offset=st.integers(0, DISK - 1), length=st.integers(1, 3 << 16), value=st.integers(0, 255))
    def write_disk1(self, offset: int, length: int, value: int) -> None:
        length = min(length, DISK - offset)
        self.g["disk1"].format_image.write(offset, bytes([value]) * length)
        self.disk1[offset:offset + length] = bytes([value]) * length

    @rule(data=st.data())
    def reopen(self, data: st.DataObject) -> None:
        """Close the machine and the images, reopen them from the files; ``-loadvm`` or a boot."""
        self.history.append("reopen")
        self.m.close()
        self.g.close()
        for d in DISKS:
            out = qemu_img("check", str(self.work / f"{d}.qcow2"))
            assert out.returncode == 0, out.stdout + out.stderr
        self._offline(data.draw(st.sampled_from(["none", "create", "delete", "read"])))
        self.m, self.g = self._open()
        self.q = self.m.qmp()
        tag = data.draw(st.sampled_from(sorted(self.snaps)) if self.snaps and data.draw(st.booleans()) else st.none())
        if tag is None:  # a fresh boot: the guest starts over on the disk0 it finds
            img = self.g["disk0"].format_image
            self.base0 = img.read(0, img.size)
            self.host_ram = {}
            self.vars = None  # the firmware writes the variable store at boot
            self.m.start()
            return
        engine = data.draw(st.sampled_from(LOAD_ENGINES))
        vmstate = self.snaps[tag].vmstate
        err = self._job("snapshot-load", {"tag": tag, "vmstate": vmstate, "devices": list(self.snaps[tag].devices),
                                          "__org.snaplab_engine": engine.name})
        if self._refused(engine, vmstate, err):
            img = self.g["disk0"].format_image
            self.base0, self.host_ram = img.read(0, img.size), {}
            self.vars = None
            self.m.start()
            return
        assert err is None, (err, self.history)
        self._restored(tag, paused=True)
        self.m.start()

    def _offline(self, action: str) -> None:
        """While the machine is away, the real qemu-img takes, deletes or reads snapshots of
        disk1: a disk-only snapshot (``EXT``) beside the machine's, or any snapshot's bytes."""
        path = str(self.work / "disk1.qcow2")
        if action == "create" and self.ext is None:
            assert qemu_img("snapshot", "-c", EXT, path).returncode == 0
            self.ext = bytes(self.disk1)
        elif action == "delete" and self.ext is not None:
            assert qemu_img("snapshot", "-d", EXT, path).returncode == 0
            self.ext = None
        elif action == "read":
            want = ({t: s.disk1 for t, s in self.snaps.items() if "disk1" in s.devices}
                    | ({EXT: self.ext} if self.ext is not None else {}))
            for tag, content in want.items():
                raw = self.work / "snap.raw"
                out = qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", f"snapshot.name={tag}", path, str(raw))
                assert out.returncode == 0, out.stderr
                assert raw.read_bytes() == content, tag
                raw.unlink()

    # -- checks -------------------------------------------------------------------------------
    def _check_guest(self, counter: int) -> None:
        """RAM (stamps and host pages) and disk0 as the model says (VM stopped)."""
        a, n = data_range(SPEC, RAM)
        problem = ram_problems(SPEC, RAM, self.m.ram.read(a, n), counter)
        assert problem is None, problem
        for p in range(HOST_PAGES):
            assert self.m.ram.read(HOST_BASE + p * PAGE, PAGE) == bytes([self.host_ram.get(p, 0)]) * PAGE, p
        img0 = self.g["disk0"].format_image
        problem = disk0_problem(SPEC, self.base0, counter, self.m.ram.read_u64, img0.read(0, img0.size))
        assert problem is None, problem

    @invariant()
    def consistent(self) -> None:
        if not self.booted:
            return
        self.m.stop()
        try:
            self._check_all()
            self.m.cont()
        except (AssertionError, SnaplabError) as err:  # the whole history: hypothesis may not replay it
            # the lab port's samples say when a lab-page finding began (host ns, as the history's)
            samples = first_bad_sample(SPEC, self.m.lab.history_array())
            raise AssertionError(f"{type(err).__name__}: {err} (run state {self.m.state.value})\n"
                                 f"samples: {samples}\nafter:\n" + "\n".join(self.history)) from err

    def _check_all(self) -> None:
        """Everything the model knows, against the machine, the images and qemu-img."""
        for node in self.g.format_nodes():
            node.image.flush()  # type: ignore[union-attr]
        self._check_guest(self._counter())
        # every progress sample the guest rang since the boot, in the workload's order too
        samples = first_bad_sample(SPEC, self.m.lab.history_array())
        assert samples is None, samples
        img1 = self.g["disk1"].format_image
        assert img1.read(0, DISK) == self.disk1
        for d in DISKS:
            path = self.work / f"{d}.qcow2"
            out = qemu_img("check", "-U", str(path))
            assert out.returncode == 0, out.stdout + out.stderr
            tags = listed_tags(path)
            ext = {EXT} if d == "disk1" and self.ext is not None else set()
            assert set(tags) == {t for t, s in self.snaps.items() if d in s.devices} | ext, (d, tags)
            assert not ext or tags[EXT] == "0B", tags
            for tag, s in self.snaps.items():
                if d in s.devices:
                    assert (tags[tag] != "0B") == (s.vmstate == d), (d, tag, tags[tag])
        if self._counter() > 0:  # the workload runs: the firmware's boot write is done
            cur = self._vars()
            if self.vars is None:
                self.vars = cur
            assert cur == self.vars, "the variable store is not what the last boot or load left"
        for tag, s in self.snaps.items():
            if "disk1" not in s.devices:
                continue
            buf = bytearray(DISK)
            self.g["disk1"].format_image.snapshot_read(tag, 0, buf)  # type: ignore[attr-defined]
            assert buf == s.disk1, tag

    def teardown(self) -> None:
        try:
            if self.booted:
                self.m.close()
                self.g.close()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)


SnapshotModel.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_snapshot_model = SnapshotModel.TestCase
