"""QEMU's external snapshot interface: migrate to a stream, with or without background-snapshot.

``migrate-set-capabilities`` (background-snapshot, events and QEMU's incompatibility checks),
``migrate`` to ``exec:CMD`` or ``file:PATH``, ``query-migrate``, MIGRATION events,
``migrate_cancel``, and the incoming side (``-incoming URI|defer`` + ``migrate-incoming``).
Mirrors migration/migration.c.  The stream is the sequential form of snaplab's VM-state
stream (vmstate.SequentialStream): disks are not part of it (QEMU's default: shared storage).

With ``background-snapshot`` the copy-on-write engine streams RAM while the guest runs (the
stream holds the start instant) and the guest keeps running; without it, the guest is stopped,
everything is streamed, and it stays stopped in ``postmigrate``, as after a QEMU migration.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from emulator.errors import SnaplabError
from emulator.migration.cow import CHUNK, CowSave
from emulator.migration.savevm import SnapshotController, short_downtime
from emulator.migration.vmstate import (
    PAGE,
    SequentialStream,
    capture_sections,
    encode_sections,
    load_sequential,
    nonzero_pages,
)
from emulator.runstate import RunState

CAPABILITIES = ("xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events", "postcopy-ram",
                "x-colo", "release-ram", "block", "return-path", "pause-before-switchover", "multifd",
                "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
                "background-snapshot", "zero-copy-send", "postcopy-preempt")
BG_INCOMPATIBLE = ("postcopy-ram", "compress", "xbzrle", "multifd", "auto-converge", "release-ram", "return-path",
                   "dirty-bitmaps", "late-block-activate", "validate-uuid", "pause-before-switchover")
ACTIVE = ("setup", "active", "cancelling", "device", "pre-switchover")
IN_PROGRESS = "There's a migration process in progress"


class MigrationCancelled(SnaplabError):
    pass


def _open_uri(uri: str, mode: str) -> tuple[IO[bytes], subprocess.Popen[bytes] | None]:
    """exec:CMD (a shell pipe, like QEMU's) or file:PATH; QEMU's error for anything else."""
    if uri.startswith("exec:"):
        cmd = uri[5:]
        if mode == "w":
            p = subprocess.Popen(["/bin/sh", "-c", cmd], stdin=subprocess.PIPE)
            assert p.stdin is not None
            return p.stdin, p
        p = subprocess.Popen(["/bin/sh", "-c", cmd], stdout=subprocess.PIPE)
        assert p.stdout is not None
        return p.stdout, p
    if uri.startswith("file:"):
        try:
            return open(uri[5:], "wb" if mode == "w" else "rb"), None  # noqa: SIM115 - closed by the caller
        except OSError as err:
            raise SnaplabError(f"Could not open '{uri[5:]}': {err.strerror}") from err
    raise SnaplabError("Parameter 'uri' expects a valid migration protocol")


def _close_uri(f: IO[bytes] | None, proc: subprocess.Popen[bytes] | None) -> None:
    """Close what _open_uri() opened (if still open); kill an exec: command still running."""
    if f is not None:
        f.close()
    if proc is not None and proc.poll() is None:
        proc.kill()


class Migration:
    """The outgoing and incoming migration state of one VM."""

    def __init__(self, ctl: SnapshotController, emit: Callable[[str, dict[str, Any]], None]) -> None:
        self.ctl = ctl
        self.emit = emit
        self.caps = dict.fromkeys(CAPABILITIES, False)
        self.status = "none"
        self.info: dict[str, Any] = {}
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.incoming_uri: str | None = None  # "-incoming": "defer" or a URI
        self.autostart = True

    # -- capabilities ---------------------------------------------------------------------------
    def set_capabilities(self, caps: list[dict[str, Any]]) -> None:
        if self.status in ACTIVE:
            raise SnaplabError(IN_PROGRESS)
        new = dict(self.caps)
        for c in caps:
            new[c["capability"]] = c["state"]
        if new["background-snapshot"]:
            for other in BG_INCOMPATIBLE:
                if new[other]:
                    raise SnaplabError(f"Background-snapshot is not compatible with {other}")
        self.caps = new

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"state": v, "capability": k} for k, v in self.caps.items()]

    def _set(self, status: str) -> None:
        self.status = status
        if self.caps["events"]:
            self.emit("MIGRATION", {"status": status})

    # -- outgoing -----------------------------------------------------------------------------------
    def migrate(self, uri: str) -> None:
        if self.status in ACTIVE:
            raise SnaplabError(IN_PROGRESS)
        if not (uri.startswith("exec:") or uri.startswith("file:")):
            raise SnaplabError("Parameter 'uri' expects a valid migration protocol")
        self._cancel.clear()
        self.info = {}
        self._set("setup")
        self._thread = threading.Thread(target=self._outgoing, args=(uri,), name="migration", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        if self.status in ACTIVE:
            self._set("cancelling")
            self._cancel.set()

    def _outgoing(self, uri: str) -> None:
        t0 = time.perf_counter()
        ctl = self.ctl
        try:
            ctl._begin("migration")
        except SnaplabError as err:
            self.info["error-desc"] = str(err)
            self._set("failed")
            return
        f: IO[bytes] | None = None
        proc = None
        stop_t = resume_t = 0.0
        try:
            f, proc = _open_uri(uri, "w")
            out = f

            def write(data: bytes | memoryview) -> None:
                if self._cancel.is_set():
                    raise MigrationCancelled("migration cancelled")
                out.write(data)

            stream = SequentialStream(write)
            self.info["setup-time"] = int((time.perf_counter() - t0) * 1000)
            if self.caps["background-snapshot"]:
                protector, _ = ctl._protector(ctl.wp_backend)
                saved = ctl.vm.state
                saver = CowSave(protector, ctl.ram, None, None, ctl.machine_name, [], sink=stream)
                saver.prepare()
                with short_downtime(ctl.vm):
                    ctl.vm.vm_stop(RunState.FINISH_MIGRATE)
                    stop_t = time.perf_counter()
                    try:
                        captured = capture_sections(ctl.handlers())
                        saver.arm()
                    finally:
                        resume_t = time.perf_counter()
                        ctl.vm.vm_resume(saved if saved != RunState.FINISH_MIGRATE else RunState.RUNNING)
                saver.sections = encode_sections(captured)
                self._set("active")
                try:
                    saver.run()
                finally:
                    protector.disarm()
                pages = ctl.ram.size // PAGE
                normal = saver.stats.bytes_written // PAGE
            else:
                was = ctl.vm.state
                ctl.vm.vm_stop(RunState.FINISH_MIGRATE)
                stop_t = time.perf_counter()
                self._set("active")
                try:
                    sections = [(h, h.save()) for h in ctl.handlers()]
                    stream.begin(ctl.machine_name, sections, ctl.ram.size)
                    nz = nonzero_pages(ctl.ram.array)
                    idx = np.flatnonzero(nz)
                    mv = memoryview(ctl.ram.array.data).cast("B")
                    if len(idx):
                        brk = np.flatnonzero(np.diff(idx) != 1) + 1
                        for a, b in zip(np.concatenate(([0], brk)).tolist(), np.concatenate((brk, [len(idx)])).tolist(),
                                        strict=True):
                            for p in range(int(idx[a]), int(idx[b - 1]) + 1, CHUNK // PAGE):
                                q = min(p + CHUNK // PAGE, int(idx[b - 1]) + 1)
                                stream.pages(p, mv[p * PAGE:q * PAGE])
                    stream.end()
                except BaseException:
                    ctl.vm.vm_resume(was)
                    raise
                resume_t = time.perf_counter()
                pages, normal = ctl.ram.size // PAGE, int(nz.sum())
                ctl.vm.vm_resume(RunState.POSTMIGRATE)  # the source stays stopped after a migration
            f.close()
            f = None
            if proc is not None and proc.wait(60) != 0:
                raise SnaplabError(f"the migration command exited with status {proc.returncode}")
            total = time.perf_counter() - t0
            self.info.update({
                "total-time": int(total * 1000), "downtime": int((resume_t - stop_t) * 1000),
                "ram": {"total": ctl.ram.size, "transferred": stream.size, "remaining": 0,
                        "duplicate": pages - normal, "normal": normal, "normal-bytes": normal * PAGE,
                        "mbps": round(stream.size * 8 / 1e6 / max(total, 1e-9), 2),
                        "pages-per-second": int(normal / max(total, 1e-9)), "dirty-sync-count": 1},
            })
            self._set("completed")
        except MigrationCancelled:
            self._set("cancelled")
        except BaseException as err:
            self.info["error-desc"] = str(err)
            self._set("failed")
        finally:
            _close_uri(f, proc)
            ctl._end()

    def query(self) -> dict[str, Any]:
        if self.status == "none":
            return {}
        out: dict[str, Any] = {"status": self.status}
        if self.status in ACTIVE:
            out["expected-downtime"] = 300
        out.update(self.info)
        return out

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- incoming ------------------------------------------------------------------------------------
    def incoming(self, uri: str) -> None:
        """migrate-incoming: only with ``-incoming defer``, once (QEMU's rules and texts)."""
        if self.incoming_uri is None:
            raise SnaplabError("'-incoming' was not specified on the command line")
        if self.incoming_uri != "defer":
            raise SnaplabError("The incoming migration has already been started")
        if not (uri.startswith("exec:") or uri.startswith("file:")):
            raise SnaplabError("Parameter 'uri' expects a valid migration protocol")
        self.incoming_uri = uri
        self._thread = threading.Thread(target=self._incoming, args=(uri,), name="incoming", daemon=True)
        self._thread.start()

    def _incoming(self, uri: str) -> None:
        ctl = self.ctl
        self._set("setup")
        f: IO[bytes] | None = None
        proc = None
        try:
            f, proc = _open_uri(uri, "r")
            self._set("active")
            ram = ctl.ram
            ram.fill(0, 0, ram.size)
            ctl.vm.reset_for_load()
            load_sequential(f.read, ctl.machine_name, ctl.handlers(),
                            lambda first, data: ram.write(first * PAGE, data), ram.size)
            self._set("completed")
            ctl.vm.vm_resume(RunState.RUNNING if self.autostart else RunState.PAUSED)
        except BaseException as err:
            self.info["error-desc"] = str(err)
            self._set("failed")
        finally:
            _close_uri(f, proc)
