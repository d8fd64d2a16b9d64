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

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import IO, Any

from emulator.errors import MigrationCancelled, SnaplabError
from emulator.migration.cow import CHUNK, CowSave
from emulator.migration.engine import switch_interval
from emulator.migration.engines.save_cow import arm_in_window
from emulator.migration.savevm import SnapshotController
from emulator.migration.vmstate import (
    PAGE,
    SequentialStream,
    load_sequential,
    nonzero_pages,
    scan_threads,
    true_runs,
)
from emulator.runstate import RunState

CAPABILITIES = ("xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events", "postcopy-ram",
                "x-colo", "release-ram", "block", "return-path", "pause-before-switchover", "multifd",
                "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
                "background-snapshot", "zero-copy-send", "postcopy-preempt")
BG_INCOMPATIBLE = ("postcopy-ram", "compress", "xbzrle", "multifd", "auto-converge", "release-ram", "return-path",
                   "dirty-bitmaps", "late-block-activate", "validate-uuid", "pause-before-switchover")
IN_PROGRESS = "There's a migration process in progress"


class MigrationStatus(StrEnum):
    """qapi/migration.json ``MigrationStatus`` (the values QEMU 7.2 reports here)."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    DEVICE = "device"
    PRE_SWITCHOVER = "pre-switchover"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        """migration_is_active()'s states: a new migrate or capability change is refused."""
        return self in (MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.CANCELLING,
                        MigrationStatus.DEVICE, MigrationStatus.PRE_SWITCHOVER)


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
        self.status = MigrationStatus.NONE
        self.info: dict[str, Any] = {}
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.incoming_uri: str | None = None  # "-incoming": "defer" or a URI
        self.autostart = True

    # -- capabilities ---------------------------------------------------------------------------
    def set_capabilities(self, caps: list[dict[str, Any]]) -> None:
        if self.status.active:
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

    def _set(self, status: MigrationStatus) -> None:
        self.status = status
        if self.caps["events"]:
            self.emit("MIGRATION", {"status": status.value})

    # -- outgoing -----------------------------------------------------------------------------------
    def migrate(self, uri: str) -> None:
        if self.status.active:
            raise SnaplabError(IN_PROGRESS)
        if not (uri.startswith("exec:") or uri.startswith("file:")):
            raise SnaplabError("Parameter 'uri' expects a valid migration protocol")
        self._cancel.clear()
        self.info = {}
        self._set(MigrationStatus.SETUP)
        self._thread = threading.Thread(target=self._outgoing, args=(uri,), name="migration", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        if self.status.active:
            self._set(MigrationStatus.CANCELLING)
            self._cancel.set()

    def _outgoing(self, uri: str) -> None:
        """migration_thread(): the whole outgoing migration, on its own thread, as the VM's
        one snapshot operation; its final status is set before that is over."""
        t0 = time.perf_counter()
        with contextlib.ExitStack() as busy:
            try:
                busy.enter_context(self.ctl.exclusive("migration"))
                self._send(uri, t0)
            except MigrationCancelled:
                self._set(MigrationStatus.CANCELLED)
            except BaseException as err:
                self.info["error-desc"] = str(err)
                self._set(MigrationStatus.FAILED)

    def _send(self, uri: str, t0: float) -> None:
        f: IO[bytes] | None = None
        proc = None
        try:
            f, proc = _open_uri(uri, "w")
            out = f

            def write(data: bytes | memoryview) -> None:
                if self._cancel.is_set():
                    raise MigrationCancelled("migration cancelled")
                out.write(data)

            stream = SequentialStream(write)
            self.info["setup-time"] = int((time.perf_counter() - t0) * 1000)
            save = self._background if self.caps["background-snapshot"] else self._stop_and_copy
            try:
                stopped_s, normal = save(stream)
                f.close()
            except OSError as err:  # QIOChannel's "Unable to write to file" / "... to command"
                kind = "file" if uri.startswith("file:") else "command"
                raise SnaplabError(f"Unable to write to {kind}: {err.strerror}") from err
            f = None
            if proc is not None and proc.wait(60) != 0:
                raise SnaplabError(f"the migration command exited with status {proc.returncode}")
            self._completed(time.perf_counter() - t0, stopped_s, stream.size, normal)
        except BaseException:
            with contextlib.suppress(OSError):
                _close_uri(f, proc)
            f = None
            if uri.startswith("file:"):  # what the failed migration wrote is given back
                with contextlib.suppress(OSError):
                    os.truncate(uri[5:], 0)
            raise
        finally:
            _close_uri(f, proc)

    def _background(self, stream: SequentialStream) -> tuple[float, int]:
        """background-snapshot: the copy-on-write engine's stop (engines/save_cow.py), then
        RAM streamed while the guest runs.  Returns (seconds stopped, pages sent)."""
        ctx = self.ctl.ctx
        protector, _ = ctx.protector()
        saver = CowSave(protector, ctx.ram, None, None, ctx.machine_name, [], sink=stream)
        saver.prepare()
        with contextlib.ExitStack() as stack:
            w = arm_in_window(ctx, saver, RunState.FINISH_MIGRATE, [], stack)
        saver.sections = w.sections
        self._set(MigrationStatus.ACTIVE)
        try:
            with switch_interval(1e-4):  # as the copy-on-write engine (engines/save_cow.py)
                saver.run()
        finally:
            protector.disarm()
        return w.t_resume - w.t_stop, saver.stats.bytes_written // PAGE

    def _stop_and_copy(self, stream: SequentialStream) -> tuple[float, int]:
        """A plain migration: the guest stopped, everything streamed, the guest left stopped
        in ``postmigrate`` as after a QEMU migration.  Returns (seconds stopped, pages sent)."""
        ctx = self.ctl.ctx
        ctx.vm.vm_stop(RunState.FINISH_MIGRATE)
        stop_t = time.perf_counter()
        self._set(MigrationStatus.ACTIVE)
        try:
            stream.begin(ctx.machine_name, ctx.capture(), ctx.ram.size)
            nz = nonzero_pages(ctx.ram.array, scan_threads())
            mv = memoryview(ctx.ram.array.data).cast("B")
            step = CHUNK // PAGE
            for first, end in true_runs(nz):
                for p in range(first, end, step):
                    q = min(p + step, end)
                    stream.pages(p, mv[p * PAGE:q * PAGE])
            stream.end()
        except BaseException:
            ctx.vm.vm_resume()  # where the stop found it
            raise
        resume_t = time.perf_counter()
        ctx.vm.vm_resume(RunState.POSTMIGRATE)  # the source stays stopped after a migration
        return resume_t - stop_t, int(nz.sum())

    def _completed(self, total: float, stopped_s: float, transferred: int, normal: int) -> None:
        """query-migrate's figures of a completed migration, then the COMPLETED status."""
        pages = self.ctl.ctx.ram_pages()
        self.info.update({
            "total-time": int(total * 1000), "downtime": int(stopped_s * 1000),
            "ram": {"total": self.ctl.ctx.ram.size, "transferred": transferred, "remaining": 0,
                    "duplicate": pages - normal, "normal": normal, "normal-bytes": normal * PAGE,
                    "mbps": round(transferred * 8 / 1e6 / max(total, 1e-9), 2),
                    "pages-per-second": int(normal / max(total, 1e-9)), "dirty-sync-count": 1},
        })
        self._set(MigrationStatus.COMPLETED)

    def query(self) -> dict[str, Any]:
        if self.status == MigrationStatus.NONE:
            return {}
        out: dict[str, Any] = {"status": self.status.value}
        if self.status.active:
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
        self._cancel.clear()
        self._set(MigrationStatus.SETUP)
        self._thread = threading.Thread(target=self._incoming, args=(uri,), name="incoming", daemon=True)
        self._thread.start()

    def _incoming(self, uri: str) -> None:
        """process_incoming_migration_co(), as the VM's one snapshot operation: the machine's
        teardown cancels it and waits for its end before guest RAM is unmapped (a SIGTERM
        during ``-incoming file:`` used to unmap RAM under the loading thread)."""
        ctx = self.ctl.ctx
        f: IO[bytes] | None = None
        proc = None
        try:
            with self.ctl.exclusive("incoming migration"):
                f, proc = _open_uri(uri, "r")
                src = f

                def read(n: int) -> bytes:
                    if self._cancel.is_set():
                        raise MigrationCancelled("migration cancelled")
                    return src.read(n)

                self._set(MigrationStatus.ACTIVE)
                ram = ctx.ram
                ram.fill(0, 0, ram.size)
                ctx.vm.reset_for_load()
                load_sequential(read, ctx.machine_name, ctx.handlers(),
                                lambda first, data: ram.write(first * PAGE, data), ram.size)
                self._set(MigrationStatus.COMPLETED)
                ctx.vm.vm_resume(RunState.RUNNING if self.autostart else RunState.PAUSED)
        except MigrationCancelled:
            self._set(MigrationStatus.CANCELLED)
        except BaseException as err:
            self.info["error-desc"] = str(err)
            self._set(MigrationStatus.FAILED)
        finally:
            _close_uri(f, proc)
