"""A snapshot taken by the real qemu-img shares the active L2 tables (refcount 2, their data at
2 too: QEMU counts one reference per path from every L1).  Reverting or deleting with snaplab
must take one from the data as well as from the tables: found by tests/model (a leak)."""

from __future__ import annotations

from pathlib import Path

from emulator.block import Qcow2Image


def test_goto_and_delete_over_qemu_img_snapshots_leak_nothing(tmp_path: Path, qemu_img) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "shared.qcow2"
    img = Qcow2Image.create(p, 8 << 20)
    img.snapshot_create("ours")
    img.write(0, b"\x11" * 70000)  # straddles a cluster boundary
    img.close()
    assert qemu_img("snapshot", "-c", "theirs", str(p)).returncode == 0
    with Qcow2Image.open(p) as img:
        img.snapshot_goto("ours")
        assert img.read(0, 70000) == bytes(70000)
        assert img.check().leaks == 0
    out = qemu_img("check", str(p))
    assert out.returncode == 0, out.stdout + out.stderr
    with Qcow2Image.open(p) as img:
        img.snapshot_goto("theirs")
        img.snapshot_delete(name="theirs")
        assert img.read(0, 70000) == b"\x11" * 70000
    out = qemu_img("check", str(p))
    assert out.returncode == 0, out.stdout + out.stderr
