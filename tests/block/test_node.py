"""The -blockdev node graph: parsing, building, can_snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.block import Qcow2Image
from emulator.block.node import BlockGraph, parse_blockdev
from emulator.errors import BlockError, DeviceNotFoundError


def test_parse_json_and_keyval() -> None:
    assert parse_blockdev('{"driver": "file", "filename": "/x", "node-name": "f"}') == {
        "driver": "file", "filename": "/x", "node-name": "f"}
    assert parse_blockdev("driver=qcow2,node-name=d,file.driver=file,file.filename=/a,,b") == {
        "driver": "qcow2", "node-name": "d", "file": {"driver": "file", "filename": "/a,b"}}
    with pytest.raises(BlockError, match="Expected '='"):
        parse_blockdev("driver")


def test_graph_like_qemu_command_line(tmp_path: Path) -> None:
    disk = tmp_path / "disk0.qcow2"
    Qcow2Image.create(disk, 1 << 20).close()
    vars_ = tmp_path / "vars.fd"
    vars_.write_bytes(bytes(128 << 10))
    g = BlockGraph()
    g.add(parse_blockdev(f'{{"driver": "file", "filename": "{vars_}", "node-name": "fw-vars-file"}}'))
    raw = g.add(parse_blockdev('{"driver": "raw", "file": "fw-vars-file", "node-name": "fw-vars"}'))
    g.add(parse_blockdev(f"driver=file,filename={disk},node-name=disk0-file"))
    q = g.add(parse_blockdev("driver=qcow2,file=disk0-file,node-name=disk0"))
    nested = g.add({"driver": "qcow2", "node-name": "disk1", "read-only": True,
                    "file": {"driver": "file", "filename": str(disk), "read-only": "on"}})
    assert q.can_snapshot and not raw.can_snapshot and not nested.can_snapshot
    assert not g["disk0-file"].can_snapshot
    assert raw.size == 128 << 10 and q.size == 1 << 20
    q.format_image.write(0, b"abc")
    assert q.format_image.read(0, 3) == b"abc"
    with pytest.raises(BlockError, match="Duplicate nodes with node-name='disk0'"):
        g.add({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"})
    with pytest.raises(DeviceNotFoundError):
        g.add({"driver": "qcow2", "file": "nope", "node-name": "x"})
    with pytest.raises(BlockError, match="Parameter 'driver' is missing"):
        g.add({"node-name": "y"})
    with pytest.raises(BlockError, match="does not accept value 'vmdk'"):
        g.add({"driver": "vmdk", "node-name": "y"})
    with pytest.raises(BlockError, match="Could not open"):
        g.add({"driver": "qcow2", "file": "fw-vars-file", "node-name": "bad"})
    g.close()
