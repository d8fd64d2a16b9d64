"""The host's and the emulator's own speed over a few seconds, without snaplab: a control for every
figure that compares a guest's progress rate before and after an operation.

A time to 90% of speed comes out too long if the guest's speed dropped for a reason other than the
operation measured.  :func:`host_noise` measures, before an experiment, how steady the host
and the emulator are on their own, so a reader can see that spread beside the results.

Three probes, run one after the other, each over a buffer written once before its timing:
``core`` updates every cache line of 256 KiB in a random order (numpy scatters; with its
indices it fits a core's 2 MiB L2: its spread is the CPU's); ``cache`` updates the first word
of every page of a buffer the size of the guest's working set, in a random order (its spread
is the shared cache's and memory's); ``unicorn`` runs a bare Unicorn x86-64 loop, 45 bytes
with nothing of snaplab around them, that writes the first word of random pages of such a
buffer, as the lab's guests stamp pages.  Each reports its rate in 20 ms windows, as
lab/restore.py windows the guest's progress.

What was found on the Xeon host (2026-12-05; logs in data/results/restore-scale/speed-switching/):
the restore bench's guest switched between about 4 and 8 M pages/s for seconds at a time with
no snapshot and no command, and a TLB flush every 0.7 s neither caused nor prevented it.  The
bare Unicorn loop switches between two levels about 2x apart too (5 and 10 M writes/s over 64
MiB), while the ``cache`` probe kept its median within 7% over the same minute (at other times
the host's own speed varied too).  So the switching is not in snaplab's code.
bench/host_latency.py alternates the bare loop with a pointer chase on one CPU: the chase's
loads were about 10% slower in the loop's slow rounds (rank correlation -0.67): the host's
memory explains part of it, not a 2x; the cause was not found.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

WINDOW_S = 0.02  # the same windows as the guest's progress (lab/restore.py WINDOW_NS)
BATCH = 1 << 14  # updates per timed numpy step: well inside a window
CORE_KIB, CORE_STRIDE = 256, 64  # ``core``: every cache line of 256 KiB (with its indices, inside a 2 MiB L2)
PAGE = 4096  # ``cache`` and ``unicorn``: the first word of every page, as the lab's guests stamp pages


def spread(rates: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles, min, max of per-window rates, and ``below90``: the
    fraction of windows under 90% of the median (how often a steady process would look
    slowed by a tenth or more)."""
    r = np.asarray(rates, dtype=np.float64)
    if not len(r):
        raise ValueError("spread: no windows")
    med = float(np.median(r))
    return {"median": med, "p10": float(np.percentile(r, 10)), "p90": float(np.percentile(r, 90)),
            "min": float(r.min()), "max": float(r.max()), "below90": float(np.mean(r < 0.9 * med)),
            "windows": int(len(r))}


