"""The vCPU: Unicorn's x86-64 emulator (QEMU's TCG) and everything that touches its constants.

This is the only module that imports unicorn's x86 constants.  It offers: mapping RAM and
ROM, port I/O and exception hooks, running and stopping, and the full register state as
plain data (general, segment, control, flags, x87, SSE) for the vmstate stream, in a fixed,
documented order (:data:`REGISTERS`).  The guest runs in 64-bit mode without paging: flat
addresses, as Unicorn sets it up.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import unicorn
import unicorn.x86_const as x86
from unicorn import (
    UC_ARCH_X86,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
    UcError,
)
from unicorn.unicorn import UcContext


def _emu_stop_keeping_gil() -> Callable[[int], int] | None:
    """uc_emu_stop through a ``PyDLL`` on the binding's own libunicorn handle (unicorn 2.1's
    layout): a call that keeps the GIL (see :meth:`X86CPU.stop`); None for another layout."""
    try:
        from unicorn.unicorn_py3.unicorn import uclib
        fn = ctypes.PyDLL(uclib._name, handle=uclib._handle).uc_emu_stop
    except (ImportError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_EMU_STOP_KEEP_GIL = _emu_stop_keeping_gil()


class OutHook(Protocol):
    """A machine-code OUT hook (emulator.devices.doorbell.ControlBlock): it handles some ports itself
    and tail-calls the Python hook for the others."""

    @property
    def address(self) -> int: ...  # its user data (the control block)

    def attach(self, fallback_addr: int) -> int: ...  # returns the code's address


def _add_native_out_hook(uc: Uc, hook: OutHook, out: Callable[[Uc, int, int, int, object], None]) -> bool:
    """uc_hook_add(UC_HOOK_INSN, OUT) with ``hook``'s machine code as the callback and the
    binding-style callback ``out`` behind it, wrapped as the binding wraps its own (a raised
    exception stops the emulation and is raised by ``emu_start``); False where unicorn 2.1's
    binding layout or the host (no executable memory) says no."""
    try:
        from unicorn.unicorn_py3.arch.intel import HOOK_INSN_OUT_CFUNC
        from unicorn.unicorn_py3.unicorn import uccallback, uclib
    except ImportError:
        return False
    fallback = uccallback(uc, HOOK_INSN_OUT_CFUNC)(out)
    try:
        code = hook.attach(ctypes.cast(fallback, ctypes.c_void_p).value or 0)
    except OSError:  # no executable memory here (SELinux execmem, MemoryDenyWriteExecute)
        return False
    handle = ctypes.c_size_t()
    status = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_INSN, ctypes.c_void_p(code),
                               ctypes.c_void_p(hook.address), ctypes.c_uint64(1), ctypes.c_uint64(0),
                               ctypes.c_int(x86.UC_X86_INS_OUT))
    if status != unicorn.UC_ERR_OK:
        raise UcError(status)
    uc._callbacks[handle.value] = (fallback, hook)  # kept alive as long as the hook
    return True

PROT_RX = UC_PROT_READ | UC_PROT_EXEC
PROT_RWX = UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC

# (name, unicorn id, width in bytes) -- the order is the vmstate "cpu" section layout, version 1.
_GPR = ["RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10", "R11", "R12", "R13",
        "R14", "R15", "RIP", "RFLAGS"]
_SEG = ["CS", "DS", "ES", "FS", "GS", "SS", "FS_BASE", "GS_BASE"]
_CTL = ["CR0", "CR2", "CR3", "CR4", "CR8"]
_FPU = ["FPCW", "FPSW", "FPTAG", "FIP", "FDP", "FOP", "MXCSR"]
REGISTERS: list[tuple[str, int, int]] = (
    [(n, getattr(x86, f"UC_X86_REG_{n}"), 8) for n in _GPR + _SEG + _CTL + _FPU]
    + [(f"ST{i}", getattr(x86, f"UC_X86_REG_ST{i}"), 10) for i in range(8)]
    + [(f"XMM{i}", getattr(x86, f"UC_X86_REG_XMM{i}"), 16) for i in range(16)]
)
MSR_EFER = 0xC0000080
UNTIL = 0xFFFF_FFFF_FFFF_F000  # never reached: run until stopped
HLT_OPCODE = 0xF4

ERR_NAMES = {
    unicorn.UC_ERR_INSN_INVALID: "invalid opcode",
    unicorn.UC_ERR_READ_UNMAPPED: "read outside RAM",
    unicorn.UC_ERR_WRITE_UNMAPPED: "write outside RAM",
    unicorn.UC_ERR_FETCH_UNMAPPED: "instruction fetch outside RAM",
    unicorn.UC_ERR_READ_PROT: "read of protected memory",
    unicorn.UC_ERR_WRITE_PROT: "write to protected memory",
    unicorn.UC_ERR_FETCH_PROT: "fetch from non-executable memory",
    unicorn.UC_ERR_EXCEPTION: "unhandled CPU exception",
}
EXCEPTION_NAMES = {0: "#DE divide error", 1: "#DB debug", 3: "#BP breakpoint", 4: "#OF overflow",
                   5: "#BR bound", 6: "#UD invalid opcode", 7: "#NM no FPU", 8: "#DF double fault",
                   12: "#SS stack fault", 13: "#GP general protection", 14: "#PF page fault",
                   16: "#MF x87 error", 17: "#AC alignment", 19: "#XM SIMD error"}


@dataclass(frozen=True)
class GuestFault:
    """Why the guest could not go on: where (pc) and what (cause)."""

    pc: int
    cause: str
    panicked: bool  # True: guest-panicked (CPU exception, triple fault); False: internal-error


class X86CPU:
    """One x86-64 vCPU."""

    def __init__(self) -> None:
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._tb_flush_pending = False
        self._tlb_flush_pending = False
        self.last_tb_flush_s = 0.0  # how long the last deferred flush took (on the running thread)
        self._power_on = self.uc.context_save()
        self._reset_at: dict[int, UcContext] = {}  # power-on context with pc = entry, per entry
        self.pending_fault: GuestFault | None = None
        self._uch = self.uc._uch  # the engine handle stop() passes to uc_emu_stop
        self.native_out = False  # OUT goes to a machine-code hook first (hook_ports)

    # -- memory -------------------------------------------------------------------------
    def map_ram(self, addr: int, size: int, host_ptr: int) -> None:
        self.uc.mem_map_ptr(addr, size, UC_PROT_ALL, host_ptr)

    def map_rom(self, addr: int, data: bytes) -> None:
        size = -(-len(data) // 0x1000) * 0x1000
        self.uc.mem_map(addr, size, UC_PROT_READ | UC_PROT_EXEC)
        self.uc.mem_write(addr, data)

    # -- hooks ----------------------------------------------------------------------------
    def hook_ports(self, port_in: Callable[[int, int], int], port_out: Callable[[int, int, int], None],
                   native_out: OutHook | None = None) -> None:
        """IN and OUT go to the Python hooks; with ``native_out``, OUT goes to its machine code
        first (which passes the ports it does not handle on to ``port_out``)."""
        def _in(uc: Uc, port: int, size: int, ud: object) -> int:
            return port_in(port, size)

        def _out(uc: Uc, port: int, size: int, value: int, ud: object) -> None:
            port_out(port, size, value)

        self.uc.hook_add(unicorn.UC_HOOK_INSN, _in, None, 1, 0, x86.UC_X86_INS_IN)
        self.native_out = native_out is not None and _add_native_out_hook(self.uc, native_out, _out)
        if not self.native_out:
            self.uc.hook_add(unicorn.UC_HOOK_INSN, _out, None, 1, 0, x86.UC_X86_INS_OUT)

        def _intr(uc: Uc, intno: int, ud: object) -> None:
            name = EXCEPTION_NAMES.get(intno, f"vector {intno}")
            self.pending_fault = GuestFault(self.pc, f"CPU exception {name} with no handler (triple fault)", True)
            uc.emu_stop()

        self.uc.hook_add(unicorn.UC_HOOK_INTR, _intr)

    # -- running --------------------------------------------------------------------------
    @property
    def pc(self) -> int:
        return int(self.uc.reg_read(x86.UC_X86_REG_RIP))

    @pc.setter
    def pc(self, value: int) -> None:
        self.uc.reg_write(x86.UC_X86_REG_RIP, value)

    def run(self, count: int = 0) -> GuestFault | None:
        """emu_start from the current pc until stopped (or ``count`` instructions)."""
        self.pending_fault = None
        if self._tb_flush_pending:
            self._tb_flush_pending = False
            t0 = time.perf_counter()
            self.uc.ctl_flush_tb()
            self.last_tb_flush_s = time.perf_counter() - t0
        if self._tlb_flush_pending:
            self._tlb_flush_pending = False
            self.flush_tlb()
        try:
            self.uc.emu_start(self.pc, UNTIL, 0, count)
        except UcError as err:
            cause = ERR_NAMES.get(err.errno, str(err))
            return GuestFault(self.pc, cause, err.errno == unicorn.UC_ERR_EXCEPTION)
        return self.pending_fault

    def stop(self) -> None:
        """uc_emu_stop(): safe from another thread; emu_start returns within ~0.1 ms.

        Called with the GIL kept (a ``PyDLL`` function): uc_emu_stop only sets two flags, and
        a caller that let go of the GIL would have to win it back from the vCPU thread, which
        by then runs the very work it was kicked for (``run_on_cpu``)."""
        if _EMU_STOP_KEEP_GIL is None:
            self.uc.emu_stop()
        elif (err := _EMU_STOP_KEEP_GIL(self._uch)) != unicorn.UC_ERR_OK:
            raise UcError(err)

    def halted(self) -> bool:
        """True if the instruction just before pc is HLT (emu_start returned because of it)."""
        try:
            return bytes(self.uc.mem_read(self.pc - 1, 1))[0] == HLT_OPCODE
        except UcError:
            return False

    def flush_translations(self) -> None:
        """tb_flush(): every translated block is dropped before guest code runs again.  As in
        QEMU (tb_flush() queues do_tb_flush with async_safe_run_on_cpu), the flush is done by
        the thread that runs the guest, at the start of its next :meth:`run`, so a load's
        downtime does not pay for it (a cold flush costs tenths of a millisecond)."""
        self._tb_flush_pending = True

    # -- software write tracking (the fallback when userfaultfd is unavailable) -----------
    def enable_tlb_tracking(self, perms_for: Callable[[int, bool], int]) -> None:
        """Switch to UC_TLB_VIRTUAL with a Python TLB-fill hook: ``perms_for(addr, write)``
        returns UC_PROT_* bits, so a page can be mapped read/execute only until its first
        write re-enters the hook.  Only while the vCPU is parked; the hook is the MMU (flat)."""

        def fill(uc: Uc, vaddr: int, access: int, entry: object, ud: object) -> bool:
            entry.paddr = vaddr  # type: ignore[attr-defined]
            entry.perms = perms_for(vaddr, access == unicorn.UC_MEM_WRITE)  # type: ignore[attr-defined]
            return True

        self._tlb_hook = self.uc.hook_add(unicorn.UC_HOOK_TLB_FILL, fill)
        self.uc.ctl_set_tlb_mode(unicorn.UC_TLB_VIRTUAL)
        self.flush_tlb()

    def disable_tlb_tracking(self) -> None:
        self.uc.ctl_set_tlb_mode(unicorn.UC_TLB_CPU)
        if getattr(self, "_tlb_hook", None) is not None:
            self.uc.hook_del(self._tlb_hook)
            self._tlb_hook = None
        self.flush_tlb()

    def flush_tlb(self) -> None:
        self.uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)

    def reset(self, entry: int) -> None:
        """Power-on register state (QEMU's x86_cpu_reset), starting at ``entry``: one context
        restore (the context is made at the first reset to that entry)."""
        ctx = self._reset_at.get(entry)
        if ctx is None:
            self.uc.context_restore(self._power_on)
            self.pc = entry
            self._reset_at[entry] = self.uc.context_save()
        else:
            self.uc.context_restore(ctx)

    # -- state --------------------------------------------------------------------------
    def get_state(self) -> dict[str, int]:
        """The register file, decoded from a copy (:meth:`capture_state`), never read from the
        live engine: Unicorn reads an MSR by borrowing the CPU's RAX, RCX and RDX
        (``x86_msr_read`` puts the MSR number in ECX, runs ``helper_rdmsr``, then restores the
        three), so reading EFER from another thread while the vCPU runs changes the guest's
        registers under it (tests/machine/test_cpu_state.py)."""
        return self.capture_state()()

    def capture_state(self) -> Callable[[], dict[str, int]]:
        """The register file at this instant, decoded later: cpu_synchronize_state() split in two.

        Inside a downtime only ``uc_context_save`` runs (~2 us, one copy of CPUX86State); the
        returned function decodes it (~150 us of ``reg_read`` calls) on a scratch engine, after
        the guest resumed.  (Reading registers straight from a saved context is not safe in
        Unicorn 2.1: descriptor-table registers crash it, so the context is restored into an
        engine of its own.)
        """
        ctx = self.uc.context_save()

        def decode() -> dict[str, int]:
            with _SCRATCH_LOCK:
                scratch = _scratch()
                scratch.context_restore(ctx)
                return _read_registers(scratch)

        return decode

    def set_state(self, regs: dict[str, int]) -> None:
        """Write the register file: built on the scratch engine from a copy of this one's
        context, then put here with one ``uc_context_restore``.  The live engine's registers
        are never written one by one (writing EFER borrows RAX, RCX and RDX, see
        :meth:`get_state`), and a state the CPU model refuses (ValueError) changes nothing."""
        ctx = self.uc.context_save()
        with _SCRATCH_LOCK:
            scratch = _scratch()
            scratch.context_restore(ctx)
            _write_registers(scratch, regs)
            ctx = scratch.context_save()
        self.uc.context_restore(ctx)
        self._tlb_flush_pending = True
        self.flush_translations()

    def prepare_state(self, regs: dict[str, int]) -> Callable[[], None]:
        """x86_cpu_reset() then set_state(), split in two for a load's downtime: the register
        file is built now on a scratch engine (power-on context, then ``regs``) and saved as a
        context; the returned function restores it with one ``uc_context_restore`` (a copy of
        CPUX86State).  The softmmu TLB flush that writing CR0, CR3 and CR4 would do at once
        (a memset of a table that grows with the guest's working set: 0.2-0.5 ms for the
        first at 8 GiB on a busy host) is queued for the vCPU's next :meth:`run`, as QEMU's cpu_post_load()
        queues tlb_flush() to a vCPU from the loading thread.  The scratch engine is the same
        CPU model, so CR4's feature masks and the derived flags (hflags) come out the same."""
        with _SCRATCH_LOCK:
            scratch = _scratch()
            scratch.context_restore(self._power_on)
            _write_registers(scratch, regs)
            ctx = scratch.context_save()

        def write() -> None:
            self.uc.context_restore(ctx)
            self._tlb_flush_pending = True
            self.flush_translations()

        return write


_SCRATCH: Uc | None = None  # decodes and builds contexts (capture_state, prepare_state)
_SCRATCH_LOCK = threading.Lock()


def _scratch() -> Uc:
    """The scratch engine (created on first use); hold _SCRATCH_LOCK."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Uc(UC_ARCH_X86, UC_MODE_64)
    return _SCRATCH


def _write_registers(uc: Uc, regs: dict[str, int]) -> None:
    """REGISTERS with one batch write, then EFER, GDTR and IDTR.  A value the CPU model
    refuses (a reserved CR0/CR4/EFER bit: x86_cpu's checks raise an exception inside the
    write) is a ValueError, as a load reports a bad device payload."""
    try:
        uc.reg_write_batch([(rid, regs[name]) for name, rid, _ in REGISTERS])
        uc.reg_write(x86.UC_X86_REG_MSR, (MSR_EFER, regs["EFER"]))
        for name in ("GDTR", "IDTR"):
            uc.reg_write(getattr(x86, f"UC_X86_REG_{name}"), (0, regs[f"{name}_BASE"], regs[f"{name}_LIMIT"], 0))
    except UcError as err:
        raise ValueError(f"register state refused by the CPU model ({err})") from err


def _read_registers(uc: Uc) -> dict[str, int]:
    regs = {name: int(uc.reg_read(rid)) for name, rid, _ in REGISTERS}
    regs["EFER"] = int(uc.reg_read(x86.UC_X86_REG_MSR, MSR_EFER))
    for name in ("GDTR", "IDTR"):
        _, base, limit, _ = uc.reg_read(getattr(x86, f"UC_X86_REG_{name}"))
        regs[f"{name}_BASE"] = base
        regs[f"{name}_LIMIT"] = limit
    return regs


_EXTRA = ["EFER", "GDTR_BASE", "GDTR_LIMIT", "IDTR_BASE", "IDTR_LIMIT"]


def pack_cpu_state(regs: dict[str, int]) -> bytes:
    """The "cpu" vmstate section body, version 1: REGISTERS then EFER, GDTR, IDTR (little-endian)."""
    out = bytearray()
    for name, _, width in REGISTERS:
        out += (regs[name] & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    out += struct.pack("<5Q", *(regs[n] for n in _EXTRA))
    return bytes(out)


def unpack_cpu_state(data: bytes) -> dict[str, int]:
    want = sum(w for _, _, w in REGISTERS) + 40
    if len(data) != want:
        raise ValueError(f"cpu state is {len(data)} bytes, expected {want}")
    regs: dict[str, int] = {}
    off = 0
    for name, _, width in REGISTERS:
        regs[name] = int.from_bytes(data[off:off + width], "little")
        off += width
    for name, val in zip(_EXTRA, struct.unpack_from("<5Q", data, off), strict=True):
        regs[name] = val
    return regs
