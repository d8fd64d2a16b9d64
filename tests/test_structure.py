"""The shape of the code (docs/architecture.md): sizes by meaning, no import cycles, no private
names across modules, one exception tree, and what the lab may import from the emulator."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("emulator", "lab")
MAX_CLASS = 400
MAX_FUNCTION = 80
# What the lab may import from the emulator: the machine and its configuration, the block
# layer's package exports (what the README shows a user), the guest programs (for snaplab and
# as QEMU's boot image), the engine
# registry and write-protect backends, the error tree, and userfaultfd's availability probe.
LAB_MAY_IMPORT = {"emulator.machine", "emulator.block", "emulator.guest", "emulator.qemu_guest", "emulator.migration.engines",
                  "emulator.migration.cow", "emulator.errors", "emulator.uffd"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) of every import, at any depth (TYPE_CHECKING too)."""
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [(node.module, a.name, node.lineno) for a in node.names]
    return out


def test_no_class_or_function_too_long() -> None:
    long = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            n = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
            if isinstance(node, ast.ClassDef) and n > MAX_CLASS:
                long.append(f"{name}.{node.name}: class of {n} lines")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > MAX_FUNCTION:
                long.append(f"{name}.{node.name}: function of {n} lines")
    assert not long, "\n".join(long)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        deps = set()
        for mod, what, _ in _imports(name):
            if what is not None and f"{mod}.{what}" in MODULES:
                deps.add(f"{mod}.{what}")
            elif mod in MODULES:
                deps.add(mod)
        graph[name] = deps - {name}
    cycles = []
    for start in graph:  # a path from a module's imports back to itself
        seen: set[str] = set()
        stack = [(d, [start, d]) for d in graph[start]]
        while stack:
            node, path = stack.pop()
            if node == start:
                cycles.append(" -> ".join(path))
                break
            if node in seen:
                continue
            seen.add(node)
            stack += [(d, [*path, d]) for d in graph.get(node, ())]
    assert not cycles, "\n".join(sorted(cycles))


def test_no_private_names_across_modules() -> None:
    bad = [f"{name}:{line} imports {what} from {mod}" for name in MODULES for mod, what, line in _imports(name)
           if what is not None and what.startswith("_") and mod.split(".")[0] in PACKAGES]
    assert not bad, "\n".join(bad)


def _exception_classes(tree: ast.Module) -> list[str]:
    """Top-level classes that derive from an exception class (by the names of their bases)."""
    known = {"Exception", "BaseException", "ValueError", "OSError", "RuntimeError"}
    found: list[str] = []
    changed = True
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    while changed:
        changed = False
        for c in classes:
            bases = {b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in c.bases}
            if c.name not in found and bases & (known | set(found) | _TREE):
                found.append(c.name)
                changed = True
    return found


_ERRORS = ROOT / "emulator" / "errors.py"
_TREE = {n.name for n in ast.parse(_ERRORS.read_text()).body if isinstance(n, ast.ClassDef)}


def test_one_exception_tree_drawn_in_errors_py() -> None:
    """Every exception class of the emulator is defined in errors.py and drawn in its
    docstring, each with its QMP class; the lab's derive from SnaplabError and are drawn too."""
    doc = ast.get_docstring(ast.parse(_ERRORS.read_text())) or ""
    outside = []
    for name, tree in TREES.items():
        for cls in _exception_classes(tree):
            if name == "emulator.errors":
                continue
            if name.startswith("lab."):
                assert f"{name}.{cls}" in doc, f"{name}.{cls} is not drawn in errors.py"
                continue
            if cls != "PowerCut":  # the fault injector's simulated death: outside the tree on purpose
                outside.append(f"{name}.{cls}")
    assert not outside, f"exception classes outside errors.py: {outside}"
    for cls in _TREE:
        line = next((ln for ln in doc.splitlines() if re.search(rf"\b{cls}\b", ln)), None)
        assert line is not None, f"{cls} is not drawn in errors.py's docstring"
    import emulator.errors as errors

    for cls in _TREE:
        obj = getattr(errors, cls)
        if issubclass(obj, errors.SnaplabError):
            assert obj.qmp_class in ("GenericError", "CommandNotFound", "DeviceNotFound", "DeviceNotActive",
                                     "KVMMissingCap"), cls


def test_the_lab_imports_only_the_emulators_public_rooms() -> None:
    bad = [f"{name}:{line} imports {mod}" for name in MODULES if name.startswith("lab")
           for mod, _, line in _imports(name)
           if mod.split(".")[0] == "emulator" and mod not in LAB_MAY_IMPORT]
    assert not bad, "\n".join(bad)
