"""The in-process QMP client: a loopback to the monitor with no I/O, for Python and notebooks.

It speaks the real protocol (requests are serialised to bytes, fed to a
:class:`~emulator.qmp.protocol.QMPConnection`, replies parsed back), so notebooks and tests
see exactly what a socket client sees, but never touch an event loop: it is safe inside
Jupyter.  Every call has a timeout; a command that overruns it raises, and keeps running.
The commands that only start a job (:data:`JOB_STARTERS`: their work runs on job threads)
are dispatched on the calling thread instead, as QEMU's monitor dispatches on its main loop:
no thread hand-off between the call and a lazy load's RESUME (0.2-0.3 ms measured, and up to
2 ms beside a busy guest), and nothing for a timeout to guard.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from emulator.errors import QMPError, QMPTimeout
from emulator.qmp.commands import Monitor
from emulator.qmp.protocol import Output, Request

DEFAULT_TIMEOUT = 60.0
# Commands that return once their job has started; dispatched on the caller's thread.
JOB_STARTERS = frozenset({"snapshot-save", "snapshot-load", "snapshot-delete"})


@dataclass(frozen=True)
class QMPEvent:
    event: str
    data: dict[str, Any]
    timestamp: float  # seconds since the epoch, from the event's timestamp member

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> QMPEvent:
        ts = msg["timestamp"]
        return cls(msg["event"], msg.get("data", {}), ts["seconds"] + ts["microseconds"] / 1e6)


class QMPClient:
    """A QMP session with one monitor, in process."""

    def __init__(self, monitor: Monitor, *, negotiate: bool = True, max_events: int = 100_000) -> None:
        self.monitor = monitor
        self.conn = monitor.new_connection()
        self.greeting = json.loads(self.conn.greeting())
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._events: deque[QMPEvent] = deque(maxlen=max_events)
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qmp-client")
        monitor.subscribe(self._on_event)
        if negotiate:
            self.execute("qmp_capabilities")

    def _on_event(self, name: str, data: dict[str, Any] | None, sec: int, usec: int) -> None:
        line = self.conn.event(name, data, sec, usec)
        if line is None:
            return
        with self._cond:
            self._events.append(QMPEvent.from_msg(json.loads(line)))
            self._cond.notify_all()

    def raw(self, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """Feed raw bytes to the protocol; returns every reply they produced, parsed."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for item in self.conn.receive(data):
                if isinstance(item, Output):
                    out.append(json.loads(item.data))
                elif item.execute in JOB_STARTERS:
                    out.append(json.loads(self._dispatch_here(item)))
                else:
                    out.append(json.loads(self._dispatch(item, timeout)))
        return out

    def _dispatch_here(self, req: Request) -> bytes:
        """Dispatch on this thread (a job-starting command: it returns once its job runs)."""
        reply: list[bytes] = []
        self.monitor.dispatch(self.conn, req, reply.append)
        return reply[0]

    def _dispatch(self, req: Request, timeout: float) -> bytes:
        reply: Future[bytes] = Future()

        def serve() -> None:
            try:
                self.monitor.dispatch(self.conn, req, reply.set_result)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                if not reply.done():
                    reply.set_exception(err)

        self._pool.submit(serve)
        try:
            return reply.result(timeout=timeout)
        except FutureTimeout:
            raise QMPTimeout(f"QMP command '{req.execute}' did not answer within {timeout} s") from None

    def execute(self, cmd: str, arguments: dict[str, Any] | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Run a command; its ``return`` value, or :class:`QMPError`."""
        msg: dict[str, Any] = {"execute": cmd, "id": f"snaplab-{next(self._ids)}"}
        if arguments is not None:
            msg["arguments"] = arguments
        (reply,) = self.raw(json.dumps(msg).encode() + b"\n", timeout)
        if "error" in reply:
            raise QMPError(reply["error"]["class"], reply["error"]["desc"])
        return reply["return"]

    def hmp(self, command_line: str) -> str:
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    # -- events -------------------------------------------------------------------------------
    def events(self, clear: bool = True) -> list[QMPEvent]:
        """Every event received so far (and forget them)."""
        with self._cond:
            evs = list(self._events)
            if clear:
                self._events.clear()
            return evs

    def wait_event(self, name: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                   match: dict[str, Any] | None = None) -> QMPEvent:
        """Take the first queued event with that name (and data members), waiting if needed."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, ev in enumerate(self._events):
                    if (name is None or ev.event == name) and all(ev.data.get(k) == v for k, v in (match or {}).items()):
                        del self._events[i]
                        return ev
                left = end - time.monotonic()
                if left <= 0:
                    raise QMPTimeout(f"no {name or 'event'} within {timeout} s")
                self._cond.wait(left)

    def wait_job(self, job_id: str, timeout: float = DEFAULT_TIMEOUT, *, complete: bool = False) -> dict[str, Any]:
        """Wait until a job concludes; returns its query-jobs entry (with ``error`` if it failed).
        ``complete``: a job that becomes ready (an on-demand load) is sent ``job-complete``.
        Only the ``concluded`` event is taken from the queue."""
        if complete:
            self._complete_when_ready(job_id, timeout)
        self.wait_event("JOB_STATUS_CHANGE", timeout, {"id": job_id, "status": "concluded"})
        for j in self.execute("query-jobs"):
            if j["id"] == job_id:
                return dict(j)
        raise QMPError("GenericError", "Job not found")

    def _complete_when_ready(self, job_id: str, timeout: float) -> None:
        """Send job-complete once the job is ready; return at once if it concludes first."""
        def seen(status: str) -> bool:
            return any(ev.event == "JOB_STATUS_CHANGE" and ev.data.get("id") == job_id
                       and ev.data.get("status") == status for ev in self._events)

        end = time.monotonic() + timeout
        with self._cond:
            while not seen("ready"):
                left = end - time.monotonic()
                if seen("concluded") or left <= 0:
                    return
                self._cond.wait(left)
        try:
            self.execute("job-complete", {"id": job_id})
        except QMPError:
            # A ready load may finish by itself (every chunk faulted in) between its READY
            # event and this command: then the refusal says so, and the job is past 'ready'
            # (or gone); any other refusal (a job in standby, say) is the caller's.
            status = next((j["status"] for j in self.execute("query-jobs") if j["id"] == job_id), None)
            if status not in (None, "waiting", "pending", "aborting", "concluded", "null"):
                raise

    def close(self) -> None:
        self.monitor.unsubscribe(self._on_event)
        self._pool.shutdown(wait=False)

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
