"""snaplab-system's command line: QEMU's recorded command lines start it unchanged."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from emulator.block import Qcow2Image
from emulator.cli import build_machine, parse_args
from emulator.errors import UsageError
from emulator.guest import DATA_DIR, FIRMWARE_BIN
from emulator.machine import Machine, MachineConfig
from emulator.qmp.readline import ReadlineState

REF = Path(__file__).resolve().parents[2] / "docs" / "reference" / "transcripts"


def qemu_line(name: str, w: Path) -> list[str]:
    """A recorded QEMU command line with only the firmware file names changed."""
    text = (REF / name).read_text().strip()
    text = text.replace("$OVMF/OVMF_CODE.fd", str(FIRMWARE_BIN)).replace("$W", str(w))
    argv = shlex.split(text)
    assert argv[0] == "qemu-system-x86_64"
    for a in argv:
        for tok in a.replace('"', " ").split():
            if tok.startswith(str(w)) and tok.endswith(".fd"):
                shutil.copy(DATA_DIR / "firmware" / "vars-template.fd", tok)
            if tok.startswith(str(w)) and tok.endswith(".qcow2"):
                Qcow2Image.create(tok, 1 << 30).close()
    return argv[1:]


def test_recorded_qemu_command_line_builds_our_machine(tmp_path: Path) -> None:
    argv = [a for a in qemu_line("cmdline-2disk-rawvars.txt", tmp_path)]
    # -qmp is served by the QMP monitor; the rest must build the same machine.
    i = argv.index("-qmp")
    opts = parse_args(argv[:i] + argv[i + 2:])
    assert opts.ram_size == 256 << 20 and [d.drive for d in opts.disks] == ["disk0", "disk1"]
    m, close = build_machine(opts)
    try:
        assert m.graph["fw-code"].read_only and not m.graph["fw-vars"].can_snapshot
        assert m.graph["disk0"].can_snapshot and m.disk.sectors(1) == (1 << 30) // 512
        m.start()
        time.sleep(0.3)
        m.stop()
    finally:
        m.close()
        close()
    log = (tmp_path / "t4c-serial.log").read_text()
    assert "BootCount: 1" in log


def test_options_and_errors() -> None:
    o = parse_args(["-m", "512", "-S", "-snaplab-workload", "dirty,seed=7,ws=64M,rate=100M,pattern=hot-cold",
                    "-accel", "tcg", "-display", "none", "-nodefaults", "-nographic"])
    assert o.ram_size == 512 << 20 and o.paused
    assert (o.workload.seed, o.workload.working_set, o.workload.rate, o.workload.pattern) == (
        7, 64 << 20, 100 << 20, "hot-cold")
    assert parse_args(["-qmp", "unix:/tmp/x.sock,server=on,wait=off"]).qmp == [
        {"kind": "unix", "path": "/tmp/x.sock", "wait": False}]
    for argv, text in [
        (["-foo"], "-foo: invalid option"),
        (["-device", "e1000"], "'e1000' is not a valid device model name"),
        (["-machine", "q35,nope=1"], "Property 'nope' not found"),
        (["-snaplab-workload", "dirty,pattern=zigzag"], "pattern must be one of sequential, random, hot-cold"),
        (["-snaplab-workload", "wat"], "workload must be one of idle, dirty, disk, mixed"),
        (["-qmp", "tcp:0.0.0.0:4444,server=on,wait=off"], "loopback only"),
        (["-accel", "kvm"], "only tcg/qtest is supported"),
        (["-m"], "-m: requires an argument"),
    ]:
        with pytest.raises(UsageError, match=text):
            parse_args(argv)


def test_entry_point_reports_errors_cleanly() -> None:
    res = subprocess.run([sys.executable, "-m", "emulator.cli", "-blockdev", "driver=qcow2,file=nope,node-name=x"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith("snaplab-system: ") and "Traceback" not in res.stderr


# -- what qemu-iotests use (issue #21) ---------------------------------------------------------

def snaplab(*argv: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator.cli", *argv], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_as_the_iotests_harness_reads_them() -> None:
    machines = snaplab("-machine", "help").stdout.splitlines()
    assert machines[0] == "Supported machines are:"
    default = next(m for m in machines if m.endswith(" (default)")).split(" ", 1)[0]  # testenv.py's reading
    assert default == "snaplab" and any(m.endswith(f"(alias of {default})") for m in machines)
    devices = snaplab("-M", "none", "-device", "help").stdout
    assert 'name "virtio-blk-pci", bus PCI, alias "virtio-blk"' in devices and 'name "scsi-hd"' in devices
    assert " copy-on-read " in snaplab("-drive", "format=help").stdout.split(":", 1)[1] + " "


def test_error_policies_come_from_the_device_else_the_drive_else_qemus_defaults() -> None:
    o = parse_args(["-drive", "file=a.qcow2,if=none,id=a,werror=stop,rerror=stop",
                    "-drive", "file=b.qcow2,if=virtio,werror=report",
                    "-drive", "file=c.qcow2,if=none,id=c",
                    "-device", "virtio-blk-pci,drive=a,werror=ignore", "-device", "virtio-blk-pci,drive=c,rerror=enospc"])
    assert [(d.drive, d.policies()) for d in o.disks] == [
        ("virtio0", ("report", "report")), ("a", ("ignore", "stop")), ("c", ("enospc", "enospc"))]


def test_drives_get_qemus_blockbackend_names_and_devices() -> None:
    o = parse_args(["-drive", "file=a.qcow2,if=none", "-drive", "file=b.qcow2,if=none,format=qcow2",
                    "-drive", "driver=file,file=c.raw,if=virtio", "d.qcow2",
                    "-device", "virtio-scsi,id=hba0", "-object", "iothread,id=io0", "-set", "device.hba0.iothread=io0",
                    "-device", "scsi-hd,drive=none1", "-device", "virtio-blk,drive=none0"])
    assert [d.backend for d in o.drives] == ["none0", "none1", "virtio0", "ide0-hd0"]
    assert [d.drive for d in o.disks] == ["virtio0", "ide0-hd0", "none1", "none0"]
    assert o.devices[0].props["iothread"] == "io0"


@pytest.mark.parametrize(("argv", "text"), [
    (["-drive", "file=IMG,index=abc"], "-drive file=IMG,index=abc: Parameter 'index' expects a number"),
    (["-m", "8"], "-m 8: RAM size 8388608 must be a multiple of 4 KiB between 16 MiB and 64 GiB"),
    (["-machine", "pflash0=nope"], "Property 'cfi.pflash01.drive' can't find value 'nope'"),
    (["-qmp", "tcp::abc,server=on"], "-qmp tcp::abc,server=on: address resolution failed for"),
    (["-serial", "file:/nonexistent/dir/log"], "Could not open '/nonexistent/dir/log': No such file or directory"),
    (["-device", "loader,file=/nonexistent,addr=0x1000"], "Cannot load specified image /nonexistent"),
    (["-drive", "file=IMG,if=none,file.locking=maybe"], "Parameter 'locking' does not accept value 'maybe'"),
    (["-drive", "file=IMG,if=none,foo=bar"], "-drive file=IMG,if=none,foo=bar: Block format 'qcow2' does not "
                                             "support the option 'foo'"),
    (["-drive", "driver=file,file=IMG,foo=bar"], "Block protocol 'file' doesn't support the option 'foo'"),
    (["-drive", "file=IMG,if=none,cache=bogus"], "-drive file=IMG,if=none,cache=bogus: invalid cache option"),
    (["-device", "nosuchdev"], "-device nosuchdev: 'nosuchdev' is not a valid device model name"),
    (["-device", "scsi-hd,drive=x"], "-device scsi-hd,drive=x: No 'SCSI' bus found for device 'scsi-hd'"),
    (["-set", "device.hba0.iothread=x"], '-set device.hba0.iothread=x: there is no device "hba0" defined'),
    (["-drive", "file=MISSING,if=none"], "Could not open backing file: Could not open '"),
    (["-drive", "file=LOOP,if=none"], "Could not open backing file: Backing file '"),
    # the error policies, in QEMU 7.2's words (its replies to the same arguments)
    (["-drive", "file=IMG,if=virtio,werror=foo"], "-drive file=IMG,if=virtio,werror=foo: 'foo' invalid write error action"),
    (["-drive", "file=IMG,if=virtio,rerror=enospc"], "'enospc' invalid read error action"),
    (["-drive", "file=IMG,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0,werror=foo"],
     "-device virtio-blk-pci,drive=d0,werror=foo: Parameter 'werror' does not accept value 'foo'"),
])
def test_bad_input_is_one_line_in_qemus_words(tmp_path: Path, argv: list[str], text: str) -> None:
    img, missing, loop_a, loop_b = (tmp_path / n for n in ("t.qcow2", "m.qcow2", "a.qcow2", "b.qcow2"))
    Qcow2Image.create(img, 1 << 20).close()
    Qcow2Image.create(missing, 1 << 20, backing_file="gone.qcow2", backing_fmt="qcow2").close()
    Qcow2Image.create(loop_a, 1 << 20, backing_file="b.qcow2", backing_fmt="qcow2").close()
    Qcow2Image.create(loop_b, 1 << 20, backing_file="a.qcow2", backing_fmt="qcow2").close()
    subst = {"IMG": str(img), "MISSING": str(missing), "LOOP": str(loop_a)}
    for k, v in subst.items():
        argv = [a.replace(k, v) for a in argv]
        text = text.replace(k, v)
    res = snaplab("-accel", "qtest", *argv)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("snaplab-system: ") and text in res.stderr, res.stderr


def test_help_and_version() -> None:
    """-h, -help and --help print the option list, -version the version; exit 0, as QEMU's."""
    for flag in ("-h", "-help", "--help"):
        res = snaplab(flag)
        assert res.returncode == 0 and res.stdout.startswith("usage: snaplab-system [options] [disk_image]")
        assert "-snaplab-workload" in res.stdout and res.stderr == ""
    res = snaplab("-version")
    assert res.returncode == 0 and "QEMU emulator version 7.2" in res.stdout


