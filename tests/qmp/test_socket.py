"""snaplab-system's QMP socket with the real clients: qemu.qmp's QMPClient and qmp-shell."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

QMP_SHELL = shutil.which("qmp-shell")


def start_system(args: list[str], *sockets: Path) -> subprocess.Popen[bytes]:
    """snaplab-system with a 64 MiB dirtying guest, ``args`` and one ``-qmp`` per socket,
    returned once every socket is there."""
    qmp = [x for sock in sockets for x in ("-qmp", f"unix:{sock},server=on,wait=off")]
    proc = subprocess.Popen([sys.executable, "-m", "emulator.cli", "-m", "64M", "-snaplab-workload", "dirty,seed=1",
                             *qmp, *args], stderr=subprocess.PIPE)
    end = time.monotonic() + 30
    while not all(sock.exists() for sock in sockets):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < end
        time.sleep(0.05)
    return proc


@pytest.fixture
def system(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    proc = start_system(["-serial", f"file:{tmp_path / 'serial.log'}"], a, b)
    yield proc, a, b
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_qemu_qmp_client_two_monitors(system: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    proc, a, b = system
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600

    async def main() -> None:
        q1, q2 = QMPClient("one"), QMPClient("two")
        await q1.connect(str(a))
        await q2.connect(str(b))
        assert q1.greeting._asdict()["QMP"]["version"]["qemu"] == {"micro": 22, "minor": 2, "major": 7}
        with q2.listener(("STOP", "RESUME")) as listener:
            assert (await q1.execute("query-status"))["status"] == "running"
            await q1.execute("stop")
            ev = await asyncio.wait_for(listener.get(), 10)
            assert ev["event"] == "STOP" and set(ev["timestamp"]) == {"seconds", "microseconds"}
            assert (await q2.execute("query-status"))["status"] == "paused"
            await q2.execute("cont")
            assert (await asyncio.wait_for(listener.get(), 10))["event"] == "RESUME"
        with pytest.raises(ExecuteError) as e:
            await q1.execute("job-dismiss", {"id": "nope"})
        assert e.value.error_class == "GenericError" and "Job not found" in str(e.value)
        with pytest.raises(ExecuteError) as e:
            await q1.execute("snapshot-save-nope")
        assert e.value.error_class == "CommandNotFound"
        text = await q2.execute("human-monitor-command", {"command-line": "info status"})
        assert text == "VM status: running\r\n"
        await q1.disconnect()
        with q2.listener("SHUTDOWN") as listener:
            await q2.execute("quit")
            ev = await asyncio.wait_for(listener.get(), 10)
            assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        with contextlib.suppress(EOFError):  # the server hangs up after quit, as QEMU does
            await q2.disconnect()

    asyncio.run(main())
    assert proc.wait(20) == 0
    assert not a.exists()


@pytest.mark.skipif(QMP_SHELL is None, reason="qmp-shell comes with the qemu.qmp package ([test] extra)")
def test_qmp_shell(system: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    proc, a, _ = system
    script = "query-status\nstop\nquery-status\nhuman-monitor-command command-line=info\nquit\n"
    res = subprocess.run([str(QMP_SHELL), str(a)], input=script, capture_output=True, text=True, timeout=60)
    out = res.stdout
    assert "Welcome to the QMP low-level shell!" in out and "Connected to QEMU 7.2.22" in out
    assert '{"return": {"status": "running", "singlestep": false, "running": true}}' in out
    assert '{"return": {"status": "paused", "singlestep": false, "running": false}}' in out
    assert "info status" in out  # "info" alone lists the info subcommands
    assert proc.wait(20) == 0


def test_raw_socket_wire_format_and_limits(system: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    _, a, b = system

    def lines(s: socket.socket, n: int) -> list[bytes]:
        buf = b""
        s.settimeout(10)
        while buf.count(b"\r\n") < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        return buf.split(b"\r\n")[:n]

    s = socket.socket(socket.AF_UNIX)
    s.connect(str(a))
    assert lines(s, 1)[0].startswith(b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}')
    s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-status", "id": 42}\n@@@\n')
    assert lines(s, 3) == [b'{"return": {}}',
                           b'{"return": {"status": "running", "singlestep": false, "running": true}, "id": 42}',
                           b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'@\'"}}']
    s.sendall(b"[" * 2000)  # over the nesting limit: an error, then the connection closes
    assert b"JSON nesting depth limit exceeded" in _until_eof(s)
    s.close()
    t = socket.socket(socket.AF_UNIX)  # the server is unharmed
    t.connect(str(b))
    lines(t, 1)
    t.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n')
    assert b'"status": "running"' in lines(t, 2)[1]
    t.close()


def _until_eof(s: socket.socket) -> bytes:
    """Everything the peer sends until it closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_tcp_monitor_on_loopback_only(tmp_path: Path) -> None:
    # The port is free when picked but another process may take it before ours binds: then
    # ours exits saying so, and the test picks another (up to three times).
    for _attempt in range(3):
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "emulator.cli", "-m", "32M",
                                 "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"], stderr=subprocess.PIPE)
        try:
            end = time.monotonic() + 120  # a loaded CI host: the interpreter's start can be slow
            c = None
            while c is None and proc.poll() is None:
                try:
                    c = socket.create_connection(("127.0.0.1", port), timeout=30)
                except OSError:
                    assert time.monotonic() < end, "the monitor did not listen within 120 s"
                    time.sleep(0.05)
            if c is None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                assert "Address already in use" in err, err
                continue
            c.settimeout(60)
            assert c.recv(4096).startswith(b'{"QMP": ')
            c.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n')
            data = _until_eof(c)
            assert b'"SHUTDOWN"' in data and b'{"return": {}}' in data
            assert proc.wait(60) == 0
            return
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    raise AssertionError("three ports taken by others in a row")


