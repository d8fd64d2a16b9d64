"""QMP over sockets: the only asyncio code in snaplab.

One event-loop thread serves every ``-qmp`` endpoint (unix sockets, created mode 0600; TCP only
on loopback).  Each connection gets its own :class:`~emulator.qmp.protocol.QMPConnection`; its
commands are dispatched one at a time in a worker thread, so a slow command never blocks the
loop or the other monitors, and events reach every negotiated connection through a bounded
output buffer (a client that stops reading is disconnected, not buffered without limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from emulator.errors import SnaplabError
from emulator.qmp.commands import Monitor
from emulator.qmp.protocol import ConnState, Output, QMPConnection, Request
from emulator.workers import Pool

log = logging.getLogger(__name__)
MAX_OUTPUT_BUFFER = 16 << 20
READ_CHUNK = 64 << 10


class _LoopThread:
    """The event loop every endpoint shares, on its own thread, and the command workers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="qmp-loop", daemon=True).start()
        # Unbounded (idle workers are reused, and leave after a minute): a verb may wait on a
        # snapshot operation's stopped section (runctl.OperationHold), and a fixed number of
        # such waits must not keep every other monitor's commands, ``quit`` included, queued.
        self.pool = Pool("qmp-cmd")

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)


class QMPServer:
    """One listening endpoint."""

    def __init__(self, monitor: Monitor, spec: dict[str, Any], loop: _LoopThread, held: bool = False) -> None:
        self.monitor = monitor
        self.spec = spec
        self._lt = loop
        self._server: asyncio.base_events.Server | None = None
        self.connected = threading.Event()
        self._open = asyncio.Event()  # clients greeted and served (bound to the loop on first wait)
        if not held:
            self._open.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._inflight = 0
        self._lt.run(self._start())

    async def _start(self) -> None:
        if self.spec["kind"] == "unix":
            path = self.spec["path"]
            with contextlib.suppress(FileNotFoundError):
                if os.path.exists(path) and not os.path.isdir(path):
                    os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # Bound under a temporary name and renamed once listening: a client that waits for
            # the path to appear can connect at once (never "connection refused").
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
            bound = tmp if len(os.fsencode(tmp)) < 108 else path
            old = os.umask(0o177)
            try:
                sock.bind(bound)
                sock.listen(socket.SOMAXCONN)
                if bound != path:
                    os.rename(bound, path)
            except OSError as err:
                sock.close()
                with contextlib.suppress(OSError):
                    if bound != path:
                        os.unlink(bound)
                raise SnaplabError(f"Failed to bind socket to {path}: {err.strerror}") from err
            finally:
                os.umask(old)
            self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=READ_CHUNK)
        else:
            try:
                self._server = await asyncio.start_server(self._client, self.spec["host"], self.spec["port"])
            except OSError as err:
                raise SnaplabError(f"Failed to bind socket: {err.strerror}") from err

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        conn = self.monitor.new_connection()
        self._writers.add(writer)
        self.connected.set()
        await self._open.wait()  # a held server greets once the machine has started (open())

        def send(data: bytes) -> None:
            if writer.is_closing():
                return
            if writer.transport.get_write_buffer_size() > MAX_OUTPUT_BUFFER:
                log.warning("QMP client does not read its output; disconnecting it")
                writer.close()
                return
            writer.write(data)

        def on_event(name: str, data: dict[str, Any] | None, sec: int, usec: int) -> None:
            def deliver() -> None:
                line = conn.event(name, data, sec, usec)
                if line is not None:
                    send(line)
            loop.call_soon_threadsafe(deliver)

        self.monitor.subscribe(on_event)
        try:
            send(conn.greeting())
            while conn.state != ConnState.CLOSED:
                data = await reader.read(READ_CHUNK)
                items = conn.receive(data) if data else conn.eof()
                for item in items:
                    if isinstance(item, Output):
                        send(item.data)
                        if item.close:
                            conn.state = ConnState.CLOSED
                            break
                    else:
                        self._inflight += 1
                        try:
                            # The reply is the dispatch's last step (after its bottom halves),
                            # and reaches the loop before the dispatch's end does: the next
                            # request is read once this one has been answered.
                            def reply(data: bytes) -> None:
                                loop.call_soon_threadsafe(send, data)

                            await self._dispatch(loop, conn, item, reply)
                        finally:
                            self._inflight -= 1
                await writer.drain()
                if not data:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a dispatch that failed outside the monitor's own error handling
            log.exception("QMP connection ended by an internal error")
        finally:
            self.monitor.unsubscribe(on_event)
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _dispatch(self, loop: asyncio.AbstractEventLoop, conn: QMPConnection, item: Request,
                        reply: Callable[[bytes], None]) -> None:
        """One command on a worker thread of the shared pool; returns when it has.  Whatever
        escapes the monitor ends this connection only: a SystemExit or KeyboardInterrupt
        raised on the worker comes back as a RuntimeError, since raised as itself in a task
        it would stop the event loop, and with it every monitor."""
        done = loop.create_future()

        def finished(err: BaseException | None) -> None:
            if done.done():
                return
            if err is None:
                done.set_result(None)
            else:
                done.set_exception(err)

        def run() -> None:
            try:
                self.monitor.dispatch(conn, item, reply)
            except Exception as err:  # raised again in the loop
                loop.call_soon_threadsafe(finished, err)
            except BaseException as err:  # noqa: BLE001 - see above
                wrapped = RuntimeError(f"command dispatch ended by {type(err).__name__}")
                wrapped.__cause__ = err
                loop.call_soon_threadsafe(finished, wrapped)
            else:
                loop.call_soon_threadsafe(finished, None)

        self._lt.pool.spawn(run)
        await done

    def close(self) -> None:
        """Stop listening; let commands in flight (``quit``) send their reply, then hang up."""
        async def _close() -> None:
            if self._server is not None:
                self._server.close()
            for _ in range(200):
                if self._inflight == 0:
                    break
                await asyncio.sleep(0.01)
            for w in list(self._writers):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.drain(), 2)
                w.close()
        with contextlib.suppress(Exception):
            self._lt.run(_close())
        if self.spec["kind"] == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.spec["path"])

    def open(self) -> None:
        """Greet and serve clients from now on: a held server (``start_servers(held=True)``)
        accepts connections at once but answers nothing before this, as QEMU's monitors run
        only once its main loop does, after ``vm_start()``: no command can see the machine
        before it has started."""
        self._lt.loop.call_soon_threadsafe(self._open.set)


_shared: _LoopThread | None = None


def start_servers(monitor: Monitor, specs: list[dict[str, Any]], held: bool = False,
                  give_up: threading.Event | None = None) -> list[QMPServer]:
    """Listen on every ``-qmp`` endpoint; with ``wait=on``, block until a client connects
    (or ``give_up`` is set: a termination signal, as QEMU's wait ends on one).
    ``held``: greet nobody until each server's :meth:`QMPServer.open`."""
    global _shared
    if _shared is None:
        _shared = _LoopThread()
    servers = [QMPServer(monitor, s, _shared, held) for s in specs]
    for srv in servers:
        if srv.spec.get("wait"):
            while not srv.connected.wait(0.1):
                if give_up is not None and give_up.is_set():
                    return servers
    return servers
