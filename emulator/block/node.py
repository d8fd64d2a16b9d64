"""Block nodes and the node graph built from ``-blockdev`` options.

A node has a node-name, a driver (``file``, ``qcow2``, ``raw`` or the ``copy-on-read``
filter), a read-only flag and children (``file``, and ``backing`` for qcow2), as in QEMU's
BlockDriverState graph (block.c, qapi/block-core.json ``BlockdevOptions``).  A qcow2 node
whose header names a backing file opens it (read-only, with generated node names) unless its
options say ``backing`` (a node name, options, or null for none): ``bdrv_open_backing_file``.
A node a ``-drive`` made carries its BlockBackend's name (:attr:`BlockNode.backend`), which
errors show as QEMU's bdrv_get_device_or_node_name() does.  :attr:`BlockNode.can_snapshot`
is bdrv_can_snapshot(): a writable qcow2 node, or a node that falls back to its only data
child (a filter, raw over qcow2).  Imports neither unicorn nor asyncio.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from emulator.block.copy_on_read import CopyOnRead
from emulator.block.info import full_backing_filename
from emulator.block.io import OsFile
from emulator.block.qcow2 import Qcow2Image
from emulator.block.raw import RawImage
from emulator.errors import BlockError, DeviceNotFoundError, ImageFormatError

DRIVERS = ("copy-on-read", "file", "qcow2", "raw")
FORMATS = ("copy-on-read", "file", "qcow2", "raw")  # what `-drive format=help` lists
Image = Qcow2Image | RawImage | CopyOnRead
MAX_BACKING_CHAIN = 64
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
    image: Image | None = None
    backend: str = ""  # the BlockBackend's name when a -drive made this node its root
    _bytes: RawImage | None = None  # a protocol node's bytes as a device reads them

    @property
    def device_or_node_name(self) -> str:
        """bdrv_get_device_or_node_name(): the BlockBackend's name, else the node-name."""
        return self.backend or self.node_name

    @property
    def snapshot_node(self) -> BlockNode | None:
        """The node that takes this node's snapshots: itself for qcow2, else what
        bdrv_snapshot_fallback() gives (the primary child, when it is the only child)."""
        if self.driver == "qcow2":
            return self
        child = self.children.get("file")
        if child is None or len(self.children) != 1:
            return None
        return child.snapshot_node

    @property
    def can_snapshot(self) -> bool:
        """bdrv_can_snapshot(): writable, and qcow2 itself or falling back to a node that can."""
        if self.read_only:
            return False
        if self.driver == "qcow2":
            return True
        child = self.children.get("file")
        return child is not None and len(self.children) == 1 and child.can_snapshot

    @property
    def snapshot_image(self) -> Qcow2Image:
        """The qcow2 image that holds this node's snapshots (check :attr:`can_snapshot` first)."""
        node = self.snapshot_node
        if node is None or not isinstance(node.image, Qcow2Image):
            raise BlockError(f"Device '{self.device_or_node_name}' does not support snapshots")
        return node.image

    @property
    def format_image(self) -> Image:
        """What a device reads and writes: the format's image, or a protocol node's bytes."""
        if self.image is not None:
            return self.image
        if self._bytes is None:
            assert self.file is not None
            self._bytes = RawImage(self.file, read_only=self.read_only, filename=self.filename)
        return self._bytes

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
        """A node by node-name, or the root of the BlockBackend of that name (bdrv_lookup_bs)."""
        node = self.nodes.get(name) or next((n for n in self.nodes.values() if name and n.backend == name), None)
        if node is None:
            raise DeviceNotFoundError(f"Cannot find device='' nor node-name='{name}'")
        return node

    def generated_name(self) -> str:
        """A node-name QEMU's way (id_generate(ID_BLOCK)): ``#block`` and a counter."""
        self._anon += 1
        return f"#block{self._anon:03d}"

    def add(self, opts: dict[str, Any], *, for_check: bool = False) -> BlockNode:
        """blockdev-add: build a node (and any nested child) from options; ``for_check``: a
        qcow2 node opened as ``qemu-img check`` opens it (BDRV_O_CHECK)."""
        driver = opts.get("driver")
        if driver is None:
            raise BlockError("Parameter 'driver' is missing")
        if driver not in DRIVERS:
            raise BlockError(f"Parameter 'driver' does not accept value '{driver}'")
        name = opts.get("node-name")
        if name is None:
            name = self.generated_name()
        elif not _NODE_NAME.match(str(name)):
            raise BlockError("Invalid node-name: '%s'" % name)
        if name in self.nodes:
            raise BlockError(f"Duplicate nodes with node-name='{name}'")
        read_only = _bool(opts.get("read-only", False), "read-only")
        known = {"driver", "node-name", "read-only", "filename", "file", "cache", "discard", "auto-read-only",
                 "detect-zeroes"}
        if driver == "qcow2":
            known.add("backing")
        if driver == "file":
            known.add("locking")
        for k in opts:
            if k not in known:
                if driver == "file":
                    raise BlockError(f"Block protocol 'file' doesn't support the option '{k}'")
                raise BlockError(f"Block format '{driver}' does not support the option '{k}'")
        if driver == "file":
            node = self._open_file(name, opts, read_only)
        else:
            node = self._open_format(name, driver, opts, read_only, for_check)
        self.nodes[name] = node
        return node

    def _open_file(self, name: str, opts: dict[str, Any], read_only: bool) -> BlockNode:
        """file-posix's open."""
        filename = opts.get("filename")
        if not filename:
            raise BlockError("Parameter 'filename' is missing")
        no_flush = False
        cache = opts.get("cache")
        if isinstance(cache, dict) and "no-flush" in cache:
            no_flush = _bool(cache["no-flush"], "cache.no-flush")
        locking: bool | None = None  # auto: the process default (io.set_image_locking)
        if "locking" in opts:
            mode = opts["locking"]
            if mode not in ("on", "off", "auto"):
                raise BlockError(f"Parameter 'locking' does not accept value '{mode}'")  # (QAPI's enum input)
            locking = None if mode == "auto" else mode == "on"
        try:
            f = OsFile.open(filename, read_only=read_only, no_flush=no_flush, locking=locking)
        except OSError as err:
            raise BlockError(f"Could not open '{filename}': {err.strerror}") from err
        return BlockNode(name, "file", read_only, str(filename), file=f)

    def _child(self, opt: Any, read_only: bool) -> BlockNode:
        child = self.add(opt) if isinstance(opt, dict) else self.find(str(opt))
        if child.read_only and not read_only:
            raise BlockError(f"Block node '{child.node_name}' is read-only")
        return child

    def _open_format(self, name: str, driver: str, opts: dict[str, Any], read_only: bool,
                     for_check: bool = False) -> BlockNode:
        """A format or filter node over its ``file`` child (bdrv_open_inherit)."""
        child_opt = opts.get("file")
        if child_opt is None:
            raise BlockError("Parameter 'file' is missing")
        child = self._child(child_opt, read_only)
        if driver == "copy-on-read":
            cor = CopyOnRead(child.format_image, filename=child.filename)
            return BlockNode(name, driver, read_only or child.read_only, child.filename, {"file": child}, image=cor)
        if child.file is None:
            raise BlockError(f"Node '{child.node_name}' is not a protocol node")
        try:
            image: Qcow2Image | RawImage
            if driver == "qcow2":
                image = Qcow2Image(child.file, read_only=read_only, filename=child.filename, for_check=for_check)
                read_only = image.read_only
            else:
                image = RawImage(child.file, read_only=read_only, filename=child.filename)
        except ImageFormatError as err:
            raise BlockError(f"Could not open '{child.filename}': {err}") from err
        # raw passes the bytes through: a format node may sit on it as on the file itself
        node = BlockNode(name, driver, read_only, child.filename, {"file": child}, image=image,
                         file=child.file if driver == "raw" else None)
        if isinstance(image, Qcow2Image):
            try:
                self.bdrv_open_backing_file(node, image, opts.get("backing", ...), [])
            except BaseException:
                image.close()
                raise
        return node

    def bdrv_open_backing_file(self, node: BlockNode, image: Qcow2Image, option: Any,
                               chain: list[str]) -> None:
        """Attach the backing file: the node named by ``option``, the options it holds, none
        (null or ""), or (``...``: not given) the header's, opened read-only with generated
        node names, its format from the header (probed when absent)."""
        if option is None or option == "":
            return
        if option is not ...:
            backing = self._child(option, True)
        elif not image.backing_file:
            return
        else:
            backing = self._open_backing_chain(node.filename, image, chain)
        node.children["backing"] = backing
        image.backing = backing.format_image

    def _open_backing_chain(self, overlay: str, image: Qcow2Image, chain: list[str]) -> BlockNode:
        name = image.backing_file
        path = full_backing_filename(overlay, name)
        real = os.path.realpath(path)
        try:
            if real in chain or real == os.path.realpath(overlay) or len(chain) >= MAX_BACKING_CHAIN:
                raise BlockError(f"Backing file '{name}' creates an infinite loop.")
            fmt = image.backing_format or probe_format(path)
            file_node = self.add({"driver": "file", "filename": path, "read-only": True})
            try:
                fmt_node = self._open_format(self.generated_name(), fmt, {"file": file_node.node_name}, True) \
                    if fmt != "qcow2" else self._open_backing_qcow2(file_node, chain + [os.path.realpath(overlay)])
            except BaseException:
                file_node.close()
                del self.nodes[file_node.node_name]
                raise
        except BlockError as err:
            raise BlockError(f"Could not open backing file: {err.desc}") from err
        self.nodes[fmt_node.node_name] = fmt_node
        return fmt_node

    def _open_backing_qcow2(self, file_node: BlockNode, chain: list[str]) -> BlockNode:
        assert file_node.file is not None
        try:
            image = Qcow2Image(file_node.file, read_only=True, filename=file_node.filename)
        except ImageFormatError as err:
            raise BlockError(f"Could not open '{file_node.filename}': {err}") from err
        node = BlockNode(self.generated_name(), "qcow2", True, file_node.filename, {"file": file_node}, image=image)
        try:
            if image.backing_file:
                node.children["backing"] = self._open_backing_chain(file_node.filename, image, chain)
                image.backing = node.children["backing"].format_image
        except BaseException:
            image.close()
            raise
        return node

    def format_nodes(self) -> list[BlockNode]:
        return [n for n in self.nodes.values() if n.image is not None]

    def close(self) -> None:
        """bdrv_close_all(): the nodes in the reverse of their creation, so every node closes
        before the nodes under it (a qcow2 image trims and flushes its file as it closes, over
        a raw node or a file node); closing twice is harmless (a filter shares its child's image)."""
        for n in reversed(list(self.nodes.values())):
            if n.image is not None:
                n.image.close()
            elif n.file is not None and n.file.fd >= 0:
                n.file.close()
        self.nodes.clear()


def probe_format(path: str) -> str:
    """bdrv_probe_all(), for the two formats snaplab knows: qcow2 by its magic, else raw."""
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    except OSError as err:
        raise BlockError(f"Could not open '{path}': {err.strerror}") from err
