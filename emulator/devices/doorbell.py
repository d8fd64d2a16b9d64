"""The lab port's doorbell in machine code: a progress sample without the GIL.

The guest rings the lab port's doorbell (OUT 0x510) once per batch of work.  Through
Unicorn's Python binding each ring is a ctypes callback, and a callback must take the GIL:
a guest ringing 60,000 times a second then spends most of its time in Python, and every
ring competes for the GIL with the monitor, the snapshot savers and the fault handlers.
QEMU's device callbacks are C and take no such lock (a debug port is a few instructions).

So the OUT hook Unicorn calls is this function (x86-64, System V ABI; assembled with
keystone, the bytes committed in :data:`DOORBELL_CODE` and rebuilt byte for byte by a test,
as for the firmware).  For the doorbell port, while the virtual clock runs, it appends the
sample row itself: virtual ns, host monotonic ns (``clock_gettime``), and the four counters
the guest keeps in its lab page.  Every other OUT, and the doorbell while the clock is
stopped, it tail-calls the Python hook (:attr:`ControlBlock` word ``FALLBACK``) with its
arguments untouched.  Only the vCPU thread rings, so one writer appends; the sample count is
stored after the row (x86 keeps stores in order), and readers check it again after copying.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
import threading

import numpy as np

# The control block: one array of uint64 words the hook reads (and whose COUNT it bumps).
PORT, ENABLED, COUNTERS, RING, ROWS, COUNT, VCLOCK_OFFSET, CLOCK_GETTIME, FALLBACK = range(9)
ROW_WORDS = 6  # virtual ns, host ns, iterations, bytes dirtied, disk ops, errors
CLOCK_MONOTONIC = 1

# uc_cb_insn_out_t(uc_engine *uc, uint32_t port, int size, uint32_t value, void *user_data):
# rdi = uc, esi = port, edx = size, ecx = value, r8 = the control block.
DOORBELL_ASM = f"""
    mov eax, esi
    cmp rax, qword ptr [r8 + {8 * PORT}]
    jne fallback
    cmp qword ptr [r8 + {8 * ENABLED}], 0
    je fallback
    push rbx
    sub rsp, 16
    mov rbx, r8
    mov edi, {CLOCK_MONOTONIC}
    mov rsi, rsp
    call qword ptr [rbx + {8 * CLOCK_GETTIME}]
    mov rcx, qword ptr [rsp]
    imul rcx, rcx, 1000000000
    add rcx, qword ptr [rsp + 8]
    mov rax, qword ptr [rbx + {8 * COUNT}]
    xor edx, edx
    div qword ptr [rbx + {8 * ROWS}]
    imul rdx, rdx, {8 * ROW_WORDS}
    add rdx, qword ptr [rbx + {8 * RING}]
    mov rax, rcx
    add rax, qword ptr [rbx + {8 * VCLOCK_OFFSET}]
    mov qword ptr [rdx], rax
    mov qword ptr [rdx + 8], rcx
    mov rsi, qword ptr [rbx + {8 * COUNTERS}]
    mov rax, qword ptr [rsi]
    mov qword ptr [rdx + 16], rax
    mov rax, qword ptr [rsi + 8]
    mov qword ptr [rdx + 24], rax
    mov rax, qword ptr [rsi + 16]
    mov qword ptr [rdx + 32], rax
    mov rax, qword ptr [rsi + 24]
    mov qword ptr [rdx + 40], rax
    inc qword ptr [rbx + {8 * COUNT}]
    add rsp, 16
    pop rbx
    ret
fallback:
    jmp qword ptr [r8 + {8 * FALLBACK}]
"""

DOORBELL_CODE = bytes.fromhex(
    "89f0493b00757749837808007470534883ec104c89c3bf010000004889e6ff5338488b0c244869c9"
    "00ca9a3b48034c2408488b432831d248f77320486bd230480353184889c84803433048890248894a"
    "08488b7310488b0648894210488b460848894218488b461048894220488b46184889422848ff4328"
    "4883c4105bc341ff6040"
)


def native_wanted() -> bool:
    """Whether to arm the machine code: an x86-64 host, and ``SNAPLAB_DOORBELL`` unset or
    ``native`` (``python``: the Python hook serves the doorbell too, for A/B runs)."""
    return (os.environ.get("SNAPLAB_DOORBELL", "native").lower() in ("native", "")
            and platform.machine() in ("x86_64", "AMD64"))


def build_doorbell() -> bytes:
    """:data:`DOORBELL_ASM` assembled (keystone, build time only)."""
    from emulator.guest import assemble

    return assemble(DOORBELL_ASM, 0)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class _Code:
    """:data:`DOORBELL_CODE` in one read-only executable page, mapped once per process."""

    _page: mmap.mmap | None = None
    _addr = 0
    _lock = threading.Lock()

    @classmethod
    def address(cls) -> int:
        """The code's address; OSError where the system refuses executable memory."""
        with cls._lock:
            if cls._page is None:
                page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
                page.write(DOORBELL_CODE)
                addr = ctypes.addressof((ctypes.c_char * 1).from_buffer(page))
                if _libc.mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
                    raise OSError(ctypes.get_errno(), "mprotect of the doorbell's code page failed")
                cls._page, cls._addr = page, addr
            return cls._addr


class ControlBlock:
    """The words the machine-code hook reads: which port, whether it may record, where the
    counters and the ring are, the sample count, the virtual clock's offset, the functions it
    calls.  The ring and the count are the lab port's in every case (the Python path appends
    through :meth:`append` to the same ones)."""

    def __init__(self, port: int, ring: np.ndarray) -> None:
        assert ring.dtype == np.uint64 and ring.ndim == 2 and ring.shape[1] == ROW_WORDS and ring.flags.c_contiguous
        self.ring = ring
        self.words = np.zeros(9, dtype=np.uint64)
        self.words[PORT] = port
        self.words[RING] = ring.ctypes.data
        self.words[ROWS] = len(ring)
        self.words[CLOCK_GETTIME] = ctypes.cast(_libc.clock_gettime, ctypes.c_void_p).value or 0
        self._offset: int | None = None

    @property
    def address(self) -> int:
        return int(self.words.ctypes.data)

    @property
    def count(self) -> int:
        return int(self.words[COUNT])

    def append(self, row: tuple[int, ...]) -> None:
        """The Python path's append (the vCPU thread's, like the hook's)."""
        n = int(self.words[COUNT])
        self.ring[n % len(self.ring)] = row
        self.words[COUNT] = n + 1

    def set_counters(self, addr: int) -> None:
        """The host address of the guest's four counters (its lab page, in RAM's mapping)."""
        self.words[COUNTERS] = addr
        self._publish()

    def attach(self, fallback_addr: int) -> int:
        """Arm the hook: ports other than :data:`PORT`'s go to the C function at
        ``fallback_addr`` (the Python hook).  Returns the address of the hook's code; OSError
        (nothing armed) where the system refuses executable memory."""
        code = _Code.address()
        self.words[FALLBACK] = fallback_addr
        self._publish()
        return code

    def set_clock_offset(self, offset: int | None) -> None:
        """The virtual clock's ``now - monotonic`` while it runs; None while it is stopped
        (the hook then leaves the doorbell to the Python path, which reads the clock)."""
        self._offset = offset
        self._publish()

    def _publish(self) -> None:
        if self._offset is not None:
            self.words[VCLOCK_OFFSET] = self._offset & (2**64 - 1)
        self.words[ENABLED] = int(self._offset is not None and self.words[COUNTERS] != 0 and self.words[FALLBACK] != 0)
