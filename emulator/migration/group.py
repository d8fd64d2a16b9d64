"""The group operations of an internal snapshot over every block node that takes part.

Mirrors QEMU's block/snapshot.c: ``bdrv_all_get_snapshot_devices``, ``bdrv_all_can_snapshot``,
``bdrv_all_has_snapshot``, ``bdrv_all_find_vmstate_bs``, ``bdrv_all_delete_snapshot`` and
``bdrv_all_goto_snapshot``, with QEMU's check order and texts.  Plain functions over block
nodes; imports no engine, no run-state control.
"""

from __future__ import annotations

from emulator.block.node import BlockGraph, BlockNode
from emulator.block.qcow2 import Qcow2Image
from emulator.block.snapshot import QCowSnapshot
from emulator.errors import BlockIOError, SnaplabError


def image(n: BlockNode) -> Qcow2Image:
    """The qcow2 image of a node that can snapshot (checked by :func:`can_snapshot`)."""
    return n.snapshot_image  # a filter's snapshots are its child's (bdrv_snapshot_fallback)


def named(img: Qcow2Image, name: str) -> QCowSnapshot | None:
    """The first snapshot of that name on ``img``, or None."""
    return next((s for s in img.snapshot_list() if s.name == name), None)


def devices(graph: BlockGraph, attached: list[str], names: list[str] | None) -> list[BlockNode]:
    """bdrv_all_get_snapshot_devices(): the explicit list (each name resolved), or every
    writable node a device uses or that has no parent."""
    if names is not None:
        if not names:
            raise SnaplabError("At least one device is required for snapshot")
        out: list[BlockNode] = []
        for name in names:
            node = graph.nodes.get(name)
            if node is None:
                raise SnaplabError(f"No block device node '{name}'")
            if node not in out:  # QEMU 7.2 snapshots a node listed twice twice
                out.append(node)
        return out
    nodes = list(graph.nodes.values())
    used = set(attached)
    parents = {c.node_name for n in nodes for c in n.children.values()}
    return [n for n in nodes if not n.read_only and (n.node_name in used or n.node_name not in parents)]


def can_snapshot(nodes: list[BlockNode]) -> None:
    """bdrv_all_can_snapshot()."""
    for n in nodes:
        if not n.can_snapshot:
            if n.read_only:
                raise SnaplabError(f"Device '{n.device_or_node_name}' is read-only and does not support snapshots")
            raise SnaplabError(f"Device '{n.device_or_node_name}' is writable but does not support snapshots")


def has_snapshot(name: str, nodes: list[BlockNode]) -> bool:
    """bdrv_all_has_snapshot() == 1: every node has a snapshot of that name."""
    return all(named(image(n), name) is not None for n in nodes)


def any_has(name: str, nodes: list[BlockNode]) -> bool:
    """Some node has a snapshot of that name (save_snapshot()'s "already exists" check)."""
    return any(named(image(n), name) is not None for n in nodes)


def find_vmstate_bs(vmstate: str | None, nodes: list[BlockNode]) -> BlockNode:
    """bdrv_all_find_vmstate_bs()."""
    for n in nodes:
        found = n.can_snapshot
        if vmstate is None:
            if found:
                return n
        elif n.node_name == vmstate:
            if found:
                return n
            raise SnaplabError(f"vmstate block device '{vmstate}' does not support snapshots")
    if vmstate is not None:
        raise SnaplabError(f"vmstate block device '{vmstate}' does not exist")
    raise SnaplabError("no block device can store vmstate for snapshot")


def delete_all(name: str, nodes: list[BlockNode]) -> None:
    """bdrv_all_delete_snapshot(): the first snapshot of that name on each node that has one."""
    for n in nodes:
        img = image(n)
        s = named(img, name)
        if s is not None:
            try:
                img.snapshot_delete(s.id_str, s.name)
            except BlockIOError as err:  # qcow2_snapshot_delete()'s first write is the table's
                raise SnaplabError(f"Could not delete snapshot '{name}' on '{n.device_or_node_name}': "
                                   f"Failed to remove snapshot from snapshot list: {err.strerror}") from err
            except SnaplabError as err:
                raise SnaplabError(f"Could not delete snapshot '{name}' on '{n.device_or_node_name}': {err}") from err


def goto_all(name: str, nodes: list[BlockNode], *, check_only: bool = False) -> None:
    """bdrv_all_goto_snapshot(), or only its checks (``check_only``)."""
    for n in nodes:
        try:
            if check_only:
                image(n).snapshot_goto_check(name)
            else:
                image(n).snapshot_goto(name)
        except BlockIOError as err:  # bdrv_snapshot_goto()'s error_setg_errno(errp, ret, "Failed to load snapshot")
            raise SnaplabError(f"Could not load snapshot '{name}' on '{n.device_or_node_name}': "
                               f"Failed to load snapshot: {err.strerror}") from err
        except SnaplabError as err:
            raise SnaplabError(f"Could not load snapshot '{name}' on '{n.device_or_node_name}': {err}") from err
