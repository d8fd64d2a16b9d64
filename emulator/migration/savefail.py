"""A failed save's error path, shared by the save engines: QEMU's texts, and what is given back.

QEMU's ``save_snapshot()`` reports a write the disk refused while writing the VM state as
``Error while writing VM state: <strerror>`` (``qemu_savevm_state``) and a failed table entry
as ``Could not create snapshot 'x' on 'node'`` (``bdrv_all_create_snapshot``, whose entries
on other nodes ``save_snapshot()`` deletes again); the guest is resumed at ``the_end``.
snaplab also gives back the clusters the failed save took (docs/deviations.md).  Imports
the block layer and errors only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from emulator.block.node import BlockNode
from emulator.block.qcow2 import Qcow2Image
from emulator.errors import BlockIOError, SnaplabError


@contextlib.contextmanager
def writing_vmstate() -> Iterator[None]:
    """qemu_savevm_state()'s error: a write the file below refused (a full or failing disk)
    becomes ``Error while writing VM state: No space left on device``
    (``error_setg_errno(errp, -ret, "Error while writing VM state")``)."""
    try:
        yield
    except BlockIOError as err:
        raise SnaplabError(f"Error while writing VM state: {err.strerror}") from err


def give_back_vmstate(img: Qcow2Image) -> None:
    """A save failed: the VM state it wrote into ``img``'s active L1 is freed (its clusters
    go back to the image).  Failing again here (the disk still refuses) only leaks them: the
    save's own error is the one reported."""
    with contextlib.suppress(SnaplabError):
        img.discard_vmstate()


def create_error(name: str, node: BlockNode, err: SnaplabError) -> SnaplabError:
    """bdrv_all_create_snapshot()'s "Could not create snapshot 'x' on 'disk0': <cause>", where
    a write the disk refused is told by its strerror (not the block layer's offset detail)."""
    cause = err.strerror if isinstance(err, BlockIOError) else str(err)
    return SnaplabError(f"Could not create snapshot '{name}' on '{node.device_or_node_name}': {cause}")


def delete_quietly(nodes: list[BlockNode], name: str) -> None:
    """save_snapshot()'s cleanup (``bdrv_all_delete_snapshot(sn->name, ..., NULL)``): the
    entries of that name go from every node, errors ignored."""
    for n in nodes:
        img = n.snapshot_image
        sn = next((s for s in img.snapshot_list() if s.name == name), None)
        if sn is not None:
            with contextlib.suppress(SnaplabError):
                img.snapshot_delete(sn.id_str, sn.name)


def flush_or_undo(nodes: list[BlockNode], name: str) -> None:
    """The flush that makes a new snapshot durable; if the disk refuses it, the snapshot is
    not reported as made: its entries are deleted again and the save fails as QEMU's does
    when qcow2_snapshot_create()'s flush fails."""
    for n in nodes:
        try:
            n.snapshot_image.flush()
        except BlockIOError as err:
            delete_quietly(nodes, name)
            raise SnaplabError(f"Could not create snapshot '{name}' on '{n.device_or_node_name}': "
                               f"{err.strerror}") from err
