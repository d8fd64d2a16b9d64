"""Image locking as QEMU 7.2's file-posix does it (``locking=auto``), checked against the real
QEMU both ways: the same lock bytes, and each side's tools refusing an image the other holds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from emulator.block.io import OsFile, image_locking
from emulator.block.qcow2 import Qcow2Image
from emulator.errors import BlockIOError
from emulator.img import main as img_main
from tests.conftest import _tool

Run = Callable[..., subprocess.CompletedProcess[str]]


def lock_bytes(path: Path) -> set[int]:
    """The bytes of ``path`` that some open file holds an OFD lock on (/proc/locks)."""
    ino = os.stat(path).st_ino
    out = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) >= 8 and f[1] == "OFDLCK" and f[5].rsplit(":", 1)[-1] == str(ino):
            out.update(range(int(f[6]), int(f[7]) + 1))
    return out


@contextmanager
def holding(argv: list[str], path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process started with ``argv``, once it holds locks on ``path``; stopped afterwards."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not lock_bytes(path):
            if p.poll() is not None:
                raise AssertionError(f"{argv[0]} exited: {p.stderr.read().decode() if p.stderr else ''}")
            assert time.monotonic() < deadline, f"{argv} took no lock on {path}"
            time.sleep(0.05)
        yield p
    finally:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def qemu_argv(path: Path) -> list[str]:
    return [_tool("qemu-system-x86_64"), "-machine", "q35", "-m", "64", "-nographic", "-nodefaults", "-S",
            "-drive", f"file={path},if=virtio,format=qcow2"]


def snaplab_argv(path: Path) -> list[str]:
    return [sys.executable, "-m", "emulator.cli", "-accel", "qtest", "-S", "-drive", f"file={path},if=virtio"]


def snaplab_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator.img", *args], capture_output=True, text=True, timeout=60)


def test_a_running_machine_locks_the_bytes_qemu_locks(tmp_path: Path, qemu_img: Run) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for p in (ours, theirs):
        qemu_img("create", "-q", "-f", "qcow2", str(p), "64M", check=True)
    with holding(qemu_argv(theirs), theirs):
        qemu_bytes = lock_bytes(theirs)
    with holding(snaplab_argv(ours), ours):
        our_bytes = lock_bytes(ours)
    assert qemu_bytes == {100, 101, 103, 201, 203}  # consistent read, write, resize; write, resize unshared
    assert our_bytes == qemu_bytes


def test_each_sides_tools_refuse_an_image_the_other_runs(tmp_path: Path, qemu_img: Run) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        qemu_img("create", "-q", "-f", "qcow2", str(p), "64M", check=True)
    with holding(snaplab_argv(a), a):
        res = qemu_img("snapshot", "-c", "x", str(a))
        assert res.returncode == 1 and 'Failed to get "write" lock' in res.stderr
        res = qemu_img("info", str(a))
        assert res.returncode == 1 and 'Failed to get shared "write" lock' in res.stderr
        assert qemu_img("info", "-U", str(a)).returncode == 0
    with holding(qemu_argv(b), b):
        res = snaplab_img("snapshot", "-c", "x", str(b))
        assert res.returncode == 1 and res.stderr == (f"snaplab-img: Could not open '{b}': Failed to get \"write\" lock\n"
                                                     f"Is another process using the image [{b}]?\n")
        res = snaplab_img("info", str(b))
        assert res.returncode == 1 and 'Failed to get shared "write" lock' in res.stderr
        assert snaplab_img("info", "-U", str(b)).returncode == 0
        assert snaplab_img("snapshot", "-l", "-U", str(b)).returncode == 0
        for args in (("check", "-U", "-r", "all"), ("snapshot", "-U", "-c", "y")):  # qemu-img's words
            res, want = snaplab_img(*args, str(b)), qemu_img(*args, str(b))
            assert res.returncode == want.returncode == 1
            assert res.stderr.replace("snaplab-img", "qemu-img") == want.stderr
            assert want.stderr == f"qemu-img: Could not open '{b}': force-share=on can only be used with read-only images\n"
    for p in (a, b):  # nothing was written behind the holders' backs, and both are released
        res = qemu_img("snapshot", "-l", str(p))
        assert res.returncode == 0 and res.stdout == ""
        assert qemu_img("check", str(p)).returncode == 0


def test_convert_onto_its_own_source_is_refused_and_loses_nothing(tmp_path: Path, qemu_img: Run) -> None:
    img = tmp_path / "e.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M", check=True)
    assert img_main(["snapshot", "-c", "kept", str(img)]) == 0
    before = img.read_bytes()
    for fmt in ("raw", "qcow2"):
        res = snaplab_img("convert", "-O", fmt, str(img), str(img))
        assert res.returncode == 1 and 'Failed to get "write" lock' in res.stderr
    assert img.read_bytes() == before
    assert "kept" in qemu_img("snapshot", "-l", str(img)).stdout and qemu_img("check", str(img)).returncode == 0


def test_the_library_locks_only_when_asked(tmp_path: Path) -> None:
    """The library's default is off (tests and the lab open one image twice in a process,
    docs/deviations.md 62); ``locking=True`` (``file.locking=on``) conflicts as QEMU's do, a
    refused open empties nothing, and a reader without force-share is refused by a writer."""
    img = tmp_path / "l.qcow2"
    Qcow2Image.create(img, 1 << 20).close()
    assert not image_locking()
    a, b = OsFile.open(img), OsFile.open(img)
    assert not lock_bytes(img)
    a.close()
    b.close()
    w = OsFile.open(img, locking=True)
    try:
        assert lock_bytes(img) == {100, 101, 103, 201, 203}
        size = img.stat().st_size
        with pytest.raises(BlockIOError, match='Failed to get "write" lock'):
            OsFile.open(img, create=True, locking=True)
        assert img.stat().st_size == size
        with pytest.raises(BlockIOError, match='Failed to get shared "write" lock'):
            OsFile.open(img, read_only=True, locking=True)
        OsFile.open(img, read_only=True, locking=False).close()  # -U
    finally:
        w.close()
    assert not lock_bytes(img)
    r1, r2 = OsFile.open(img, read_only=True, locking=True), OsFile.open(img, read_only=True, locking=True)
    assert lock_bytes(img) == {100, 201, 203}  # readers share with readers
    r1.close()
    r2.close()
