"""Fuzz the monitor: 100 000 random and mutated lines, every one answered (or the connection
closed on an over-limit input); the monitor keeps serving; no job or thread leaks."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from emulator.guest import WorkloadSpec
from emulator.machine import Machine, MachineConfig
from emulator.qmp.protocol import ConnState, Output

CORPUS = [
    b'{"execute": "query-status"}',
    b'{"execute": "query-version", "id": 1}',
    b'{"execute": "query-commands"}',
    b'{"execute": "stop"}',
    b'{"execute": "cont"}',
    b'{"execute": "query-jobs"}',
    b'{"execute": "job-dismiss", "arguments": {"id": "j0"}}',
    b'{"execute": "job-cancel", "arguments": {"id": "j0"}}',
    b'{"execute": "human-monitor-command", "arguments": {"command-line": "info status"}}',
    b'{"execute": "human-monitor-command", "arguments": {"command-line": "info snapshots"}}',
    b'{"execute": "query-block"}',
    b'{"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
    b"{'execute': 'query-status', 'id': [1, {'a': null}]}",
    b'{"execute": "snapshot-save", "arguments": {"job-id": "j", "tag": "t", "vmstate": "d", "devices": ["d"]}}',
]
ALPHABET = b'{}[]:,"\'\\ abcdefghijklmnopqrstuvwxyz-0123456789.eE\x00\x01\x18\x7f\xc3\xa9\xff\n\t'


def mutate(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        return bytes(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 60)))
    line = bytearray(rng.choice(CORPUS))
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(6)
        pos = rng.randrange(len(line) + 1)
        if op == 0 and line:
            del line[min(pos, len(line) - 1)]
        elif op == 1:
            line.insert(pos, rng.choice(ALPHABET))
        elif op == 2 and line:
            line[min(pos, len(line) - 1)] = rng.randrange(256)
        elif op == 3:
            line[pos:pos] = rng.choice(CORPUS)
        elif op == 4:
            line = line[:pos]
        else:
            line[pos:pos] = rng.choice([b"[" * 40, b"{" * 3, b"]" * 5, b'"', b"'"])
    return bytes(line)


def test_hundred_thousand_lines_in_memory() -> None:
    rng = random.Random(20261128)
    threads0 = threading.active_count()
    with Machine(MachineConfig(ram_size=32 << 20, workload=WorkloadSpec("idle"))) as m:
        m.start()
        mon = m.monitor
        answered = closed = 0
        for i in range(100_000):
            conn = mon.new_connection()
            conn.receive(b'{"execute": "qmp_capabilities"}')
            line = mutate(rng)
            outs = []
            for item in conn.receive(line) + conn.eof():
                outs.append(item.data if isinstance(item, Output) else mon.handle(conn, item))
            if conn.state == ConnState.CLOSED and any(b"limit exceeded" in o for o in outs):
                closed += 1
            for o in outs:
                msg = json.loads(o)  # every reply is one valid JSON object line
                assert "return" in msg or ("error" in msg and set(msg["error"]) == {"class", "desc"}), o
            assert outs or line.strip() == b"", line
            answered += bool(outs)
            if i % 5000 == 0 and m.state.value != "running":
                m.cont()
        assert answered >= 99_000
        q = m.qmp()
        q.execute("query-status")
        assert all(j["status"] == "concluded" for j in q.execute("query-jobs"))
    end = time.monotonic() + 60  # the worker threads wind down (bounded, not a fixed sleep)
    while threading.active_count() > threads0 + 3:
        assert time.monotonic() < end, threading.enumerate()
        time.sleep(0.01)


def test_socket_fuzz_keeps_other_clients_served(tmp_path: Path) -> None:
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    proc = subprocess.Popen([sys.executable, "-m", "emulator.cli", "-m", "32M", "-qmp", f"unix:{a},server=on,wait=off",
                             "-qmp", f"unix:{b},server=on,wait=off"])
    try:
        end = time.monotonic() + 30
        while not (a.exists() and b.exists()):
            assert time.monotonic() < end and proc.poll() is None
            time.sleep(0.05)
        rng = random.Random(1)
        watcher = socket.socket(socket.AF_UNIX)
        watcher.connect(str(b))
        watcher.settimeout(10)
        watcher.recv(4096)
        watcher.sendall(b'{"execute": "qmp_capabilities"}\n')
        watcher.recv(4096)
        for round_ in range(20):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(a))
            s.settimeout(10)
            s.recv(4096)
            s.sendall(b'{"execute": "qmp_capabilities"}\n')
            payload = b"\n".join(mutate(rng).replace(b'"quit"', b'"q"') for _ in range(100)) + b"\n"
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass
            s.close()
            watcher.sendall(b'{"execute": "query-status", "id": %d}\n' % round_)
            buf = b""
            while b'"id": %d' % round_ not in buf:
                chunk = watcher.recv(65536)
                assert chunk, "the monitor stopped serving"
                buf += chunk
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