def test_readline_echo_is_qemus() -> None:
    """Bytes recorded from qemu-system-x86_64 7.2 for ``info``+Enter typed on -monitor stdio."""
    rs = ReadlineState()
    echo = rs.show_prompt() + "".join(rs.readline_handle_byte(c)[0] for c in b"info\n")
    assert echo == "(qemu) i\x1b[K\x1b[Din\x1b[K\x1b[D\x1b[Dinf\x1b[K\x1b[D\x1b[D\x1b[Dinfo\x1b[K\r\n"
    rs.readline_handle_byte(ord("x"))
    rs.readline_handle_byte(8)
    assert rs.readline_handle_byte(ord("\n"))[1] == ""  # backspace edited the line away


def test_monitor_stdio_under_qtest_saves_with_the_clock_at_zero(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    Qcow2Image.create(img, 64 << 20).close()
    res = subprocess.run([sys.executable, "-m", "emulator.cli", "-nodefaults", "-display", "none", "-accel", "qtest",
                          "-nographic", "-monitor", "stdio", "-serial", "none", str(img)],
                         input=b"savevm s1\ninfo status\ninfo snapshots\nquit\n", capture_output=True, timeout=60)
    assert res.returncode == 0 and res.stderr == b""
    lines = res.stdout.decode().split("\r\n")
    assert lines[0] == "QEMU 7.2.22 monitor - type 'help' for more information"
    assert lines[1].startswith("(qemu) s\x1b[K") and lines[1].endswith("savevm s1\x1b[K")
    assert "VM status: running" in lines
    row = next(ln for ln in lines if ln.startswith("--        s1"))
    assert " 00:00:00.000 " in row  # qtest: the virtual clock never moved
    assert lines[-2].startswith("(qemu) q") and lines[-2].endswith("quit\x1b[K") and lines[-1] == ""  # then exit
    assert "s1" in Qcow2Image.open(img, read_only=True).snapshot_list()[0].name


def test_qmp_tcp_listens_on_loopback_unless_told(tmp_path: Path) -> None:
    assert parse_args(["-qmp", "tcp::4444,server=on,wait=off"]).qmp[0]["host"] == "127.0.0.1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "emulator.cli", "-accel", "qtest", "-m", "32M",
                             "-qmp", f"tcp::{port},server=on,wait=off"], stderr=subprocess.PIPE)
    try:
        listening: list[str] = []
        for _ in range(200):
            listening = [ln.split()[1] for ln in Path("/proc/net/tcp").read_text().splitlines()[1:]
                         if ln.split()[3] == "0A" and int(ln.split()[1].split(":")[1], 16) == port]
            if listening:
                break
            time.sleep(0.05)
        assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1, not 0.0.0.0
    finally:
        proc.terminate()
        proc.wait(20)


