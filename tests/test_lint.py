"""Linters are tests: ruff and mypy on the packages, and the layering rules of STYLE.md."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    if shutil.which("ruff") is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    res = _run("ruff", "check", "emulator", "lab", "tests")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy() -> None:
    res = _run(sys.executable, "-m", "mypy")
    assert res.returncode == 0, res.stdout + res.stderr


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_layering() -> None:
    """emulator/block and qmp/protocol.py import neither unicorn nor asyncio; nothing imports machine; lab -> emulator only."""
    pure = list((ROOT / "emulator" / "block").glob("*.py"))
    proto = ROOT / "emulator" / "qmp" / "protocol.py"
    if proto.exists():
        pure.append(proto)
    for path in pure:
        bad = {m for m in _imports(path) if m.split(".")[0] in ("unicorn", "asyncio")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in (ROOT / "emulator").rglob("*.py"):
        if path.name in ("machine.py", "cli.py", "__init__.py"):
            continue
        assert "emulator.machine" not in _imports(path), f"{path.relative_to(ROOT)} imports emulator.machine"
    for path in (ROOT / "emulator").rglob("*.py"):
        assert not any(m.split(".")[0] == "lab" for m in _imports(path)), f"{path} imports lab"