def probe(seconds: float, buf_mib: float, stride: int = PAGE, seed: int = 0) -> dict[str, Any]:
    """Read-modify-writes of the first 8-byte word of every ``stride``-byte slot of a
    ``buf_mib`` MiB buffer, in one random order that covers every slot and repeats (numpy
    scatters of BATCH slots; the buffer is written once before the timing): the rate in
    million updates per second, per WINDOW_S window (raw, rounded), and its :func:`spread`."""
    if seconds <= 0 or buf_mib <= 0 or stride < 8 or stride % 8:
        raise ValueError(f"probe: seconds ({seconds}) and buf_mib ({buf_mib}) must be positive, "
                         f"stride ({stride}) a multiple of 8")
    buf = np.ones(max(int(buf_mib * (1 << 20)) // 8, 1), dtype=np.int64)  # written: no fault is timed
    step = stride // 8
    order = (np.random.default_rng(seed).permutation(max(len(buf) // step, 1)) * step).astype(np.int32)
    batch = min(BATCH, len(order))
    rates: list[float] = []
    end = time.perf_counter() + seconds
    w0 = time.perf_counter()
    done = at = 0
    while True:
        if at + batch > len(order):
            at = 0
        buf[order[at:at + batch]] += 1
        at += batch
        done += batch
        t = time.perf_counter()
        if t - w0 >= WINDOW_S:
            rates.append(done / (t - w0) / 1e6)
            done, w0 = 0, t
            if t >= end:
                break
    return _result(buf_mib, stride, seconds, rates)


def _result(buf_mib: float, stride: int, seconds: float, rates: list[float]) -> dict[str, Any]:
    """A probe's record: what it ran over, its raw windows (rounded) and their :func:`spread`."""
    return {"buf_mib": buf_mib, "stride": stride, "seconds": seconds, "window_s": WINDOW_S,
            "rates_mups": [round(x, 2) for x in rates]} | spread(rates)


# The bare loop: rax a xorshift64 state, r8 a page mask, r9 the buffer, rcx the count:
#   loop: rdx = rax << 13; rax ^= rdx; rdx = rax >> 7; rax ^= rdx; rdx = rax << 17;
#         rax ^= rdx; rdx = rax & r8; [rdx + r9] = rcx; rcx += 1; jmp loop
BARE_LOOP_ASM = """
loop:
  mov rdx, rax
  shl rdx, 13
  xor rax, rdx
  mov rdx, rax
  shr rdx, 7
  xor rax, rdx
  mov rdx, rax
  shl rdx, 17
  xor rax, rdx
  mov rdx, rax
  and rdx, r8
  mov [rdx + r9], rcx
  inc rcx
  jmp loop
"""
BARE_LOOP_CODE = bytes.fromhex("4889c248c1e20d4831d04889c248c1ea074831d04889c248c1e2114831d04889c24c21c24a890c0a48ffc1ebd3")
BARE_LOOP_BASE = 0x1000
BARE_BUF_BASE = 0x1000000


def unicorn_probe(seconds: float, buf_mib: int, seed: int = 0) -> dict[str, Any]:
    """The bare loop in a fresh Unicorn engine over ``buf_mib`` MiB (a power of two; written
    once before the timing), run in WINDOW_S slices (``emu_start``'s own timeout): its rate in
    million writes per second, per slice."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn import x86_const as x86

    if seconds <= 0 or buf_mib <= 0 or buf_mib & (buf_mib - 1):
        raise ValueError(f"unicorn_probe: seconds ({seconds}) must be positive, buf_mib ({buf_mib}) a power of two")
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(BARE_LOOP_BASE, 0x1000)
    uc.mem_write(BARE_LOOP_BASE, BARE_LOOP_CODE)
    uc.mem_map(BARE_BUF_BASE, buf_mib << 20)
    zeros = bytes(1 << 20)
    for off in range(0, buf_mib << 20, 1 << 20):  # every page in place: no host fault is timed
        uc.mem_write(BARE_BUF_BASE + off, zeros)
    for reg, val in ((x86.UC_X86_REG_RAX, 0x9E3779B97F4A7C15 ^ seed or 1), (x86.UC_X86_REG_RCX, 0),
                     (x86.UC_X86_REG_R8, ((buf_mib << 20) - 1) & ~(PAGE - 1)), (x86.UC_X86_REG_R9, BARE_BUF_BASE)):
        uc.reg_write(reg, val)
    rates: list[float] = []
    pc, end = BARE_LOOP_BASE, time.perf_counter() + seconds
    t0, c0 = time.perf_counter(), 0
    while True:
        uc.emu_start(pc, 0xFFFFFFFF, timeout=int(WINDOW_S * 1e6))  # the end is never reached: the timeout stops it
        pc = uc.reg_read(x86.UC_X86_REG_RIP)
        t, c = time.perf_counter(), uc.reg_read(x86.UC_X86_REG_RCX)
        if c > c0 and t > t0:
            rates.append((c - c0) / (t - t0) / 1e6)
        t0, c0 = t, c
        if t >= end:
            break
    rates = rates[1:] or rates  # the first slice translates the loop
    return _result(buf_mib, PAGE, seconds, rates)


def host_noise(seconds: float = 6.0, cache_mib: float = 64.0) -> dict[str, dict[str, Any]]:
    """The three probes, a third of ``seconds`` each: ``core`` (every cache line of 256 KiB),
    ``cache`` (every page of ``cache_mib`` MiB) and ``unicorn`` (pages of ``cache_mib``
    rounded down to a power of two, at least 1 MiB)."""
    pow2 = 1 << max(int(cache_mib).bit_length() - 1, 0)
    return {"core": probe(seconds / 3, CORE_KIB / 1024, CORE_STRIDE),
            "cache": probe(seconds / 3, cache_mib, PAGE, seed=1),
            "unicorn": unicorn_probe(seconds / 3, pow2)}


def describe(noise: dict[str, dict[str, Any]]) -> str:
    """One line for a log: each probe's median and 10-90% range, and its below-90% share."""
    return "; ".join(f"{k} ({v['buf_mib']:g} MiB): median {v['median']:.1f} M/s, 10-90% {v['p10']:.1f}-"
                     f"{v['p90']:.1f}, {100 * v['below90']:.0f}% of {WINDOW_S * 1e3:.0f} ms windows under 90% "
                     f"of the median" for k, v in noise.items())
