"""Write the notebooks from their cell lists in ``notebooks/src/`` and execute them, storing the
outputs nbval compares, and say whether the stored outputs are still those of the sources.

Run from anywhere:

    python notebooks/make.py              # rebuild and execute every notebook (quick mode)
    python notebooks/make.py --only 01-tour --only 13-dashboard
    python notebooks/make.py --check      # exit 1 naming each stale notebook and why

A notebook is ``notebooks/src/<stem>.py`` defining ``CELLS: list[tuple[str, str]]`` (``("md" |
"code", text)``), plus one line in :data:`ORDER` below (the numbered order).

Freshness: when a notebook is executed, its metadata gets ``snaplab.sources``: a SHA-256 of
the contents of every git-tracked file under each of :data:`DEPENDS_ON` (path and bytes; no
mtimes, so a fresh clone gives the same digest), and of the notebook's own cell list; beside it, for
people, the commit it was executed at (``+uncommitted`` when those trees had changes).  ``--check``
recomputes them and reports a notebook as stale when any differs, when it is missing, when it was
never executed by this script, or when its cells are not its source's.  ``tests/
test_notebooks_fresh.py`` runs the check, so the README's test command fails on stale notebooks:
after changing ``lab/``, ``emulator/`` or ``data/``, run this script and commit the notebooks.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lab.results import git_state  # HEAD and the uncommitted paths under DEPENDS_ON

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = HERE / "src"

# The notebooks, in their numbered order: each is notebooks/src/<stem>.py -> notebooks/<stem>.ipynb.
ORDER: list[str] = [
    "01-tour",
    "02-hmp-vs-qmp",
    "03-ovmf-varstore",
    "04-inside-qcow2",
    "05-blocking-savevm",
    "06-userfaultfd",
    "07-copy-on-write",
    "08-precopy",
    "09-engines",
    "10-two-ways",
    "11-lazy-restore",
    "12-reproduction",
    "13-dashboard",
]

# What the notebooks' outputs depend on besides their own cells (git-tracked files only).
DEPENDS_ON = ("lab", "emulator", "data")
META_KEY = "snaplab"
TIMEOUT_S = 600  # per cell
# Quick mode's budget (issue #17): every commit to lab/, emulator/ or data/ re-executes them all.
BUDGET_ONE_S, BUDGET_ALL_S = 60.0, 480.0


def cells_of(stem: str, src_dir: Path = SRC) -> list[tuple[str, str]]:
    """The cell list of notebooks/src/<stem>.py (its ``CELLS``), checked for shape."""
    path = src_dir / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(f"notebook_src_{stem.replace('-', '_')}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: cannot be loaded")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cells = getattr(mod, "CELLS", None)
    if not isinstance(cells, list) or not all(
            isinstance(c, tuple) and len(c) == 2 and c[0] in ("md", "code") and isinstance(c[1], str) for c in cells):
        raise SystemExit(f"{path}: CELLS must be a list of ('md' | 'code', text) tuples")
    return cells


def cells_digest(cells: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for kind, text in cells:
        for part in (kind, text):
            data = part.encode()
            h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def tracked_files(root: Path, top: str) -> list[str]:
    """The git-tracked files under ``top`` (paths relative to ``root``), sorted."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", top], cwd=root, capture_output=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"make.py needs git and a checkout to hash the sources: {err}") from err
    return sorted(p for p in out.decode().split("\0") if p)


def tree_digest(root: Path, top: str) -> str:
    """SHA-256 over the git-tracked files under ``top``: each one's path and working-tree bytes
    (a tracked file deleted in the working tree counts as absent)."""
    h = hashlib.sha256()
    for rel in tracked_files(root, top):
        path = root / rel
        data = path.read_bytes() if path.is_file() else b"<absent>"
        for part in (rel.encode(), data):
            h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def sources_digest(cells: list[tuple[str, str]], root: Path = ROOT) -> dict[str, str]:
    """What is recorded in a notebook's metadata when it is executed."""
    return {**{top: tree_digest(root, top) for top in DEPENDS_ON}, "cells": cells_digest(cells)}


def notebook_from(cells: list[tuple[str, str]]) -> Any:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    return nb


