"""Every event snaplab's schema declares has the members QEMU 7.2's has: the real
``qemu-system-x86_64`` is asked for ``query-qmp-schema`` and both introspections are compared
event by event (member names, optional or not, types with enums resolved to their values)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from typing import Any

import pytest

from emulator.qmp.schema import default_schema

QEMU = shutil.which("qemu-system-x86_64")
# Members that differ on purpose, each with the docs/deviations.md entry saying why.
KNOWN = {("GUEST_PANICKED", "info"): "deviation 13: snaplab's own panic information"}


def events(schema: list[dict[str, Any]]) -> dict[str, list[tuple[str, bool, Any]]]:
    by = {e["name"]: e for e in schema}

    def resolve(t: str) -> Any:
        e = by.get(t)
        if e is None or e["meta-type"] == "builtin":
            return t
        if e["meta-type"] == "enum":
            return ("enum", tuple(sorted(e["values"])))
        return e["meta-type"]

    out = {}
    for e in schema:
        if e["meta-type"] == "event":
            members = by[e["arg-type"]].get("members", []) if e.get("arg-type") in by else []
            out[e["name"]] = sorted((m["name"], "default" in m, resolve(m["type"])) for m in members)
    return out


def qemu_schema(exe: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """QEMU's ``query-qmp-schema`` answer over ``-qmp stdio``.  ``quit`` is sent only once the
    whole answer has been read: sent with the rest, it could end QEMU while the answer (over
    200 KiB) still waited for room in the pipe, and the line came out cut at 64 KiB."""
    proc = subprocess.Popen([exe, "-machine", "q35", "-accel", "tcg", "-display", "none", "-nodefaults", "-S",
                             "-qmp", "stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    out = proc.stdout
    lines: queue.Queue[bytes] = queue.Queue()

    def read() -> None:  # whole lines, however long, as QEMU writes them
        for ln in iter(out.readline, b""):
            lines.put(ln)

    threading.Thread(target=read, daemon=True).start()
    end = time.monotonic() + timeout
    try:
        proc.stdin.write(b'{"execute":"qmp_capabilities"}\n{"execute":"query-qmp-schema"}\n')
        proc.stdin.flush()
        while True:
            line = lines.get(timeout=max(0.0, end - time.monotonic()))
            reply = json.loads(line)
            if isinstance(reply.get("return"), list):
                break
        proc.stdin.write(b'{"execute":"quit"}\n')
        proc.stdin.flush()
        proc.wait(timeout=max(1.0, end - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    schema: list[dict[str, Any]] = reply["return"]
    return schema


@pytest.mark.skipif(QEMU is None and not os.environ.get("CI"), reason="qemu-system-x86_64 is not installed")
def test_our_events_have_qemus_members() -> None:
    assert QEMU is not None, "CI needs qemu-system-x86_64 (apt-get install qemu-system-x86)"
    qemu = events(qemu_schema(QEMU))
    ours = events(default_schema().introspect())
    assert "BLOCK_IO_ERROR" in ours
    for name, members in ours.items():
        assert name in qemu, name
        theirs = qemu[name]
        for m in [m for m in members if (name, m[0]) in KNOWN]:
            assert m in members and m not in theirs, f"{name}.{m[0]} no longer differs: drop it from KNOWN"
        members = [m for m in members if (name, m[0]) not in KNOWN]
        theirs = [m for m in theirs if (name, m[0]) not in KNOWN]
        assert members == theirs, (name, members, theirs)
