"""snaplab-system's command line: QEMU's recorded command lines start it unchanged."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulator.block import Qcow2Image
from emulator.cli import build_machine, parse_args
from emulator.errors import UsageError
from emulator.guest import DATA_DIR, FIRMWARE_BIN

REF = Path(__file__).resolve().parents[3] / "shared" / "reference" / "transcripts"


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


@pytest.mark.skipif(not (REF / "cmdline-2disk-rawvars.txt").exists(), reason="shared/reference not beside the repo")
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
        (["-accel", "kvm"], "only tcg is supported"),
        (["-m"], "-m: requires an argument"),
    ]:
        with pytest.raises(UsageError, match=text):
            parse_args(argv)


def test_entry_point_reports_errors_cleanly() -> None:
    res = subprocess.run([sys.executable, "-m", "emulator.cli", "-blockdev", "driver=qcow2,file=nope,node-name=x"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith("snaplab-system: ") and "Traceback" not in res.stderr
