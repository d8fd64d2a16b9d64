"""Crash safety by fault injection: stop after the N-th write, for every N.

The workload creates, writes (allocating and copy-on-write), saves VM state,
creates, reverts to and deletes snapshots, and grows the L1 and the refcount
table.  After a "power cut" at every possible write, the image must have no
corruption (leaks allowed) by our check and by ``qemu-img check``, every
snapshot that exists must read back exactly, and the guest data must be what
it was before or after the operation in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from emulator.block import Qcow2Image
from emulator.block.io import FaultInjectionFile, MemoryFile, PowerCut

Step = tuple[str, Callable[[Qcow2Image], None], tuple[int, int] | None]
SIZE = 4 << 20


def workload(cs: int) -> list[Step]:
    rng = np.random.default_rng(3)

    def blob(n: int) -> bytes:
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes()

    a, b, c, d = blob(5 * cs + 100), blob(2 * cs), blob(300), blob(3 * cs)
    state = blob(7 * cs + 11)
    st: dict[str, object] = {}

    def finish(i: Qcow2Image) -> None:
        i.snapshot_finish(st["p"], "bg", vm_state_size=len(state), date_sec=1, date_nsec=2, vm_clock_nsec=3)  # type: ignore[arg-type]

    return [
        ("write", lambda i: i.write(cs // 3, a), (cs // 3, len(a))),
        ("vmstate", lambda i: i.save_vmstate(0, state), None),
        ("create s1", lambda i: i.snapshot_create("s1", vm_state_size=len(state)), None),
        ("write", lambda i: i.write(cs, b), (cs, len(b))),
        ("write", lambda i: i.write(3 * cs - 7, c), (3 * cs - 7, len(c))),
        ("create s2", lambda i: i.snapshot_create("s2"), None),
        ("write", lambda i: i.write(SIZE - len(d), d), (SIZE - len(d), len(d))),
        ("zero", lambda i: i.write_zeroes(0, 2 * cs), (0, 2 * cs)),
        ("goto s1", lambda i: i.snapshot_goto("s1"), None),
        ("write", lambda i: i.write(cs + 5, c), (cs + 5, len(c))),
        ("delete s1", lambda i: i.snapshot_delete(name="s1"), None),
        ("create s3", lambda i: i.snapshot_create("s3"), None),
        ("delete s2", lambda i: i.snapshot_delete(name="s2"), None),
        ("write", lambda i: i.write(0, a), (0, len(a))),
        ("prepare", lambda i: st.__setitem__("p", i.snapshot_prepare()), None),
        ("write", lambda i: i.write(cs, c), (cs, len(c))),
        ("pending vmstate", lambda i: i.pending_save_vmstate(st["p"], 0, state), None),  # type: ignore[arg-type]
        ("create bg", finish, None),
    ]


def run(cs: int, base: bytes, allowed: int) -> tuple[MemoryFile, int, list[dict[str, bytes]], list[bytes]]:
    """Replay the workload; returns the file, the step that was cut (or len), snapshots and data."""
    mem = MemoryFile(base)
    f = FaultInjectionFile(mem, allowed)
    snaps_after: list[dict[str, bytes]] = []
    active_after: list[bytes] = []
    img = Qcow2Image(f)
    snaps: dict[str, bytes] = {}
    steps = workload(cs)
    for k, (name, fn, _) in enumerate(steps):
        try:
            fn(img)
        except PowerCut:
            return mem, k, snaps_after, active_after
        if name.startswith("create"):
            tag = name.split()[1]
            buf = bytearray(SIZE)
            img.snapshot_read(tag, 0, buf)
            snaps[tag] = bytes(buf)
        elif name.startswith("delete"):
            snaps.pop(name.split()[1])
        snaps_after.append(dict(snaps))
        active_after.append(img.read(0, SIZE))
    return mem, len(steps), snaps_after, active_after


@pytest.mark.parametrize("cs", [512, 65536])
def test_power_cut_at_every_write(cs: int, tmp_path: Path, qemu_img) -> None:  # type: ignore[no-untyped-def]
    base_file = MemoryFile()
    Qcow2Image.create(base_file, SIZE, cluster_size=cs).close()
    base = bytes(base_file.data)
    _, done, snaps_ref, active_ref = run(cs, base, 10**9)
    steps = workload(cs)
    assert done == len(steps)
    total = FaultInjectionFile(MemoryFile(base), 10**9)
    img = Qcow2Image(total)
    for _, fn, _ in steps:
        fn(img)
    n_writes = total.writes
    assert n_writes > 40
    path = tmp_path / "crash.qcow2"
    for allowed in range(n_writes):
        mem, cut, _, _ = run(cs, base, allowed)
        assert cut < len(steps)
        img = Qcow2Image(MemoryFile(mem.data))
        res = img.check()
        assert res.corruptions == 0 and res.check_errors == 0, (allowed, steps[cut][0], res.messages[:5])
        # Snapshots: whatever exists reads back exactly as when it was taken.
        before = snaps_ref[cut - 1] if cut else {}
        after = snaps_ref[cut]
        names = {sn.name for sn in img.snapshot_list()}
        assert set(before) & set(after) <= names, (allowed, steps[cut][0])
        assert names <= set(before) | set(after)
        for sn in img.snapshot_list():
            buf = bytearray(SIZE)
            img.snapshot_read(sn.id_str, 0, buf)
            assert bytes(buf) == (after.get(sn.name) or before[sn.name]), (allowed, sn.name)
        # Guest data: before or after the operation in flight (a torn write only in its range).
        data = img.read(0, SIZE)
        old = active_ref[cut - 1] if cut else bytes(SIZE)
        new = active_ref[cut]
        rng = steps[cut][2]
        if rng is None:
            assert data in (old, new), (allowed, steps[cut][0])
        else:
            lo, n = rng
            assert data[:lo] == old[:lo] and data[lo + n:] == old[lo + n:], (allowed, steps[cut][0])
        if allowed % 7 == 0 or steps[cut][0].split()[0] in ("create", "delete", "goto"):
            path.write_bytes(mem.data)
            out = qemu_img("check", str(path))
            assert out.returncode in (0, 3), (allowed, steps[cut][0], out.stdout, out.stderr)
