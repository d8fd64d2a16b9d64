"""Measuring the real QEMU 7.2 on this machine, the way docs/reference/qemu-7.2-qmp.md did:
RAM filled with random bytes through ``-device loader``, ``snapshot-save``/``-load`` downtime
from the STOP/RESUME event timestamps, and background-snapshot (``migrate`` with the
``background-snapshot`` capability) downtime and total time from its events."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from emulator.errors import SnaplabError
from emulator.guest import WorkloadSpec
from emulator.qemu_guest import PROGRESS_PORT, configured_image, parse_progress

OVMF = Path("/usr/share/OVMF")


class QemuLost(SnaplabError, RuntimeError):
    """The reference QEMU went away in the middle of an experiment (its exit status and the
    end of its stderr in the message)."""


class RawQMP:
    """A minimal QMP driver that keeps every event with its timestamp."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.s.settimeout(600)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.line()
        self.cmd("qmp_capabilities")

    def line(self) -> dict[str, Any]:
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise EOFError
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\r\n", 1)
        return dict(json.loads(raw))

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": name, "id": name}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            m = self.line()
            if "event" in m:
                self.events.append(m)
            elif m.get("id") == name:
                if "error" in m:
                    raise RuntimeError(m["error"])
                return m["return"]

    def wait_event(self, pred: Any, timeout: float = 600) -> dict[str, Any]:
        end = time.monotonic() + timeout
        try:
            while True:
                for i, e in enumerate(self.events):
                    if pred(e):
                        return self.events.pop(i)
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"QEMU sent no such event within {timeout} s "
                                       f"(last events: {[e['event'] for e in self.events[-5:]]})")
                self.s.settimeout(left)
                self.events.append(self.line())
        finally:
            self.s.settimeout(600)

    def quit(self, timeout: float = 10.0) -> None:
        """``quit``, waiting a little for the reply: QEMU 7.2 can hang in its own shutdown (a
        vCPU in a synchronous pflash write, ``blk_pwrite`` -> ``aio_poll``, while the main
        thread waits in ``pause_all_vcpus``), and its reply then never leaves the monitor; the
        caller kills the process after this returns."""
        self.s.settimeout(timeout)
        with contextlib.suppress(OSError, EOFError, RuntimeError):  # (socket timeouts are OSErrors)
            self.cmd("quit")

    def close(self) -> None:
        self.s.close()

    @staticmethod
    def ts(e: dict[str, Any]) -> float:
        return float(e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6)

    def job(self, cmd: str, args: dict[str, Any]) -> float:
        """A snapshot job to its end; STOP -> RESUME seconds (0 when the VM did not stop)."""
        return self.job_times(cmd, args)[1]

    def job_times(self, cmd: str, args: dict[str, Any]) -> tuple[float, float]:
        """A snapshot job to its end; (command -> RESUME, STOP -> RESUME) seconds, from the
        send time and the events' timestamps (both the host's wall clock; 0 without a stop)."""
        self.events.clear()
        sent = time.time()
        self.cmd(cmd, args)
        self.wait_event(lambda e: e["event"] == "JOB_STATUS_CHANGE" and e["data"]["status"] == "concluded")
        info = [j for j in self.cmd("query-jobs") if j["id"] == args["job-id"]][0]
        self.cmd("job-dismiss", {"id": args["job-id"]})
        if "error" in info:
            raise RuntimeError(info["error"])
        ts = {e["event"]: self.ts(e) for e in self.events if e["event"] in ("STOP", "RESUME")}
        if len(ts) != 2:
            return 0.0, 0.0
        return ts["RESUME"] - sent, ts["RESUME"] - ts["STOP"]


LOADER_FILE_MAX_MIB = 1024  # QEMU's ROM loader reads a file with one read(), which stops at 2 GiB


