"""qcow2 backing files and the copy-on-read filter, iotests style and against qemu-img/qemu-io.

Patterns: the base holds 0x11, the overlay writes 0x22 straddling cluster boundaries; reads
fall through where the overlay has nothing, writes allocate in the overlay only, partial
clusters are completed from the base; qemu-img checks and reads every image both ways.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from emulator.block import BlockGraph, Qcow2Image
from emulator.errors import BlockError
from emulator.img import main as img_main

pytestmark = pytest.mark.qemu
CS = 65536
SIZE = 4 << 20


def sh(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def qemu_io(path: Path, *cmds: str) -> str:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    out = sh(*argv, str(path))
    assert "Pattern verification failed" not in out, out
    return out


def base_and_overlay(tmp: Path, by: str) -> tuple[Path, Path]:
    """base.qcow2 full of 0x11 (written by qemu-io), an empty overlay made by ``by``."""
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE))
    qemu_io(base, f"write -P 0x11 0 {SIZE}")
    if by == "qemu-img":
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    else:
        assert img_main(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top)]) == 0
    return base, top


def open_top(top: Path) -> tuple[BlockGraph, Qcow2Image]:
    g = BlockGraph()
    node = g.add({"driver": "qcow2", "file": {"driver": "file", "filename": str(top)}})
    assert isinstance(node.image, Qcow2Image)
    return g, node.image


@pytest.mark.parametrize("by", ["qemu-img", "snaplab-img"])
def test_reads_fall_through_and_writes_allocate_in_the_overlay(tmp_path: Path, by: str) -> None:
    base, top = base_and_overlay(tmp_path, by)
    g, img = open_top(top)
    assert img.backing_file == "base.qcow2" and img.backing_format == "qcow2"
    assert img.read(0, SIZE) == b"\x11" * SIZE
    img.write(CS - 100, b"\x22" * (CS + 200))  # straddles two cluster boundaries
    img.write_zeroes(3 * CS, CS)  # a zero cluster hides the base
    assert img.read(0, 3 * CS) == b"\x11" * (CS - 100) + b"\x22" * (CS + 200) + b"\x11" * (CS - 100)
    assert img.read(3 * CS, CS) == bytes(CS)
    assert img.is_allocated(0, 5 * CS).tolist() == [True, True, True, True, False]
    assert img.check().clean
    g.close()
    qemu_io(top, f"read -P 0x11 0 {CS - 100}", f"read -P 0x22 {CS - 100} {CS + 200}",
            f"read -P 0x11 {2 * CS + 100} {CS - 100}", f"read -P 0 {3 * CS} {CS}", f"read -P 0x11 {4 * CS} {CS}")
    qemu_io(base, f"read -P 0x11 0 {SIZE}")  # the base was never written
    assert "No errors were found" in sh("qemu-img", "check", str(top))
    mapped = json.loads(sh("qemu-img", "map", "--output=json", str(top)))
    depth = {c: m["depth"] for m in mapped for c in range(m["start"] // CS, (m["start"] + m["length"]) // CS)}
    assert [depth[c] for c in range(6)] == [0, 0, 0, 0, 1, 1]  # overlay, overlay, ..., then the base


def test_info_and_the_header_are_qemu_imgs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, top = base_and_overlay(tmp_path, "snaplab-img")
    ref = tmp_path / "ref.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(ref))
    assert top.read_bytes()[:CS] == ref.read_bytes()[:CS]  # the same header, extensions and name
    capsys.readouterr()
    for argv in (["info", "--backing-chain"], ["info", "--output=json", "--backing-chain"], ["info"]):
        assert img_main([*argv, str(top)]) == 0
        ours = capsys.readouterr().out
        theirs = sh("qemu-img", *argv, str(top))
        assert ours == theirs


def test_snapshots_go_on_the_overlay_only(tmp_path: Path) -> None:
    base, top = base_and_overlay(tmp_path, "qemu-img")
    g, img = open_top(top)
    img.write(0, b"\x22" * 512)
    img.snapshot_create("s1")
    img.write(0, b"\x33" * CS)
    img.snapshot_goto("s1")
    assert img.read(0, 1024) == b"\x22" * 512 + b"\x11" * 512
    g.close()
    assert "s1" in sh("qemu-img", "snapshot", "-l", str(top))
    assert sh("qemu-img", "snapshot", "-l", str(base)) == ""
    out = tmp_path / "flat.raw"
    sh("qemu-img", "convert", "-O", "raw", "-l", "snapshot.name=s1", str(top), str(out))
    data = out.read_bytes()
    assert data[:1024] == b"\x22" * 512 + b"\x11" * 512 and data[CS:2 * CS] == b"\x11" * CS


def test_our_convert_flattens_the_chain(tmp_path: Path) -> None:
    base, top = base_and_overlay(tmp_path, "qemu-img")
    qemu_io(top, "write -P 0x22 1000 70000")
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    assert img_main(["convert", "-O", "raw", str(top), str(ours)]) == 0
    sh("qemu-img", "convert", "-O", "raw", str(top), str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()


def test_missing_backing_file_and_loops_are_refused_with_qemus_words(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", str(a), "1M")
    with pytest.raises(BlockError, match=r"^Could not open backing file: Could not open '.*gone.qcow2': "
                                         r"No such file or directory$"):
        open_top(a)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a), "1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", str(b), "1M")
    with pytest.raises(BlockError, match="creates an infinite loop"):
        open_top(a)
    g = BlockGraph()
    node = g.add({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(a)}})
    assert "backing" not in node.children  # backing: null opens the image alone
    g.close()


def test_copy_on_read_copies_what_it_read_into_the_overlay(tmp_path: Path) -> None:
    base, top = base_and_overlay(tmp_path, "qemu-img")
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(top), "node-name": "file"})
    g.add({"driver": "qcow2", "file": "file", "node-name": "fmt"})
    cor = g.add({"driver": "copy-on-read", "file": "fmt", "node-name": "filter"})
    assert cor.can_snapshot and cor.snapshot_node is g["fmt"]
    assert cor.format_image.read(CS + 10, 100) == b"\x11" * 100
    g.close()
    mapped = json.loads(sh("qemu-img", "map", "--output=json", str(top)))
    here = [(m["start"], m["length"]) for m in mapped if m["depth"] == 0 and m["data"]]
    assert here == [(CS, CS)]  # exactly the cluster read, now in the overlay
    assert "No errors were found" in sh("qemu-img", "check", str(top))
    qemu_io(top, f"read -P 0x11 0 {SIZE}")
