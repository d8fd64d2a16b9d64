"""What the vCPU thread is doing, seen from its stack (for tests that wait on it)."""

from __future__ import annotations

import sys
import threading


def vcpu_waits_at_the_gate() -> bool:
    """The vCPU thread is blocked in PortBus's gate (hold()), seen from its current stack."""
    vcpu = next((t for t in threading.enumerate() if t.name == "vcpu"), None)
    frame = sys._current_frames().get(vcpu.ident) if vcpu is not None and vcpu.ident else None
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return any(a == "wait" and b in ("port_in", "port_out", "wait_released")
               for a, b in zip(names, names[1:], strict=False))