def test_lazy_load_replies_after_its_resume(tmp_path: Path) -> None:
    """A lazy snapshot-load's first step runs as QEMU runs the job's bottom half, before the
    reply goes out: on the wire, as from QEMU 7.2, created, running, STOP, RESUME, return."""
    from emulator.block import Qcow2Image

    disk = tmp_path / "d.qcow2"
    Qcow2Image.create(str(disk), 64 << 20).close()
    sock = tmp_path / "q.sock"
    proc = start_system(["-blockdev", f"driver=file,filename={disk},node-name=f0",
                         "-blockdev", "driver=qcow2,file=f0,node-name=disk0",
                         "-device", "virtio-blk-pci,drive=disk0,id=vd0"], sock)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        s.settimeout(30)
        buf = b""

        def until(pred) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
            nonlocal buf
            while True:
                msgs = [json.loads(x) for x in buf.split(b"\r\n") if x.strip()]
                if any(pred(m) for m in msgs):
                    buf = b""
                    return msgs
                chunk = s.recv(65536)
                assert chunk, "connection closed"
                buf += chunk

        def concluded(job: str):  # type: ignore[no-untyped-def]
            return lambda m: m.get("event") == "JOB_STATUS_CHANGE" and m["data"] == {"id": job, "status": "concluded"}

        until(lambda m: "QMP" in m)
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        until(lambda m: "return" in m)
        s.sendall(b'{"execute": "snapshot-save", "arguments": {"job-id": "s", "tag": "t", "vmstate": "disk0", '
                  b'"devices": ["disk0"]}}\n')
        until(concluded("s"))
        s.sendall(b'{"execute": "snapshot-load", "id": "L", "arguments": {"job-id": "l", "tag": "t", '
                  b'"vmstate": "disk0", "devices": ["disk0"], "__org.snaplab_engine": "lazy"}}\n')
        msgs = until(concluded("l"))
        names = [m.get("event") or ("reply" if m.get("id") == "L" else "other") for m in msgs]
        changes = [i for i, m in enumerate(msgs) if m.get("event") == "JOB_STATUS_CHANGE"]
        assert [msgs[i]["data"]["status"] for i in changes[:2]] == ["created", "running"], msgs
        assert "STOP" in names and "RESUME" in names and "reply" in names, msgs
        assert changes[1] < names.index("STOP") < names.index("RESUME") < names.index("reply"), msgs
        s.sendall(b'{"execute": "query-jobs", "id": 2}\n')
        jobs = until(lambda m: m.get("id") == 2)[-1]["return"]
        assert [(j["id"], j["status"], "error" in j) for j in jobs if j["id"] == "l"] == [("l", "concluded", False)]
        s.close()
    finally:
        proc.kill()
        proc.wait(10)


def test_a_socket_that_exists_accepts_at_once(tmp_path: Path) -> None:
    """A client that waits for the socket's path and connects the instant it appears is
    never refused: the path appears only once the socket listens."""
    import threading

    from emulator.machine import Machine, MachineConfig
    from emulator.qmp.transport import start_servers

    with Machine(MachineConfig(ram_size=16 << 20)) as m:
        for i in range(30):
            path = tmp_path / f"m{i}.sock"
            servers: list[object] = []
            t = threading.Thread(target=lambda p=path, out=servers: out.extend(
                start_servers(m.monitor, [{"kind": "unix", "path": str(p)}])))
            t.start()
            while not path.exists():
                pass
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(str(path))  # ConnectionRefusedError if it was not listening yet
                c.settimeout(10)
                assert c.recv(4096).startswith(b'{"QMP"')
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            t.join(10)
            for srv in servers:
                srv.close()  # type: ignore[attr-defined]
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary name left


_SLOW_START = """
import sys, time
from emulator.runctl import RunControl
start = RunControl.start
def slow_start(self, *a, **k):
    time.sleep(1.5)  # a loaded host: the machine starts well after the socket is there
    return start(self, *a, **k)
RunControl.start = slow_start
import emulator.cli
sys.exit(emulator.cli.main(sys.argv[1:]))
"""


def test_a_client_that_connects_at_once_finds_the_machine_started(tmp_path: Path) -> None:
    """QEMU serves its monitors from the main loop, entered after vm_start(): the first
    command a client gets answered already sees the guest running (without -S), however early
    it connected.  Ours listened before the machine started and answered in between: a
    snapshot-load sent then found no guest to stop (no STOP event; seen once on a loaded host)."""
    sock = tmp_path / "q.sock"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_START, "-m", "32M",
                             "-qmp", f"unix:{sock},server=on,wait=off"], stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.stderr else b""
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.settimeout(60)
            f = s.makefile("rb")
            assert json.loads(f.readline())["QMP"]["version"]["qemu"]
            s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status", "id": 1}\n')
            replies = [json.loads(f.readline()) for _ in range(2)]
            assert replies[0] == {"return": {}}
            assert replies[1]["return"]["status"] == "running", replies
            s.sendall(b'{"execute": "quit"}\n')
            f.read()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
