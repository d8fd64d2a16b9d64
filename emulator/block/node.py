"""Block nodes and the node graph built from ``-blockdev`` options.

A node has a node-name, a driver (``file``, ``qcow2`` or ``raw``), a read-only
flag and children (``file``), as in QEMU's BlockDriverState graph
(block.c, qapi/block-core.json ``BlockdevOptions``).  Only format nodes that
can hold internal snapshots answer True to :attr:`BlockNode.can_snapshot`
(QEMU's bdrv_can_snapshot()).  Imports neither unicorn nor asyncio.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from emulator.block.io import OsFile
from emulator.block.qcow2 import Qcow2Image
from emulator.block.raw import RawImage
from emulator.errors import BlockError, DeviceNotFoundError, ImageFormatError

DRIVERS = ("file", "qcow2", "raw")
_NODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,31}$")


@dataclass
class BlockNode:
    """A BlockDriverState: one node of the graph."""

    node_name: str
    driver: str
    read_only: bool
    filename: str
    children: dict[str, BlockNode] = field(default_factory=dict)
    file: OsFile | None = None
    image: Qcow2Image | RawImage | None = None

    @property
    def can_snapshot(self) -> bool:
        """bdrv_can_snapshot(): a writable qcow2 node (QEMU: inserted, not read-only, has the callbacks)."""
        return self.driver == "qcow2" and not self.read_only

    @property
    def format_image(self) -> Qcow2Image | RawImage:
        if self.image is None:
            raise BlockError(f"Node '{self.node_name}' is a protocol node and has no format")
        return self.image

    @property
    def size(self) -> int:
        if self.image is not None:
            return self.image.size
        assert self.file is not None
        return self.file.size()

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
        elif self.file is not None:
            self.file.close()


def parse_blockdev(arg: str) -> dict[str, Any]:
    """Parse a ``-blockdev`` argument: a JSON object, or key=value pairs with dotted keys."""
    arg = arg.strip()
    if arg.startswith("{"):
        try:
            opts = json.loads(arg)
        except json.JSONDecodeError as err:
            raise BlockError(f"-blockdev: JSON parse error: {err.msg}") from err
        if not isinstance(opts, dict):
            raise BlockError("-blockdev: expected a JSON object")
        return opts
    out: dict[str, Any] = {}
    for part in split_keyval(arg):
        if "=" not in part:
            raise BlockError(f"-blockdev: Expected '=' after parameter '{part}'")
        key, val = part.split("=", 1)
        cur = out
        keys = key.split(".")
        for k in keys[:-1]:
            nxt = cur.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise BlockError(f"-blockdev: Parameter '{key}' conflicts with '{k}'")
            cur = nxt
        cur[keys[-1]] = val
    return out


def split_keyval(arg: str) -> list[str]:
    """Split on commas; ',,' is a literal comma (QEMU's keyval syntax)."""
    parts, cur, i = [], [], 0
    while i < len(arg):
        if arg[i] == ",":
            if i + 1 < len(arg) and arg[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(arg[i])
        i += 1
    parts.append("".join(cur))
    return [p for p in parts if p]


def _bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if v in ("on", "true", "yes"):
        return True
    if v in ("off", "false", "no"):
        return False
    raise BlockError(f"Parameter '{name}' expects 'on' or 'off'")


class BlockGraph:
    """All nodes by node-name (QEMU's graph of named nodes)."""

    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}
        self._anon = 0

    def __getitem__(self, name: str) -> BlockNode:
        return self.find(name)

    def find(self, name: str) -> BlockNode:
        node = self.nodes.get(name)
        if node is None:
            raise DeviceNotFoundError(f"Cannot find device='' nor node-name='{name}'")
        return node

    def add(self, opts: dict[str, Any]) -> BlockNode:
        """blockdev-add: build a node (and any nested child) from options."""
        driver = opts.get("driver")
        if driver is None:
            raise BlockError("Parameter 'driver' is missing")
        if driver not in DRIVERS:
            raise BlockError(f"Parameter 'driver' does not accept value '{driver}'")
        name = opts.get("node-name")
        if name is None:
            self._anon += 1
            name = f"#block{self._anon:03d}"
        elif not _NODE_NAME.match(str(name)):
            raise BlockError("Invalid node-name: '%s'" % name)
        if name in self.nodes:
            raise BlockError(f"Duplicate nodes with node-name='{name}'")
        read_only = _bool(opts.get("read-only", False), "read-only")
        known = {"driver", "node-name", "read-only", "filename", "file", "cache", "discard", "auto-read-only"}
        for k in opts:
            if k not in known:
                raise BlockError(f"Block format '{driver}' does not support the option '{k}'")
        if driver == "file":
            filename = opts.get("filename")
            if not filename:
                raise BlockError("Parameter 'filename' is missing")
            no_flush = False
            cache = opts.get("cache")
            if isinstance(cache, dict) and "no-flush" in cache:
                no_flush = _bool(cache["no-flush"], "cache.no-flush")
            f = OsFile.open(filename, read_only=read_only, no_flush=no_flush)
            node = BlockNode(name, "file", read_only, filename, file=f)
        else:
            child_opt = opts.get("file")
            if child_opt is None:
                raise BlockError("Parameter 'file' is missing")
            child = self.add(child_opt) if isinstance(child_opt, dict) else self.find(str(child_opt))
            if child.file is None:
                raise BlockError(f"Node '{child.node_name}' is not a protocol node")
            if child.read_only and not read_only:
                raise BlockError(f"Block node '{child.node_name}' is read-only")
            try:
                image: Qcow2Image | RawImage
                if driver == "qcow2":
                    image = Qcow2Image(child.file, read_only=read_only, filename=child.filename)
                    read_only = image.read_only
                else:
                    image = RawImage(child.file, read_only=read_only, filename=child.filename)
            except ImageFormatError as err:
                raise BlockError(f"Could not open '{child.filename}': {err}") from err
            node = BlockNode(name, driver, read_only, child.filename, {"file": child}, image=image)
        self.nodes[name] = node
        return node

    def format_nodes(self) -> list[BlockNode]:
        return [n for n in self.nodes.values() if n.image is not None]

    def close(self) -> None:
        for n in self.nodes.values():
            if n.image is not None:
                n.image.close()
        for n in self.nodes.values():
            if n.image is None and n.file is not None and n.file.fd >= 0:
                n.file.close()
        self.nodes.clear()
