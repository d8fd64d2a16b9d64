"""The socket transport's containment: what escapes one command ends that connection only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emulator.block.node import BlockGraph
from emulator.guest import WorkloadSpec
from emulator.machine import Machine, MachineConfig
from emulator.qmp.transport import start_servers
from tests.qmp import negotiated


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine(MachineConfig(ram_size=16 << 20, workload=WorkloadSpec("idle", seed=1)), BlockGraph())
    try:
        yield m
    finally:
        m.close()


@pytest.mark.parametrize("escaping", [SystemExit, KeyboardInterrupt, RuntimeError])
def test_what_escapes_a_command_ends_its_connection_and_no_other(machine: Machine, tmp_path: Path,
                                                                   escaping: type[BaseException]) -> None:
    """A SystemExit raised in a task stops asyncio's loop: before, one such command left every
    monitor of the process unanswered."""
    m = machine
    m.start()
    real = m.monitor.dispatch

    def dispatch(conn: Any, req: Any, send: Any) -> None:
        if req.execute == "x-escape":
            raise escaping()
        real(conn, req, send)

    m.monitor.dispatch = dispatch  # type: ignore[method-assign]
    path = tmp_path / "q.sock"
    (server,) = start_servers(m.monitor, [{"kind": "unix", "path": str(path)}])
    (a, fa), (b, fb) = negotiated(path), negotiated(path)
    try:
        a.sendall(b'{"execute": "x-escape", "id": 1}\n')
        assert fa.readline() == b""  # that connection is closed, unanswered
        b.sendall(b'{"execute": "query-status", "id": 2}\n')
        assert json.loads(fb.readline())["return"]["status"] == "running"
        c, fc = negotiated(path)  # the endpoint still accepts
        c.sendall(b'{"execute": "query-status", "id": 3}\n')
        assert json.loads(fc.readline())["id"] == 3
        fc.close()
        c.close()
    finally:
        for s, f in ((a, fa), (b, fb)):
            f.close()
            s.close()
        server.close()