def build(stem: str) -> float:
    """Write and execute notebooks/<stem>.ipynb; returns the seconds it took."""
    import nbformat
    from nbclient import NotebookClient

    cells = cells_of(stem)
    before = sources_digest(cells)
    nb = notebook_from(cells)
    t0 = time.monotonic()
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    took = time.monotonic() - t0
    if sources_digest(cells) != before:
        raise SystemExit(f"{stem}: lab/, emulator/ or data/ changed while it ran; run make.py again")
    head, dirty = git_state(ROOT, DEPENDS_ON)
    nb.metadata[META_KEY] = {"sources": before, "commit": head + ("+uncommitted" if dirty else "")}
    nbformat.write(nb, HERE / f"{stem}.ipynb")
    return took


def stale(stems: list[str] | None = None, nb_dir: Path = HERE, src_dir: Path = SRC,
          root: Path = ROOT) -> list[tuple[str, str]]:
    """(stem or file, why) for each notebook whose stored outputs are not from the sources."""
    import nbformat

    stems = ORDER if stems is None else stems
    trees = {top: tree_digest(root, top) for top in DEPENDS_ON}
    out: list[tuple[str, str]] = []
    for stem in stems:
        path = nb_dir / f"{stem}.ipynb"
        if not (src_dir / f"{stem}.py").exists():
            out.append((stem, f"listed in ORDER but {src_dir.name}/{stem}.py does not exist"))
            continue
        if not path.exists():
            out.append((stem, "never built: no notebook file"))
            continue
        cells = cells_of(stem, src_dir)
        nb = nbformat.read(path, as_version=4)
        recorded = nb.metadata.get(META_KEY, {}).get("sources")
        if not isinstance(recorded, dict):
            out.append((stem, "never executed by make.py (no snaplab.sources in its metadata)"))
            continue
        stored = [("md" if c.cell_type == "markdown" else "code", c.source) for c in nb.cells]
        why = []
        if recorded.get("cells") != cells_digest(cells):
            why.append(f"src/{stem}.py changed since it was executed")
        elif stored != cells:
            why.append(f"its cells were edited by hand (they differ from src/{stem}.py)")
        why += [f"{top}/ changed since it was executed" for top in DEPENDS_ON if recorded.get(top) != trees[top]]
        commit = nb.metadata[META_KEY].get("commit")
        if why and commit:
            why[-1] += f" (executed at {commit[:12]})"
        if why:
            out.append((stem, "; ".join(why)))
    if stems is ORDER:
        listed = set(ORDER)
        out += [(p.name, "not listed in make.py's ORDER") for p in sorted(nb_dir.glob("*.ipynb"))
                if p.stem not in listed]
        out += [(f"src/{p.name}", "not listed in make.py's ORDER") for p in sorted(src_dir.glob("*.py"))
                if p.stem not in listed and not p.name.startswith("_")]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if any notebook's outputs were not produced from the committed sources")
    ap.add_argument("--only", action="append", metavar="STEM", default=[],
                    help="rebuild only this notebook (repeatable); e.g. 01-tour")
    args = ap.parse_args(argv)
    unknown = [s for s in args.only if s not in ORDER]
    if unknown:
        ap.error(f"not in ORDER: {', '.join(unknown)} (known: {', '.join(ORDER)})")
    if args.check:
        bad = stale(args.only or None)
        for stem, why in bad:
            print(f"stale: {stem}: {why}")
        if bad:
            print("rebuild with: python notebooks/make.py" + "".join(f" --only {s}" for s, _ in bad if s in ORDER))
            return 1
        print(f"fresh: {', '.join(args.only or ORDER)}")
        return 0
    _, dirty = git_state(ROOT, DEPENDS_ON)
    if dirty:
        print(f"warning: uncommitted changes in {', '.join(dirty)}: the notebooks record them, so they are "
              "stale for --check until exactly these contents are committed", file=sys.stderr)
    from nbclient.exceptions import CellExecutionError

    total, failed = 0.0, []
    for stem in args.only or ORDER:
        try:
            took = build(stem)
        except CellExecutionError as err:  # the others are still built; this one keeps its old file
            failed.append(stem)
            print(f"FAILED {stem}: {err.ename}: {err.evalue} (notebooks/{stem}.ipynb left as it was)", flush=True)
            continue
        total += took
        print(f"wrote {stem}.ipynb ({took:.1f} s)", flush=True)
        if took > BUDGET_ONE_S:
            print(f"warning: {stem} took {took:.0f} s, over quick mode's {BUDGET_ONE_S:.0f} s: make its "
                  "QUICK parameters smaller", file=sys.stderr)
    print(f"executed in {total:.1f} s")
    if total > BUDGET_ALL_S and not args.only:
        print(f"warning: all notebooks took {total:.0f} s, over quick mode's {BUDGET_ALL_S:.0f} s", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