def wait_firmware_writes(varstore: Path, since: float, quiet_s: float = 1.5, timeout: float = 60.0) -> bool:
    """Wait until OVMF has written its fresh variable store (``varstore``'s mtime past ``since``)
    and then left it alone for ``quiet_s``; False if that did not happen within ``timeout``.

    QEMU 7.2 aborts when a snapshot command meets a guest write to pflash: the vCPU thread's
    synchronous ``blk_pwrite`` polls the main AioContext, runs the pending ``snapshot_save_job_bh``
    there, and ``bdrv_writev_vmstate`` asserts ``qemu_get_current_aio_context() ==
    qemu_get_aio_context()`` (seen in a test run here, core dump of 2026-12-05). OVMF writes its
    varstore during the first seconds of boot, later on a loaded host, so no snapshot command may
    reach QEMU before that is over."""
    end = time.monotonic() + timeout
    last = varstore.stat().st_mtime
    changed = time.monotonic()
    while time.monotonic() < end:
        m = varstore.stat().st_mtime
        if m != last:
            last, changed = m, time.monotonic()
        if last > since and time.monotonic() - changed >= quiet_s:
            return True
        time.sleep(0.05)
    return False


def fill_files(w: Path, mib: int, seed: int = 0, *, contiguous: bool = False) -> list[str]:
    """Random fill files and their -device loader arguments: RAM below 2 GiB, and above 4 GiB
    when q35 splits RAM there, in files of at most 1 GiB each.  ``contiguous``: the same
    amount of random bytes in one region from 16 MiB on (snaplab's RAM has no PCI hole)."""
    rng = np.random.default_rng(seed)
    low = 2048 if mib >= 2816 else mib  # q35 keeps 2 GiB below 4 GiB from 2816 MiB of RAM on
    regions = [(0x1000000, low - 64)]
    if mib >= 2816:
        regions.append((0x100000000, mib - 2048 - 48))
    if contiguous:
        regions = [(0x1000000, sum(size for _, size in regions))]
    args: list[str] = []
    for addr, size in regions:
        for off in range(0, size, LOADER_FILE_MAX_MIB):
            part = min(LOADER_FILE_MAX_MIB, size - off)
            f = w / f"rand{len(args) // 2}.bin"
            with open(f, "wb") as out:
                for _ in range(part >> 4):
                    out.write(rng.integers(0, 256, 16 << 20, dtype=np.uint8).tobytes())
            args += ["-device", f"loader,file={f},addr={addr + (off << 20):#x},force-raw=on"]
    return args


