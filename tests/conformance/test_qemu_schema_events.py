"""Every event snaplab's schema declares has the members QEMU 7.2's has: the real
``qemu-system-x86_64`` is asked for ``query-qmp-schema`` and both introspections are compared
event by event (member names, optional or not, types with enums resolved to their values)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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


@pytest.mark.skipif(QEMU is None and not os.environ.get("CI"), reason="qemu-system-x86_64 is not installed")
def test_our_events_have_qemus_members() -> None:
    assert QEMU is not None, "CI needs qemu-system-x86_64 (apt-get install qemu-system-x86)"
    script = b'{"execute":"qmp_capabilities"}\n{"execute":"query-qmp-schema"}\n{"execute":"quit"}\n'
    res = subprocess.run([QEMU, "-machine", "q35", "-accel", "tcg", "-display", "none", "-nodefaults", "-S",
                          "-qmp", "stdio"], input=script, capture_output=True, timeout=60, check=False)
    replies = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    qemu = events(next(r["return"] for r in replies if isinstance(r.get("return"), list)))
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
