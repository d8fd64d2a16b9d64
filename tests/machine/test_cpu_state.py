"""Reading the register file of a running guest must not change it.

Unicorn reads an MSR by borrowing the live CPU's RAX, RCX and RDX (``x86_msr_read`` sets ECX
to the MSR's number, runs ``helper_rdmsr``, then puts the three back), so a ``reg_read`` of
EFER from another thread while the vCPU runs can hand the guest ECX = 0xC0000080 or undo one
of its writes.  The pre-copy engine read the CPU that way when it began, with the guest
running: a loop ended early (a disk write of a buffer filled part-way), a loop index went back,
and twice a store far outside RAM (docs/test-runs.md, the live-disk and model-test findings).
"""

from __future__ import annotations

import time
from pathlib import Path

from emulator.block import Qcow2Image
from emulator.runstate import RunState
from tests.model.guestdisk import LAB_COUNTER, data_range, disk0_problem, ram_problems
from tests.stress import kill9 as k

READS = 5_000


def test_reading_a_running_cpu_leaves_the_guest_as_it_was(tmp_path: Path) -> None:
    for d in k.DISKS:
        Qcow2Image.create(tmp_path / f"{d}.qcow2", k.DISK, cluster_size=65536).close()
    m, g = k.machine_on(tmp_path)
    try:
        m.start()
        end = time.monotonic() + 30
        while m.ram.read_u64(LAB_COUNTER) < 4 * k.SPEC.batch_pages:  # the workload runs
            assert time.monotonic() < end, "the guest never ran"
            time.sleep(0.01)
        seen = set()
        for _ in range(READS):
            seen.add(m.cpu.get_state()["RCX"])
            if m.state != RunState.RUNNING:
                break
        m.stop()
        assert m.state == RunState.PAUSED, (m.state, m.runctl.fault)
        counter = m.ram.read_u64(LAB_COUNTER)
        a, n = data_range(k.SPEC, k.RAM)
        assert ram_problems(k.SPEC, k.RAM, m.ram.read(a, n), counter) is None
        img0 = g["disk0"].format_image
        assert disk0_problem(k.SPEC, bytes(k.DISK), counter, m.ram.read_u64, img0.read(0, img0.size)) is None
        assert len(seen) > 1  # the reads did see the guest running
    finally:
        m.close()
        g.close()


def test_writing_the_register_file_never_writes_the_live_engine_register_by_register(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """set_state builds the new file on the scratch engine and restores it here in one copy:
    a write of EFER on the live engine would borrow its RAX, RCX and RDX as a read does."""
    from emulator import cpu as cpu_mod

    for d in k.DISKS:
        Qcow2Image.create(tmp_path / f"{d}.qcow2", k.DISK, cluster_size=65536).close()
    m, g = k.machine_on(tmp_path)
    try:
        m.start()
        m.stop()
        before = m.cpu.get_state()
        want = dict(before, RAX=0x1122_3344, RCX=9, EFER=before["EFER"])
        written = []
        real = cpu_mod._write_registers
        monkeypatch.setattr(cpu_mod, "_write_registers", lambda uc, regs: (written.append(uc), real(uc, regs))[1])
        m.cpu.set_state(want)
        assert written and all(uc is not m.cpu.uc for uc in written)
        assert m.cpu.get_state() == want and m.cpu._tlb_flush_pending
    finally:
        m.quit()