def qemu_argv(w: Path, mib: int, loaders: list[str]) -> list[str]:
    shutil.copy(OVMF / "OVMF_VARS.fd", w / "vars.fd")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "disk0.qcow2"), "1G"], check=True)
    return ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35,pflash0=fw-code,pflash1=fw-vars",
            "-m", f"{mib}M", "-nographic", "-nodefaults", "-display", "none",
            "-blockdev", json.dumps({"driver": "file", "filename": str(OVMF / "OVMF_CODE.fd"),
                                     "node-name": "fw-code-file", "read-only": True}),
            "-blockdev", json.dumps({"driver": "raw", "file": "fw-code-file", "node-name": "fw-code", "read-only": True}),
            "-blockdev", json.dumps({"driver": "file", "filename": str(w / "vars.fd"), "node-name": "fw-vars-file"}),
            "-blockdev", json.dumps({"driver": "raw", "file": "fw-vars-file", "node-name": "fw-vars"}),
            "-blockdev", json.dumps({"driver": "file", "filename": str(w / "disk0.qcow2"), "node-name": "disk0-file"}),
            "-blockdev", json.dumps({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"}),
            "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev", *loaders,
            "-qmp", f"unix:{w / 'q.sock'},server=on,wait=off"]


def available() -> bool:
    return bool(shutil.which("qemu-system-x86_64")) and (OVMF / "OVMF_CODE.fd").exists()


def available_guest() -> bool:
    """QEMU can run snaplab's own guest program (it needs no OVMF)."""
    return bool(shutil.which("qemu-system-x86_64"))


@contextlib.contextmanager
def running(w: Path, mib: int, settle: float = 4.0) -> Iterator[RawQMP]:
    """qemu-system-x86_64 with ``mib`` MiB of random RAM in work dir ``w``; quit (or killed) after."""
    err_path = w / "qemu.stderr"
    argv = qemu_argv(w, mib, fill_files(w, mib))
    since = (w / "vars.fd").stat().st_mtime  # the fresh copy's
    with err_path.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        end = time.monotonic() + 120
        while not (w / "q.sock").exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("qemu-system-x86_64 did not start")
            time.sleep(0.1)
        q = RawQMP(w / "q.sock")
        t0 = time.monotonic()
        wait_firmware_writes(w / "vars.fd", since)
        time.sleep(max(0.0, settle - (time.monotonic() - t0)))
        try:
            yield q
        except (EOFError, ConnectionError) as lost:
            try:
                status: int | None = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                status = None
            tail = err_path.read_bytes()[-400:].decode(errors="replace").strip()
            raise QemuLost(f"qemu-system-x86_64 dropped its QMP connection ({type(lost).__name__}; exit status "
                           f"{status}){': ' + tail if tail else ''}") from lost
        q.quit()
    finally:
        time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def background_snapshots(q: RawQMP, w: Path, runs: int, gap: float = 1.0) -> list[tuple[float, float]]:
    """``migrate`` to a file with ``background-snapshot`` on, ``runs`` times: (downtime s, total s)
    each, from the STOP/RESUME and MIGRATION setup/completed event timestamps."""
    q.cmd("migrate-set-capabilities", {"capabilities": [
        {"capability": "background-snapshot", "state": True}, {"capability": "events", "state": True}]})
    out: list[tuple[float, float]] = []
    for i in range(runs):
        q.events.clear()
        q.cmd("migrate", {"uri": f"exec:cat > {w / f'bg{i}.bin'}"})
        done = q.wait_event(lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in ("completed", "failed"))
        ts: dict[str, float] = {}
        for e in [*q.events, done]:
            if e["event"] in ("STOP", "RESUME"):
                ts[e["event"]] = RawQMP.ts(e)
            elif e["event"] == "MIGRATION":
                ts[e["data"]["status"]] = RawQMP.ts(e)
        if "completed" not in ts:
            raise RuntimeError("QEMU's background snapshot failed")
        out.append((ts.get("RESUME", 0.0) - ts.get("STOP", 0.0), ts["completed"] - ts.get("setup", ts["completed"])))
        (w / f"bg{i}.bin").unlink(missing_ok=True)
        time.sleep(gap)
    return out


def snapshot_loads(q: RawQMP, runs: int, idle: float = 0.1) -> list[tuple[float, float]]:
    """One snapshot-save, then ``runs`` blocking snapshot-loads of it, each after ``idle`` s:
    (command -> RESUME, STOP -> RESUME) seconds each."""
    base = {"tag": "loadref", "vmstate": "disk0", "devices": ["disk0"]}
    q.job("snapshot-save", {"job-id": "loadref", **base})
    out = []
    for i in range(runs):
        time.sleep(idle)
        out.append(q.job_times("snapshot-load", {"job-id": f"loadref{i}", **base}))
    return out


def measure(sizes: list[int], runs: int = 3, settle: float = 4.0) -> list[dict[str, Any]]:
    """Rows: measurement, ram_mib, run, seconds (blocking save/load, background snapshot)."""
    rows: list[dict[str, Any]] = []
    for mib in sizes:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as d, running(Path(d), mib, settle) as q:
            base = {"vmstate": "disk0", "devices": ["disk0"]}
            for i in range(runs):
                rows.append({"measurement": "blocking save downtime", "ram_mib": mib, "run": i,
                             "seconds": q.job("snapshot-save", {"job-id": f"s{i}", "tag": f"p{i}", **base})})
            for i in range(runs):
                rows.append({"measurement": "blocking load", "ram_mib": mib, "run": i,
                             "seconds": q.job("snapshot-load", {"job-id": f"l{i}", "tag": f"p{i}", **base})})
            for i in range(runs):
                q.job("snapshot-delete", {"job-id": f"d{i}", "tag": f"p{i}", "devices": ["disk0"]})
            for i, (down, total) in enumerate(background_snapshots(q, Path(d), runs)):
                rows.append({"measurement": "background snapshot downtime", "ram_mib": mib, "run": i,
                             "seconds": down})
                rows.append({"measurement": "background snapshot total", "ram_mib": mib, "run": i,
                             "seconds": total})
    return rows


class ProgressReader:
    """The guest's progress reports (data/qemu/platform.inc) from QEMU's debug console, each
    timestamped on the host (``time.monotonic_ns``) when it arrives: what snaplab's lab port
    records, for QEMU.  A thread drains the socket so QEMU's vCPU never waits on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.samples: list[tuple[int, int]] = []  # (host monotonic ns, iterations)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="qemu-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tail = b""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic_ns()
            its, tail = parse_progress(tail + data)
            with self._lock:
                self.samples.extend((now, i) for i in its)

    def history(self, last: int | None = None) -> list[tuple[int, int]]:
        """The samples (or the ``last`` ones), oldest first."""
        with self._lock:
            return list(self.samples if last is None else self.samples[-last:])


def guest_argv(w: Path, mib: int, spec: WorkloadSpec, loaders: list[str], cache_direct: bool = False) -> list[str]:
    """qemu-system-x86_64 running snaplab's own guest program (emulator/qemu_guest.py): the
    configured multiboot image, a 1 GiB qcow2 disk for the VM state, progress on a debug
    console chardev (``w/progress.sock``, which the host listens on), QMP on ``w/q.sock``.
    ``cache_direct``: the image's file node opened with ``cache.direct=on`` (O_DIRECT: the VM
    state written and read around the host's page cache, as snaplab does)."""
    disk_file: dict[str, Any] = {"driver": "file", "filename": str(w / "disk0.qcow2"), "node-name": "disk0-file"}
    if cache_direct:
        disk_file["cache"] = {"direct": True}
    (w / "guest.mb").write_bytes(configured_image(spec, mib << 20))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "disk0.qcow2"), "1G"], check=True)
    return ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", f"{mib}M",
            "-nodefaults", "-display", "none", "-serial", "none", "-kernel", str(w / "guest.mb"),
            "-device", "pvpanic",
            "-chardev", f"socket,id=progress,path={w / 'progress.sock'}",
            "-device", f"isa-debugcon,iobase={PROGRESS_PORT:#x},chardev=progress",
            "-blockdev", json.dumps(disk_file),
            "-blockdev", json.dumps({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"}),
            "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev", *loaders,
            "-qmp", f"unix:{w / 'q.sock'},server=on,wait=off"]


@contextlib.contextmanager
def running_guest(w: Path, mib: int, spec: WorkloadSpec, *, loaders: list[str] | None = None,
                  cache_direct: bool = False) -> Iterator[tuple[RawQMP, ProgressReader, list[str]]]:
    """QEMU running snaplab's guest program ``spec`` in ``mib`` MiB (``loaders``: the
    ``-device loader`` arguments of :func:`fill_files`, made beforehand); yields its QMP, its
    progress and its command line.  QEMU's stderr goes to ``w/qemu.stderr``."""
    argv = guest_argv(w, mib, spec, loaders or [], cache_direct)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(w / "progress.sock"))
    listener.listen(1)
    listener.settimeout(60)
    errlog = open(w / "qemu.stderr", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errlog)
    conn: socket.socket | None = None
    q: RawQMP | None = None
    try:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            raise RuntimeError(f"qemu-system-x86_64 did not start: {_stderr(proc, w)}") from None
        progress = ProgressReader(conn)
        end = time.monotonic() + 60
        while not (w / "q.sock").exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"qemu-system-x86_64 did not start: {_stderr(proc, w)}")
            time.sleep(0.05)
        while True:  # the socket file exists from bind(), connections from listen(): a moment later
            try:
                q = RawQMP(w / "q.sock")
                break
            except ConnectionRefusedError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"qemu-system-x86_64 did not start: {_stderr(proc, w)}") from None
                time.sleep(0.05)
        yield q, progress, argv
        q.quit()
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if q is not None:
            q.close()
        if conn is not None:
            conn.close()
        listener.close()
        errlog.close()


def _stderr(proc: subprocess.Popen[bytes], w: Path) -> str:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    return (w / "qemu.stderr").read_bytes().decode(errors="replace").strip()[-500:]
