"""What was read and checked about a snapshot, remembered so a load does not do it again.

A snapshot's VM state and disk tree cannot change while it exists (their clusters are only
ever read), so its parsed VM state, the devices' decoded state, the VM state's cluster map and
whether its disk tree passed ``snapshot_goto``'s checks are made once: right after the save
that wrote it, or at its first load.  QEMU has no such cache (its loads read and check
everything inside the stop); it is what lets a lazy load stop the guest for under a
millisecond.  Keyed by the snapshot table entry, at most 16 snapshots.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import numpy as np

from emulator.block.node import BlockNode
from emulator.block.qcow2 import Qcow2Image
from emulator.block.snapshot import QCowSnapshot
from emulator.migration import group
from emulator.migration.postcopy import check_cluster_map
from emulator.migration.vmstate import ParsedState, SaveHandler, parse_state, prepare_state
from emulator.migration.vmstate_io import VMStateStream

KEPT = 16


class SnapshotFacts:
    """An LRU of per-snapshot facts (see the module docstring)."""

    def __init__(self) -> None:
        self._facts: collections.OrderedDict[tuple[Any, ...], tuple[Qcow2Image, dict[str, Any]]] = \
            collections.OrderedDict()

    def of(self, img: Qcow2Image, sn: QCowSnapshot) -> dict[str, Any]:
        """The facts of one snapshot of one image (a new, empty record if none is kept)."""
        key = (sn.id_str, sn.l1_table_offset, sn.vm_state_size, sn.date_sec, sn.date_nsec)
        hit = self._facts.get(key)
        if hit is None or hit[0] is not img:
            hit = (img, {})
            self._facts[key] = hit
            while len(self._facts) > KEPT:
                self._facts.popitem(last=False)
        self._facts.move_to_end(key)
        return hit[1]

    def _remembered(self, img: Qcow2Image, sn: QCowSnapshot, key: str, make: Callable[[], Any]) -> Any:
        facts = self.of(img, sn)
        if key not in facts:
            facts[key] = make()
        return facts[key]

    def parsed_state(self, img: Qcow2Image, sn: QCowSnapshot, handlers: list[SaveHandler],
                     machine: str) -> ParsedState:
        """parse_state() of a snapshot's VM state, bound to ``handlers``."""
        hit = self.of(img, sn)
        cached: tuple[list[SaveHandler], ParsedState] | None = hit.get("parsed")  # (bound to, state)
        if cached is None:
            state = parse_state(VMStateStream(img, sn.id_str), sn.vm_state_size, machine, handlers)
        elif cached[0] is handlers:  # the machine makes its list once: nothing to rebind
            return cached[1]
        else:
            state = cached[1].rebind(handlers)
        hit["parsed"] = (handlers, state)
        return state

    def prepared_state(self, img: Qcow2Image, sn: QCowSnapshot, parsed: ParsedState) -> Callable[[], None]:
        """prepare_state() of a snapshot's devices and CPU: what a lazy load applies in its stop."""
        apply: Callable[[], None] = self._remembered(img, sn, "prepared", lambda: prepare_state(parsed))
        return apply

    def vmstate_map(self, img: Qcow2Image, sn: QCowSnapshot) -> tuple[np.ndarray, int]:
        """The VM state's cluster map, checked for what lazy restore can read."""
        def make() -> tuple[np.ndarray, int]:
            cmap, base = img.snapshot_vmstate_map(sn.id_str)
            check_cluster_map(cmap, img.cluster_size)
            return cmap, base

        got: tuple[np.ndarray, int] = self._remembered(img, sn, "cmap", make)
        return got

    def goto_checked(self, name: str, nodes: list[BlockNode]) -> None:
        """snapshot_goto()'s checks for every node, once per snapshot."""
        todo = []
        for n in nodes:
            img = group.image(n)
            sn = group.named(img, name)
            if sn is None or not self.of(img, sn).get("goto_ok"):
                todo.append((n, img, sn))
        group.goto_all(name, [n for n, _, _ in todo], check_only=True)
        for _, img, sn in todo:
            if sn is not None:
                self.of(img, sn)["goto_ok"] = True
