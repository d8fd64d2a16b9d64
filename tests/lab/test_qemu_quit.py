"""lab.qemu.RawQMP.quit(): QEMU 7.2 can hang in its own shutdown and never send quit's reply
(seen in a fresh-clone run: a vCPU in a synchronous pflash write, blk_pwrite -> aio_poll, while
the main thread waited in pause_all_vcpus).  The lab must not wait for it (the socket's 600 s):
quit() returns after its short timeout, and the caller kills the process."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from lab.qemu import RawQMP


def _silent_on_quit(listener: socket.socket, seen: list[str]) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        f = conn.makefile("rb")
        for line in f:
            cmd = json.loads(line)["execute"]
            seen.append(cmd)
            if cmd == "quit":
                conn.recv(1)  # no reply: hangs as QEMU did, until the client goes away
                return
            conn.sendall(json.dumps({"return": {}, "id": cmd}).encode() + b"\r\n")


def test_quit_returns_when_qemu_never_answers(tmp_path: Path) -> None:
    path = tmp_path / "q.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    seen: list[str] = []
    server = threading.Thread(target=_silent_on_quit, args=(listener, seen), daemon=True)
    server.start()
    q = RawQMP(path)
    done = threading.Event()

    def quit_it() -> None:
        q.quit(timeout=0.2)
        done.set()

    threading.Thread(target=quit_it, daemon=True).start()
    assert done.wait(60), "RawQMP.quit() waited for a reply QEMU never sent"
    assert seen == ["qmp_capabilities", "quit"]
    q.close()
    server.join(10)
    listener.close()
