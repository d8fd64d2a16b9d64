"""A damaged VM state inside an otherwise valid qcow2 image (issue #20 item 7).

A snapshot's VM state is cut short (its size in the snapshot table) or has bytes changed in
place (a section name, a huge payload length, a register file the CPU model refuses, the
magic), as bit rot or a torn copy would leave it.  Loading it with either engine ends with
GenericError in QEMU's words ("Error -22 while loading VM state: ..."); the guest is left as
QEMU leaves it after a failed load (a blocking load stopped it: restore-vm; a lazy load checks
everything before its stop, so the guest never stopped), with its CPU, devices, RAM and disks
untouched; an earlier snapshot still loads; ``qemu-img check`` finds no corruption.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from emulator.block import Qcow2Image
from emulator.block.format import SNAPSHOT_HEADER
from emulator.cpu import pack_cpu_state, unpack_cpu_state
from emulator.errors import UffdUnavailable
from emulator.machine import Machine
from emulator.qmp.client import QMPClient
from emulator.uffd import UserFaultFD

MARK = 60 << 20  # a disk offset the guest's workload never writes (64 MiB disks, 4 MiB working set)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def guest_progress(m: Machine) -> None:
    it = m.lab.last.iterations
    wait_until(lambda: m.lab.last.iterations > it, "the guest to run")


def mark_disk(m: Machine, q: QMPClient, byte: int) -> None:
    q.execute("stop")
    m.disk_nodes[0].format_image.write(MARK, bytes([byte]) * 4096)
    q.execute("cont")


def save(q: QMPClient, tag: str) -> None:
    q.execute("snapshot-save", {"job-id": f"save-{tag}", "tag": tag, "vmstate": "disk0",
                                "devices": ["disk0", "disk1"]})
    assert "error" not in q.wait_job(f"save-{tag}")


def load(q: QMPClient, job: str, tag: str, engine: str) -> dict[str, object]:
    q.execute("snapshot-load", {"job-id": job, "tag": tag, "vmstate": "disk0", "devices": ["disk0", "disk1"],
                                "__org.snaplab_engine": engine})
    return q.wait_job(job)


# -- the damage, done to the file as a torn copy or bit rot would -------------------------------

def _vm_state(path: Path, tag: str) -> tuple[bytes, Callable[[int], int]]:
    """The snapshot's VM state bytes, and a map from a stream position to its file offset."""
    img = Qcow2Image.open(path, read_only=True)
    try:
        sn = next(s for s in img.snapshot_list() if s.name == tag)
        buf = bytearray(sn.vm_state_size)
        img.load_vmstate(0, buf, sn.id_str)
        cmap, _base = img.snapshot_vmstate_map(sn.id_str)
        cs = img.cluster_size
    finally:
        img.close()

    def host(pos: int) -> int:
        off = int(cmap[pos // cs])
        assert off > 0, "the damaged byte must be in an allocated cluster"
        return off + pos % cs

    return bytes(buf), host


def _poke(path: Path, host: Callable[[int], int], pos: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        for i, b in enumerate(data):  # byte by byte: a field may straddle two clusters
            f.seek(host(pos + i))
            f.write(bytes([b]))


def _payload_at(state: bytes, idstr: str) -> int:
    """Stream position of a device section's u32 payload length."""
    i = state.index(bytes([len(idstr)]) + idstr.encode() + b"\x00\x00\x00\x00")
    return i + 1 + len(idstr) + 8


def _truncate(path: Path, tag: str) -> None:
    """Halve the snapshot's vm_state_size in the snapshot table (header and extra data)."""
    data = bytearray(path.read_bytes())
    nb, table = struct.unpack_from(">IQ", data, 60)
    off = table
    for _ in range(nb):
        _l1, _l1_size, id_len, name_len, *_rest, vm_size, extra = SNAPSHOT_HEADER.unpack_from(data, off)
        name_at = off + SNAPSHOT_HEADER.size + extra + id_len
        if data[name_at:name_at + name_len] == tag.encode():
            struct.pack_into(">I", data, off + 32, vm_size // 2)
            large = struct.unpack_from(">Q", data, off + SNAPSHOT_HEADER.size)[0]
            struct.pack_into(">Q", data, off + SNAPSHOT_HEADER.size, large // 2)
            path.write_bytes(data)
            return
        off += -(-(SNAPSHOT_HEADER.size + extra + id_len + name_len) // 8) * 8
    raise AssertionError(f"no snapshot {tag}")


def damage(path: Path, tag: str, how: str) -> str:
    """Damage the snapshot's VM state; the start of the error QEMU-style loading must give."""
    if how == "truncated":
        _truncate(path, tag)
        return "Error -5 while loading VM state: truncated stream"
    state, host = _vm_state(path, tag)
    if how == "magic":
        _poke(path, host, 0, b"XEVM")
        return "Error -22 while loading VM state: not a VM state stream (bad magic)"
    if how == "section":
        _poke(path, host, state.index(b"\x05timer") + 1, b"tumer")
        return "Error -22 while loading VM state: Unknown savevm section or instance 'tumer' 0. Make sure that"
    if how == "huge-length":
        _poke(path, host, _payload_at(state, "cpu"), b"\xff\xff\xff\xff")
        return "Error -22 while loading VM state: section 'cpu' length 4294967295 exceeds the limit"
    assert how == "cpu-registers"
    at = _payload_at(state, "cpu")
    n = struct.unpack_from(">I", state, at)[0]
    regs = unpack_cpu_state(state[at + 4:at + 4 + n])
    _poke(path, host, at + 4, pack_cpu_state(dict(regs, FS=0x1000)))  # a selector past the GDT
    return ("Error -22 while loading VM state: error while loading state for instance 0x0 of device 'cpu': "
            "register state refused by the CPU model")


# -- the test ------------------------------------------------------------------------------------

def the_guest(m: Machine) -> tuple[dict[str, int], dict[str, bytes], str, bytes]:
    """What a failed load must not change: CPU, devices, RAM, the disk."""
    devices = {h.idstr: h.save() for h in m.savevm_handlers() if h.idstr != "clock"}
    ram = hashlib.sha256(m.ram.read(0, m.ram.size)).hexdigest()
    return m.cpu.get_state(), devices, ram, m.disk_nodes[0].format_image.read(MARK, 4096)


@pytest.mark.parametrize("how", ["truncated", "magic", "section", "huge-length", "cpu-registers"])
@pytest.mark.parametrize("engine", ["blocking", "lazy"])
def test_a_damaged_vm_state_fails_cleanly_and_changes_nothing(make_vm, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                              engine: str, how: str) -> None:
    if engine == "lazy":
        try:
            UserFaultFD().close()
        except UffdUnavailable as err:
            pytest.skip(f"the kernel refuses userfaultfd here: {err}")
    m = make_vm(sub="d")
    q = m.qmp()
    guest_progress(m)
    mark_disk(m, q, 0x11)
    save(q, "early")
    mark_disk(m, q, 0x33)
    save(q, "bad")
    mark_disk(m, q, 0x22)
    q.execute("quit")
    m.close()
    m.graph.close()
    disk0 = tmp_path / "d" / "disk0.qcow2"
    want = damage(disk0, "bad", how)

    m = make_vm(sub="d")
    q = m.qmp()
    guest_progress(m)
    q.events()
    # Running: the blocking load stops first and stays stopped (QEMU's snapshot_load_job_bh
    # restarts only after a load that succeeded); the lazy load refuses before its stop.
    info = load(q, "l1", "bad", engine)
    assert str(info.get("error", "")).startswith(want), info
    status = q.execute("query-status")["status"]
    stops = [e.event for e in q.events() if e.event in ("STOP", "RESUME")]
    if engine == "blocking":
        assert (status, stops) == ("restore-vm", ["STOP"])
    else:
        assert (status, stops) == ("running", [])
        guest_progress(m)  # and it keeps running
        q.execute("stop")
    # Stopped, so that nothing moves: the failed load changes no register, device, page or
    # disk block (the disks are reverted only after every check passed).
    before = the_guest(m)
    assert before[3] == b"\x22" * 4096
    state = q.execute("query-status")["status"]
    info = load(q, "l2", "bad", engine)
    assert str(info.get("error", "")).startswith(want), info
    assert q.execute("query-status")["status"] == state
    assert the_guest(m) == before
    # An earlier snapshot still loads, and the guest runs from it.
    info = load(q, "l3", "early", engine)
    assert "error" not in info, info
    assert m.disk_nodes[0].format_image.read(MARK, 4096) == b"\x11" * 4096
    q.execute("cont")
    guest_progress(m)
    assert m.lab.last.errors == 0
    q.execute("quit")
    m.close()
    m.graph.close()
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    for name in ("disk0", "disk1"):
        res = subprocess.run(["qemu-img", "check", str(tmp_path / "d" / f"{name}.qcow2")],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr
