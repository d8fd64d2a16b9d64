"""The monitor: QMP command handlers, events to subscribers, the job list.

Mirrors QEMU's monitor/qmp-cmds.c, block/qapi.c (query-block, query-named-block-nodes) and
job-qmp.c.  The monitor acts on the VM through the narrow :class:`VMControl` protocol, never
on the machine's parts; its human monitor (hmp.py) is handed the VM, the version and the job
list, never the monitor (hmp.py does not import this module).  Every handler validates its
arguments through the schema before any side effect; any exception a handler did not mean
becomes a GenericError reply and the monitor keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from emulator.block.info import info_dict
from emulator.block.node import BlockGraph, BlockNode
from emulator.errors import ArgumentError, CommandNotFoundError, DeviceNotActiveError, SnaplabError
from emulator.gc_control import gc_paused
from emulator.qmp.hmp import HMP
from emulator.qmp.jobs import JobManager, JobVerb
from emulator.qmp.protocol import QMPConnection, Request
from emulator.qmp.schema import Schema, default_schema
from emulator.workers import spawn

log = logging.getLogger(__name__)
QEMU_VERSION = {"micro": 22, "minor": 2, "major": 7}
PACKAGE = "snaplab 0.1.0"

Subscriber = Callable[[str, "dict[str, Any] | None", int, int], None]


class BlockBackend(Protocol):
    """A device's view of a node, as query-block shows it (the board's Attachment)."""

    @property
    def qdev(self) -> str: ...

    @property
    def node(self) -> BlockNode: ...

    @property
    def virtio(self) -> bool: ...

    @property
    def io_status(self) -> str: ...


class VMControl(Protocol):
    """What the monitor needs from the VM."""

    graph: BlockGraph

    def add_listener(self, cb: Callable[[str, dict[str, Any], int], None]) -> None: ...

    def stop(self) -> None: ...

    def cont(self) -> None: ...

    def system_reset(self, reason: str = ...) -> None: ...

    def quit(self, reason: str = ...) -> None: ...

    def query_status(self) -> dict[str, Any]: ...

    def block_attachments(self) -> Sequence[BlockBackend]: ...


def block_device_info(node: BlockNode) -> dict[str, Any]:
    """BlockDeviceInfo in QEMU 7.2's member order."""
    if node.image is not None:
        image = info_dict(node.image, node.filename)
    else:
        assert node.file is not None
        size = node.file.size()
        image = {"virtual-size": size, "filename": node.filename, "format": "file",
                 "actual-size": node.file.allocated_bytes(), "dirty-flag": False}
    return {"iops_rd": 0, "detect_zeroes": "off", "image": image, "iops_wr": 0, "ro": node.read_only,
            "node-name": node.node_name, "backing_file_depth": 0, "drv": node.driver, "iops": 0, "bps_wr": 0,
            "write_threshold": 0, "encrypted": False, "bps": 0, "bps_rd": 0,
            "cache": {"no-flush": False, "direct": False, "writeback": True}, "file": node.filename}


class Monitor:
    """One VM's QMP monitor: shared by every connection (socket or in-process)."""

    def __init__(self, vm: VMControl, schema: Schema | None = None) -> None:
        self.vm = vm
        self.schema = schema or default_schema()
        self._subs: list[Subscriber] = []
        self._lock = threading.Lock()
        self._dispatching = threading.local()  # the bottom halves queued by the command in hand
        self._order = threading.RLock()  # events go out one at a time, in the order raised
        self._held: list[tuple[str, dict[str, Any] | None, int]] | None = None  # defer_events()
        self._held_by: int | None = None  # the thread whose dispatch ends the hold
        self.jobs = JobManager(self.broadcast, self.bottom_half)
        self.handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "qmp_capabilities": self._capabilities_again,
            "query-version": lambda a: self.version(),
            "query-commands": lambda a: self.schema.query_commands(),
            "query-qmp-schema": lambda a: self.schema.introspect(),
            "query-status": lambda a: self.vm.query_status(),
            "stop": self._stop,
            "cont": self._cont,
            "system_reset": self._reset,
            "quit": self._quit,
            "query-block": lambda a: self.query_block(),
            "query-named-block-nodes": lambda a: self.query_named_block_nodes(),
            "query-jobs": lambda a: self.jobs.query(),
            "job-dismiss": lambda a: self._job_verb(a["id"], JobVerb.DISMISS),
            "job-cancel": lambda a: self._job_verb(a["id"], JobVerb.CANCEL),
            "job-pause": lambda a: self._job_verb(a["id"], JobVerb.PAUSE),
            "job-resume": lambda a: self._job_verb(a["id"], JobVerb.RESUME),
            "job-complete": lambda a: self._job_verb(a["id"], JobVerb.COMPLETE),
            "job-finalize": lambda a: self._job_verb(a["id"], JobVerb.FINALIZE),
            # snaplab has no block jobs (a snapshot job is not one): QEMU's find_block_job answers.
            "query-block-jobs": lambda a: [],
            **{cmd: lambda a: self._no_block_job(a.get("device", a.get("id", ""))) for cmd in (
                "block-job-set-speed", "block-job-cancel", "block-job-pause", "block-job-resume",
                "block-job-complete", "block-job-dismiss", "block-job-finalize")},
        }
        self.hmp = HMP(vm, self.version, self.jobs.query)
        self.handlers["human-monitor-command"] = self._human_monitor_command
        vm.add_listener(self._on_vm_event)

    def _human_monitor_command(self, a: dict[str, Any]) -> str:
        """qmp_human_monitor_command(): ``cpu-index`` must name a vCPU (snaplab has one, 0)."""
        if "cpu-index" in a and a["cpu-index"] != 0:
            raise ArgumentError("Parameter 'cpu-index' expects a CPU number")
        return str(self.hmp.execute(a["command-line"]))

    @staticmethod
    def _no_block_job(job_id: str) -> dict[str, Any]:
        """blockdev.c find_block_job_locked(): every id, a snapshot job's included."""
        raise DeviceNotActiveError(f"Block job '{job_id}' not found")

    def _job_verb(self, job_id: str, verb: JobVerb) -> dict[str, Any]:
        if verb is JobVerb.DISMISS:
            self.jobs.dismiss(job_id)
        elif verb is JobVerb.CANCEL:
            self.jobs.cancel(job_id)
        else:
            self.jobs.verb(job_id, verb)
        return {}

    # -- events ---------------------------------------------------------------------------------
    def subscribe(self, cb: Subscriber) -> None:
        with self._lock:
            self._subs.append(cb)

    def unsubscribe(self, cb: Subscriber) -> None:
        with self._lock:
            if cb in self._subs:
                self._subs.remove(cb)

    def broadcast(self, name: str, data: dict[str, Any] | None, ts_ns: int | None = None) -> None:
        now = (time.time_ns() if ts_ns is None else ts_ns) // 1000
        with self._order:
            if self._held is not None:
                self._held.append((name, data, now))
            else:
                self._send_event(name, data, now)

    def _send_event(self, name: str, data: dict[str, Any] | None, now: int) -> None:
        with self._lock:
            subs = list(self._subs)
        for cb in subs:
            try:
                cb(name, data, now // 1_000_000, now % 1_000_000)
            except Exception:
                log.exception("event subscriber failed")

    def _on_vm_event(self, name: str, data: dict[str, Any], ts_ns: int) -> None:
        ev = self.schema.events.get(name)
        self.broadcast(name, data if (ev is not None and ev.data is not None) else None, ts_ns)

    # -- connections ----------------------------------------------------------------------------
    def version(self) -> dict[str, Any]:
        return {"qemu": dict(QEMU_VERSION), "package": PACKAGE}

    def new_connection(self) -> QMPConnection:
        return QMPConnection(self.version())

    def dispatch(self, conn: QMPConnection, req: Request, send: Callable[[bytes], None]) -> None:
        """qmp_dispatch(), then the main loop's next turn: the bottom halves the command
        scheduled run on this thread, then the reply line goes to ``send``.  QEMU's monitor
        output goes out after them too: its snapshot-load returns after STOP and RESUME."""
        queued: list[Callable[[], None]] = []
        with gc_paused():  # a collection lands after the command, not inside it (gc_control.py)
            self._dispatching.queue = queued
            try:
                try:
                    reply = self.handle(conn, req)
                finally:
                    self._dispatching.queue = None
                for bh in queued:
                    try:
                        bh()
                    except Exception:  # a bottom half reports its own errors; this one is a bug
                        log.exception("bottom half of %s failed", req.execute)
            finally:
                self._release_events()
            try:
                send(reply)
            except Exception:  # the peer is gone: the command's work still happened
                log.exception("reply to %s could not be sent", req.execute)

    def defer_events(self) -> None:
        """Every event raised from now (on any thread) until the command in hand and its bottom
        halves are done goes out then, before its reply, in the order raised and stamped with
        the time it was raised (outside a dispatch: nothing changes).  A lazy ``snapshot-load``
        asks for it: its JOB_STATUS_CHANGE events would otherwise wake the connections' thread,
        which then competes for the GIL with the load on its way to RESUME.  Held for every
        thread, as QEMU's big lock holds other threads' events while loadvm runs: an event of
        another thread (its job's worker, another monitor's ``stop``) never overtakes them."""
        if getattr(self._dispatching, "queue", None) is None:
            return
        with self._order:
            if self._held is None:
                self._held, self._held_by = [], threading.get_ident()

    def _release_events(self) -> None:
        """The end of :meth:`defer_events`' hold, if this thread's dispatch began it."""
        with self._order:
            if self._held_by != threading.get_ident():
                return
            held, self._held, self._held_by = self._held or [], None, None
            for name, data, now in held:
                self._send_event(name, data, now)

    def bottom_half(self, fn: Callable[[], None]) -> None:
        """aio_bh_schedule_oneshot() on the main loop: ``fn`` runs once the command being
        dispatched on this thread has returned, on this thread, before its reply goes out;
        outside a dispatch, on a worker."""
        queue: list[Callable[[], None]] | None = getattr(self._dispatching, "queue", None)
        if queue is not None:
            queue.append(fn)
        else:
            spawn(fn)

    def handle(self, conn: QMPConnection, req: Request) -> bytes:
        """Dispatch one request; always returns the reply line (qmp_dispatch)."""
        cmd = self.schema.commands.get(req.execute)
        handler = self.handlers.get(req.execute)
        if cmd is None or handler is None:
            return conn.error(req, "CommandNotFound", f"The command {req.execute} has not been found")
        if req.oob and not cmd.allow_oob:
            return conn.error(req, "GenericError", f"The command {req.execute} does not support OOB")
        try:
            args = self.schema.validate(cmd, req.arguments)
            value = handler(args)
        except SnaplabError as err:
            return conn.error(req, err.qmp_class, err.desc)
        except Exception as err:  # a bug: answer, log, keep serving
            log.exception("QMP command %s failed", req.execute)
            return conn.error(req, "GenericError", f"internal error in {req.execute}: {type(err).__name__}: {err}")
        return conn.success(req, value)

    # -- handlers -------------------------------------------------------------------------------
    def _capabilities_again(self, a: dict[str, Any]) -> dict[str, Any]:
        raise CommandNotFoundError("Capabilities negotiation is already complete, command ignored")

    def _stop(self, a: dict[str, Any]) -> dict[str, Any]:
        self.vm.stop()
        return {}

    def _cont(self, a: dict[str, Any]) -> dict[str, Any]:
        self.vm.cont()
        return {}

    def _reset(self, a: dict[str, Any]) -> dict[str, Any]:
        self.vm.system_reset("host-qmp-system-reset")
        return {}

    def _quit(self, a: dict[str, Any]) -> dict[str, Any]:
        self.vm.quit("host-qmp-quit")
        return {}

    def query_block(self) -> list[dict[str, Any]]:
        out = []
        for att in self.vm.block_attachments():
            d: dict[str, Any] = {}
            if att.virtio:  # blk_iostatus_enable(): virtio-blk reports it
                d["io-status"] = att.io_status
            d.update({"device": "", "locked": False, "removable": False,
                      "inserted": block_device_info(att.node), "qdev": att.qdev, "type": "unknown"})
            out.append(d)
        return out

    def query_named_block_nodes(self) -> list[dict[str, Any]]:
        nodes = list(self.vm.graph.nodes.values())
        order: list[BlockNode] = []
        for n in reversed(nodes):
            if n.image is not None and n not in order:
                order.append(n)
                for c in n.children.values():
                    if c not in order:
                        order.append(c)
        order += [n for n in reversed(nodes) if n not in order]
        return [block_device_info(n) for n in order]
