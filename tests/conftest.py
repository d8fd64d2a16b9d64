"""Shared fixtures: the real qemu-img / qemu-io, and images in a temp directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run must install qemu-utils")
        pytest.skip(f"{name} is not installed (apt-get install -y qemu-utils)")
    return path


@pytest.fixture(scope="session")
def qemu_img() -> Callable[..., subprocess.CompletedProcess[str]]:
    exe = _tool("qemu-img")

    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], capture_output=True, text=True, check=check, timeout=120)

    return run


@pytest.fixture(scope="session")
def qemu_io() -> Callable[..., subprocess.CompletedProcess[str]]:
    exe = _tool("qemu-io")

    def run(path: str | Path, *cmds: str, fmt: str = "qcow2") -> subprocess.CompletedProcess[str]:
        argv = [exe, "-f", fmt]
        for c in cmds:
            argv += ["-c", c]
        argv.append(str(path))
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "error" not in res.stdout.lower(), res.stdout + res.stderr
        return res

    return run