# -- a termination signal in every way snaplab-system serves (issue #20) ------------------------

def _saved_image(tmp_path: Path) -> Path:
    """An image whose snapshot s1 was saved by snaplab-system itself (-monitor stdio)."""
    img = tmp_path / "t.qcow2"
    Qcow2Image.create(img, 16 << 20).close()
    res = snaplab("-m", "32M", "-monitor", "stdio", "-serial", "none", str(img), stdin="savevm s1\nquit\n")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return img


def _migration_file(tmp_path: Path) -> Path:
    out = tmp_path / "m.bin"
    with Machine(MachineConfig(ram_size=32 << 20)) as m:
        m.start()
        m.qmp().execute("migrate", {"uri": f"file:{out}"})
        m.migration.wait(60)
        assert m.migration.status == "completed"
    return out


@pytest.mark.parametrize("how", ["qmp", "monitor-stdio", "loadvm", "incoming-file", "incoming-defer", "paused"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_shuts_down_cleanly_however_it_serves(tmp_path: Path, how: str, sig: signal.Signals) -> None:
    """QEMU's termsig_handler from main()'s first line, whatever else runs: the QMP client sees
    SHUTDOWN {"guest": false, "reason": "host-signal"} before the socket closes, exit status 0,
    nothing on stderr.  (cli.py's old handler closed the monitors first: no SHUTDOWN, fails here.)"""
    sock = tmp_path / "q.sock"
    extra = {"qmp": [], "monitor-stdio": ["-monitor", "stdio"], "paused": ["-S"],
             "incoming-defer": ["-incoming", "defer"]}.get(how, [])
    if how == "loadvm":
        extra = ["-loadvm", "s1", str(_saved_image(tmp_path))]
    elif how == "incoming-file":
        extra = ["-incoming", f"file:{_migration_file(tmp_path)}"]
    proc = subprocess.Popen([sys.executable, "-m", "emulator.cli", "-m", "32M", *extra,
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.stderr else b""
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(str(sock))
            f = s.makefile("rwb")
            f.readline()
            f.write(b'{"execute": "qmp_capabilities"}\n')
            f.flush()
            assert "return" in json.loads(f.readline())
            proc.send_signal(sig)  # stdin stays open: -monitor stdio has not seen EOF
            events = [json.loads(line) for line in f]
        assert proc.wait(60) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
        shutdown = [e["data"] for e in events if e.get("event") == "SHUTDOWN"]
        assert shutdown == [{"guest": False, "reason": "host-signal"}], events
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        if proc.stdin is not None:
            proc.stdin.close()


def test_quit_closes_the_images_trimmed_and_unlocked(tmp_path: Path, qemu_img: Any) -> None:
    """At exit the block graph is closed as QEMU's bdrv_close_all: the qcow2 file, grown ahead
    of its allocations while open (docs/deviations.md 61), ends at its last cluster in use."""
    img = tmp_path / "q.qcow2"
    Qcow2Image.create(img, 64 << 20).close()
    res = snaplab("-accel", "qtest", "-drive", f"file={img},if=virtio", "-monitor", "stdio",
                  stdin="savevm s1\nquit\n")
    assert res.returncode == 0, res.stderr
    check = qemu_img("check", "--output=json", str(img))
    assert check.returncode == 0
    end = json.loads(check.stdout)["image-end-offset"]
    # (clusters the save freed may stay at the end; without the close, 256 MiB grown ahead)
    assert end <= img.stat().st_size <= end + (4 << 16)
    assert "s1" in qemu_img("snapshot", "-l", str(img)).stdout
