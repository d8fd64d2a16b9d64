"""RAM the guest never wrote stays the kernel's shared zero page through every engine.

A page that was never written costs no memory and reads from cache; once it has been made a
real zeroed page (a write-populate, a memset, a collapse over zero-page mappings) the next
blocking save's zero-page scan reads it from memory (measured at 4 GiB: 146-151 ms with
never-written RAM on the zero page, 233-243 ms after one write-populate).  Each engine below
must leave RAM's resident size near the guest's working set, and every load must give back
the saved bytes exactly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from emulator.block import Qcow2Image
from emulator.guest import WorkloadSpec
from emulator.machine import Machine
from emulator.memory import HUGE
from emulator.migration.vmstate import PAGE, nonzero_pages
from emulator.uffd import small_mapped_bytes, zero_mapped_units
from tests.migration.test_cow import _mapping_rss, machine, uffd_or_skip

RAM = 256 << 20
WORKING_SET = 16 << 20


@pytest.fixture
def vm(tmp_path: Path):  # type: ignore[no-untyped-def]
    uffd_or_skip()
    m, g = machine(tmp_path, WorkloadSpec("dirty", seed=6, working_set=WORKING_SET, pattern="random"), RAM)
    yield m
    m.close()
    g.close()
    assert Qcow2Image.open(tmp_path / "d0.qcow2").check().clean


def _ram_hash(m: Machine) -> str:
    return hashlib.sha256(m.ram.read(0, RAM)).hexdigest()


def _lean(m: Machine) -> bool:
    """RAM's resident size below half of it (every page made real would be all of it), and all
    but a few chunks mapped by 2 MiB entries (the huge zero page, or a THP)."""
    return _mapping_rss(m.ram.addr) < RAM // 2 and small_mapped_bytes(m.ram.addr, m.ram.span) <= 8 << 20


def _zero_chunks(m: Machine) -> int:
    """2 MiB chunks of RAM with no non-zero page."""
    return int((~nonzero_pages(m.ram.array).reshape(-1, HUGE // PAGE).any(axis=1)).sum())


def test_no_engine_turns_never_written_ram_into_real_memory(vm: Machine) -> None:
    m = vm
    assert m.run_instructions(3_000_000) is None  # the guest writes (part of) its working set
    saved = _ram_hash(m)
    zero_chunks = _zero_chunks(m)
    assert zero_chunks > RAM // HUGE // 2  # the point of the test: most of RAM never written

    m.snapshots.save_snapshot("cow", False, "disk0", ["disk0"], "cow")
    assert _lean(m)
    m.snapshots.save_snapshot("pre", False, "disk0", ["disk0"], "precopy")  # dirty tracking + collapse
    assert _lean(m)
    assert m.run_instructions(1_000_000) is None  # move away from the snapshots

    # The blocking load after a background engine keeps RAM present: zero chunks as the zero page.
    m.snapshots.load_snapshot("cow", "disk0", ["disk0"], engine="blocking")
    assert _ram_hash(m) == saved
    assert _lean(m)
    assert m.run_instructions(1_000_000) is None

    # A lazy load leaves an all-zero chunk to the huge zero page (nothing read) and collapses only the rest.
    for engine in ("background", "ondemand"):
        met = m.snapshots.load_snapshot("pre", "disk0", ["disk0"], engine=engine)
        assert _ram_hash(m) == saved, engine
        assert met.extra["zero_chunks"] == zero_chunks, engine
        assert met.extra["bytes_read"] <= int(nonzero_pages(m.ram.array).sum()) * PAGE
        assert _lean(m), engine
        assert m.run_instructions(1_000_000) is None

    # The guest still writes into chunks that were installed as the zero page, and a save sees it.
    m.ram.write(RAM - PAGE, b"\x5a" * 8)
    m.snapshots.save_snapshot("last", False, "disk0", ["disk0"], "cow")
    m.ram.write(RAM - PAGE, bytes(8))
    m.snapshots.load_snapshot("last", "disk0", ["disk0"], engine="background")
    assert m.ram.read(RAM - PAGE, 8) == b"\x5a" * 8
    assert np.count_nonzero(nonzero_pages(m.ram.array)) > 0


def test_a_blocking_save_reads_no_chunk_still_mapped_to_the_zero_page(vm: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the guest stopped, a chunk mapped to the shared zero page holds zeros: the blocking
    save read-maps RAM first (never-written RAM becomes that page), knows those chunks from the
    page tables and scans only the rest (QEMU reads every page); a chunk the guest filled with
    written zeros is still read, and the snapshot loads back bit for bit."""
    from emulator.migration import vmstate

    m = vm
    assert m.run_instructions(3_000_000) is None
    m.ram.write(RAM - HUGE, bytes(HUGE))  # written zeros: real memory, a zero chunk only a read can tell
    saved = _ram_hash(m)
    scanned: list[int] = []
    scan = vmstate.nonzero_pages

    def counting(ram: np.ndarray, threads: int = 1) -> np.ndarray:
        scanned.append(ram.size // PAGE)
        return scan(ram, threads)

    monkeypatch.setattr(vmstate, "nonzero_pages", counting)
    met = m.snapshots.save_snapshot("b", False, "disk0", ["disk0"], "blocking")
    monkeypatch.setattr(vmstate, "nonzero_pages", scan)
    try:
        zero = zero_mapped_units(m.ram.addr, RAM, HUGE)  # as the save found them (the guest has not run since)
    except OSError as err:
        pytest.skip(f"the kernel has no PAGEMAP_SCAN (Linux 6.7): {err}")
    zero_mapped = int(zero.sum())
    assert zero_mapped > RAM // HUGE // 2 and not zero[-1]  # most of RAM never written; the zeros written are real
    assert met.extra["zero_chunks"] == zero_mapped
    assert sum(scanned) == (RAM // HUGE - zero_mapped) * (HUGE // PAGE)  # the other chunks, each once
    assert met.extra["scanned_bytes"] == sum(scanned) * PAGE
    assert met.ram_pages_written == int(nonzero_pages(m.ram.array).sum())
    m.ram.write(0, b"\x77" * PAGE)
    m.snapshots.load_snapshot("b", "disk0", ["disk0"], engine="blocking")
    assert _ram_hash(m) == saved


@pytest.mark.parametrize("walk", ["scattered", "no PAGEMAP_SCAN"])
def test_a_blocking_save_without_the_shortcut_reads_every_page(vm: Machine, walk: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Where written chunks are scattered (more runs in a 128 MiB window than are worth a scan
    each) the window is scanned whole, in the save's threads; where the kernel cannot walk the
    page tables no chunk is known zero and every page is read. Either way the snapshot is the
    same, bit for bit."""
    from emulator.migration import vmstate
    from emulator.migration.engines import save_blocking

    m = vm
    assert m.run_instructions(1_000_000) is None
    window = vmstate.SCAN_WINDOW * PAGE
    if walk == "scattered":  # every other chunk of the last window written: 32 runs there
        for off in range(RAM - window, RAM, 2 * HUGE):
            m.ram.write(off + 5 * PAGE, b"\x11")
    else:
        monkeypatch.setattr(save_blocking, "zero_mapped_units_or_none", lambda addr, size, unit: None)
    saved = _ram_hash(m)
    met = m.snapshots.save_snapshot("w", False, "disk0", ["disk0"], "blocking")
    if walk == "scattered":
        assert met.extra["zero_chunks"] > 0
        assert met.extra["scanned_bytes"] >= window  # the last window read whole
    else:
        assert met.extra["zero_chunks"] == 0 and met.extra["scanned_bytes"] == RAM
    assert met.ram_pages_written == int(nonzero_pages(m.ram.array).sum())
    m.ram.write(RAM - PAGE, b"\x77" * 8)
    m.snapshots.load_snapshot("w", "disk0", ["disk0"], engine="blocking")
    assert _ram_hash(m) == saved
