"""Differential tests against the real qemu-img and qemu-io (installed by .ci/run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from emulator.block import Qcow2Image
from emulator.img import main as img_main

pytestmark = pytest.mark.qemu


def run_ours(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = img_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def build_ours(path: Path, cs: int = 65536) -> dict[str, bytes]:
    """An image with data, three snapshots (one with VM state), one deleted, one reverted."""
    rng = np.random.default_rng(7)
    img = Qcow2Image.create(path, 32 << 20, cluster_size=cs)
    expect: dict[str, bytes] = {}
    img.write(0, rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    img.write(5 << 20, b"\x11" * 100_000)
    img.save_vmstate(0, rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    img.snapshot_create("one", vm_state_size=1 << 20, vm_clock_nsec=2_155_333_615)
    expect["one"] = img.read(0, 32 << 20)
    img.write(cs // 2, b"\x22" * (3 * cs))
    img.snapshot_create("two")
    expect["two"] = img.read(0, 32 << 20)
    img.write(7 << 20, b"\x33" * 5000)
    img.snapshot_create("three")
    img.snapshot_delete(name="three")
    img.snapshot_goto("one")
    img.write(1 << 20, b"\x44" * 70000)
    expect[""] = img.read(0, 32 << 20)
    img.close()
    return expect


@pytest.mark.parametrize("cs", [4096, 65536])
def test_our_images_pass_qemu_img(tmp_path: Path, qemu_img, capsys, cs: int) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ours.qcow2"
    expect = build_ours(path, cs)
    res = qemu_img("check", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors were found on the image." in res.stdout
    # Same listing, same info, same check report, byte for byte.
    for argv in (["snapshot", "-l"], ["info"], ["check"], ["check", "--output=json"]):
        theirs = qemu_img(*argv, str(path))
        rc, out, _ = run_ours(capsys, *argv, str(path))
        assert (rc, out) == (theirs.returncode, theirs.stdout), argv
    theirs_json = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    _, out, _ = run_ours(capsys, "info", "--output=json", str(path))
    assert json.loads(out) == theirs_json
    # Each snapshot as qemu-img reads it equals what we read.
    for tag, data in expect.items():
        raw = tmp_path / f"conv-{tag or 'active'}.raw"
        argv = ["convert", "-O", "raw"] + (["-l", f"snapshot.name={tag}"] if tag else []) + [str(path), str(raw)]
        assert qemu_img(*argv).returncode == 0
        assert raw.read_bytes() == data, tag


def test_qemu_images_read_by_us(tmp_path: Path, qemu_img, qemu_io) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "theirs.qcow2"
    assert qemu_img("create", "-f", "qcow2", str(path), "64M").returncode == 0
    qemu_io(path, "write -P 0x11 0 200k", "write -P 0x12 1M 64k")
    assert qemu_img("snapshot", "-c", "s1", str(path)).returncode == 0
    qemu_io(path, "write -P 0x22 100k 150k", "write -z 1M 64k")
    assert qemu_img("snapshot", "-c", "s2", str(path)).returncode == 0
    qemu_io(path, "write -P 0x33 0 4k", "discard 128k 64k")
    listing = qemu_img("snapshot", "-l", str(path)).stdout
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", str(path), str(ref))
    refs = {}
    for tag in ("s1", "s2"):
        p = tmp_path / f"{tag}.raw"
        qemu_img("convert", "-O", "raw", "-l", f"snapshot.name={tag}", str(path), str(p))
        refs[tag] = p.read_bytes()
    img = Qcow2Image.open(path)
    assert img.read(0, 64 << 20) == ref.read_bytes()
    for tag, data in refs.items():
        buf = bytearray(64 << 20)
        img.snapshot_read(tag, 0, buf)
        assert bytes(buf) == data, tag
    assert img.check().clean
    # Our writes and snapshot operations on their image keep qemu-img check clean.
    img.write(30_000, b"\x55" * 300_000)
    img.snapshot_create("ours")
    img.snapshot_goto("s1")
    img.write(0, b"\x66" * 5000)
    img.snapshot_delete(name="s2")
    img.close()
    res = qemu_img("check", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert [ln.split()[1] for ln in qemu_img("snapshot", "-l", str(path)).stdout.splitlines()[2:]] == ["s1", "ours"]
    assert "s2" in listing
    back = tmp_path / "back.raw"
    qemu_img("convert", "-O", "raw", str(path), str(back))
    expect = bytearray(refs["s1"])
    expect[0:5000] = b"\x66" * 5000
    assert back.read_bytes() == bytes(expect)


def test_compressed_clusters_from_qemu(tmp_path: Path, qemu_img, qemu_io) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src.raw"
    data = (b"compressible " * 400_000)[: 4 << 20]
    src.write_bytes(data)
    comp = tmp_path / "c.qcow2"
    assert qemu_img("convert", "-c", "-O", "qcow2", str(src), str(comp)).returncode == 0
    img = Qcow2Image.open(comp)
    assert img.read(0, len(data)) == data
    res = img.check()
    assert res.clean and res.compressed_clusters > 0
    img.write(65536 + 10, b"new")  # copy-on-write out of a compressed cluster
    img.close()
    assert qemu_img("check", str(comp)).returncode == 0
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", str(comp), str(out))
    exp = bytearray(data)
    exp[65546:65549] = b"new"
    assert out.read_bytes() == bytes(exp)


def test_snaplab_img_create_and_convert(tmp_path: Path, qemu_img, capsys) -> None:  # type: ignore[no-untyped-def]
    ours = tmp_path / "a.qcow2"
    theirs = tmp_path / "b.qcow2"
    rc, out, _ = run_ours(capsys, "create", "-f", "qcow2", str(ours), "1G")
    ref = qemu_img("create", "-f", "qcow2", str(theirs), "1G")
    assert rc == 0 and out.replace(str(ours), "X") == ref.stdout.replace(str(theirs), "X")
    assert qemu_img("check", str(ours)).returncode == 0
    assert json.loads(qemu_img("info", "--output=json", str(ours)).stdout)["virtual-size"] == 1 << 30
    assert run_ours(capsys, "create", "-f", "qcow2", str(ours), "64M")[0] == 0
    img = Qcow2Image.open(ours)
    img.write(123456, os.urandom(300_000))
    img.snapshot_create("t")
    img.write(123456, b"later")
    img.close()
    for tag in ("t", None):
        a, b = tmp_path / "ours.raw", tmp_path / "theirs.raw"
        extra = ["-l", f"snapshot.name={tag}"] if tag else []
        assert run_ours(capsys, "convert", "-O", "raw", *extra, str(ours), str(a))[0] == 0
        assert qemu_img("convert", "-O", "raw", *extra, str(ours), str(b)).returncode == 0
        assert a.read_bytes() == b.read_bytes()
    q = tmp_path / "conv.qcow2"
    assert run_ours(capsys, "convert", "-O", "qcow2", str(ours), str(q))[0] == 0
    assert qemu_img("compare", str(ours), str(q)).returncode == 0
    assert qemu_img("check", str(q)).returncode == 0
    # snapshot -c/-a/-d through our tool, verified by qemu-img
    assert run_ours(capsys, "snapshot", "-c", "cli", str(ours))[0] == 0
    assert "cli" in qemu_img("snapshot", "-l", str(ours)).stdout
    assert run_ours(capsys, "snapshot", "-a", "t", str(ours))[0] == 0
    assert run_ours(capsys, "snapshot", "-d", "cli", str(ours))[0] == 0
    assert "cli" not in qemu_img("snapshot", "-l", str(ours)).stdout
    assert qemu_img("check", str(ours)).returncode == 0
    rc, _, err = run_ours(capsys, "snapshot", "-a", "missing", str(ours))
    assert rc == 1 and "missing" in err


def test_check_leaks_and_repair_match_qemu(tmp_path: Path, qemu_img, capsys) -> None:  # type: ignore[no-untyped-def]
    base = tmp_path / "base.qcow2"
    img = Qcow2Image.create(base, 16 << 20)
    img.write(0, b"x" * 200_000)
    img.close()
    raw = bytearray(base.read_bytes())
    # Leak two clusters past the end of what is used: refcount 1, no reference.
    end = len(raw) // 65536
    rb = 0x20000
    raw[rb + 2 * end:rb + 2 * end + 4] = b"\x00\x01\x00\x01"
    raw += b"L" * (3 * 65536)
    for name in ("q.qcow2", "o.qcow2"):
        (tmp_path / name).write_bytes(raw)
    for argv in (["check"], ["check", "--output=json"]):
        theirs = qemu_img(*argv, str(tmp_path / "q.qcow2"))
        rc, out, err = run_ours(capsys, *argv, str(tmp_path / "q.qcow2"))
        assert (rc, out, err) == (theirs.returncode, theirs.stdout, theirs.stderr)
    theirs = qemu_img("check", "-r", "leaks", str(tmp_path / "q.qcow2"))
    rc, out, err = run_ours(capsys, "check", "-r", "leaks", str(tmp_path / "o.qcow2"))
    assert (rc, out, err) == (theirs.returncode, theirs.stdout, theirs.stderr)
    assert rc == 0 and "2 leaked clusters" in out


def test_a_large_write_into_fresh_space_creates_its_refcount_blocks_in_one_commit(
        tmp_path: Path, qemu_img, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """512-byte clusters, 16-bit refcounts: a refcount block covers 128 KiB, so 8 MiB of new
    data (plus its L2 tables) needs 65+ new blocks.  They are made by one shadow commit (the
    first allocation that lacks one creates those of the whole write), not one commit per
    block; the image stays clean for the real qemu-img and reads back the same."""
    from emulator.block import refcount

    commits: list[int] = []
    real = refcount.RefcountTxn.commit

    def counting(self: refcount.RefcountTxn, write_pointers: object) -> None:
        commits.append(sum(1 for b in self.dirty if self.saved_blocks.get(b, 0) is None))  # blocks it creates
        real(self, write_pointers)  # type: ignore[arg-type]

    monkeypatch.setattr(refcount.RefcountTxn, "commit", counting)
    path = tmp_path / "small.qcow2"
    data = np.random.default_rng(3).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    with Qcow2Image.create(path, 16 << 20, cluster_size=512) as img:
        commits.clear()
        img.write(4 << 20, data)
        creating = [n for n in commits if n]
        assert len(creating) == 1 and creating[0] >= (8 << 20) // (256 * 512), commits
        commits.clear()
        img.save_vmstate(0, data[:4 << 20])  # the VM state area (its L1 grows first): the same path
        creating = [n for n in commits if n]
        assert len(creating) == 1 and creating[0] >= (4 << 20) // (256 * 512), commits
    res = qemu_img("check", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    raw = tmp_path / "small.raw"
    assert qemu_img("convert", "-O", "raw", str(path), str(raw)).returncode == 0
    assert raw.read_bytes()[4 << 20:12 << 20] == data
