"""The notebooks' stored outputs were produced from the committed sources (notebooks/make.py
--check): after a change to lab/, emulator/ or data/, or to a notebook's cell list, run
``python notebooks/make.py`` and commit the notebooks."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = ROOT / "notebooks" / "make.py"


def make() -> ModuleType:
    spec = importlib.util.spec_from_file_location("notebooks_make", MAKE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_committed_notebooks_are_fresh() -> None:
    res = subprocess.run([sys.executable, str(MAKE), "--check"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_source_is_listed_and_every_listed_notebook_exists() -> None:
    m = make()
    assert sorted(m.ORDER) == sorted(p.stem for p in (ROOT / "notebooks" / "src").glob("*.py"))
    assert sorted(m.ORDER) == sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert m.ORDER == sorted(m.ORDER), "ORDER is the numbered order"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """notebooks/ (sources and notebooks) copied aside and made fresh (cells from the sources, the
    digests of this checkout), to be spoiled: these tests do not depend on the committed ones."""
    m = make()
    shutil.copytree(ROOT / "notebooks" / "src", tmp_path / "src")
    for stem in m.ORDER:
        cells = m.cells_of(stem)
        nb = m.notebook_from(cells)
        nb.metadata["snaplab"] = {"sources": m.sources_digest(cells), "commit": "0" * 40}
        (tmp_path / f"{stem}.ipynb").write_text(json.dumps(nb))
    return tmp_path


def test_a_changed_cell_list_or_dependency_or_hand_edit_is_named(copy: Path) -> None:
    m = make()
    first, second, third = m.ORDER[:3]
    assert m.stale(nb_dir=copy, src_dir=copy / "src") == []
    src = copy / "src" / f"{first}.py"
    src.write_text(src.read_text().replace("CELLS: list[tuple[str, str]] = [", "CELLS: list[tuple[str, str]] = [\n    ('md', 'new'),"))
    nb = json.loads((copy / f"{second}.ipynb").read_text())
    nb["metadata"]["snaplab"]["sources"]["emulator"] = "0" * 64
    (copy / f"{second}.ipynb").write_text(json.dumps(nb))
    nb = json.loads((copy / f"{third}.ipynb").read_text())
    nb["cells"][0]["source"] = "edited by hand"
    (copy / f"{third}.ipynb").write_text(json.dumps(nb))
    (copy / "99-orphan.ipynb").write_text("{}")
    got = [(stem, why.split(" (executed at ")[0]) for stem, why in m.stale(nb_dir=copy, src_dir=copy / "src")]
    assert got == [
        (first, f"src/{first}.py changed since it was executed"),
        (second, "emulator/ changed since it was executed"),
        (third, f"its cells were edited by hand (they differ from src/{third}.py)"),
        ("99-orphan.ipynb", "not listed in make.py's ORDER"),
    ]


def test_a_notebook_never_executed_by_make_is_stale(copy: Path) -> None:
    m = make()
    stem = m.ORDER[0]
    nb = json.loads((copy / f"{stem}.ipynb").read_text())
    del nb["metadata"]["snaplab"]
    (copy / f"{stem}.ipynb").write_text(json.dumps(nb))
    (copy / f"{m.ORDER[1]}.ipynb").unlink()
    assert m.stale(nb_dir=copy, src_dir=copy / "src")[:2] == [
        (stem, "never executed by make.py (no snaplab.sources in its metadata)"),
        (m.ORDER[1], "never built: no notebook file"),
    ]


def test_the_digest_is_of_tracked_contents_not_mtimes(tmp_path: Path) -> None:
    m = make()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "a.py").write_text("x = 1\n")
    subprocess.run(["git", "add", "lab/a.py"], cwd=tmp_path, check=True)
    before = m.tree_digest(tmp_path, "lab")
    os.utime(tmp_path / "lab" / "a.py", (1, 1))
    (tmp_path / "lab" / "untracked.py").write_text("y = 2\n")
    assert m.tree_digest(tmp_path, "lab") == before
    (tmp_path / "lab" / "a.py").write_text("x = 2\n")
    assert m.tree_digest(tmp_path, "lab") != before


def test_only_takes_a_listed_stem() -> None:
    res = subprocess.run([sys.executable, str(MAKE), "--check", "--only", "nope"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "not in ORDER: nope" in res.stderr, res.stderr
    first = make().ORDER[0]
    res = subprocess.run([sys.executable, str(MAKE), "--check", "--only", first], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode in (0, 1) and first in res.stdout and "02-" not in res.stdout, res.stdout
