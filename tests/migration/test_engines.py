"""The engine registry: adding an engine is one module plus one registry line.

The example engines below are the "one module" (a save engine built only from the shared
steps of EngineContext, and a load engine); the fixture's ``append`` is the registry line.
Everything else (the QMP schema's enums, the controller's dispatch, lab.spec, the widgets,
the plots) must pick them up without an edit.
"""

from __future__ import annotations

import ast
import contextlib
import subprocess
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from emulator.migration import engines as registry
from emulator.migration.engine import LoadRequest, SaveEngine, SaveRequest, SnapshotMetrics
from emulator.migration.engines.load_blocking import BlockingLoad
from emulator.migration.vmstate import save_state
from emulator.migration.vmstate_io import VMStateStream
from emulator.runstate import RunState
from tests.migration.conftest import Factory

ROOT = Path(__file__).resolve().parents[2]


class ExampleSave(SaveEngine):
    """Stop, write RAM and devices, commit, resume: QEMU's savevm from the shared steps alone."""

    name: ClassVar[str] = "x-example"
    title: ClassVar[str] = "example (tests)"
    guest_runs: ClassVar[bool] = False

    def save(self, req: SaveRequest) -> SnapshotMetrics:
        ctx = self.ctx
        t0 = time.perf_counter()
        target = ctx.save_checks(req)
        state = ctx.vm.state
        with contextlib.ExitStack() as stack:
            t_stop = ctx.stop_for_save(target.images, stack)
            try:
                at = ctx.save_instant(req.name)
                st = save_state(VMStateStream(target.vmstate_image), ctx.machine_name, ctx.handlers(),
                                ctx.ram.array)
                ctx.commit(target, at, st.size)
            finally:
                t_resume = ctx.resume(state)
        ctx.flush(target.images)
        m = SnapshotMetrics(self.name, t_resume - t_stop, time.perf_counter() - t0, st.size, st.nonzero)
        return ctx.saved(m, target, at.name)


class ExampleLoad(BlockingLoad):
    """QEMU's loadvm under another name, counting its loads."""

    name: ClassVar[str] = "x-example-load"
    title: ClassVar[str] = "example load (tests)"
    loads = 0

    def load_steps(self, req: LoadRequest, orig: RunState) -> Generator[None, None, SnapshotMetrics]:
        ExampleLoad.loads += 1
        return (yield from super().load_steps(req, orig))


@pytest.fixture
def example_engines() -> Iterator[None]:
    registry.SAVE_ENGINES.append(ExampleSave)  # the one registry line, for each
    registry.LOAD_ENGINES.append(ExampleLoad)
    try:
        yield
    finally:
        registry.SAVE_ENGINES.remove(ExampleSave)
        registry.LOAD_ENGINES.remove(ExampleLoad)


def _engine_enum(q: Any, command: str) -> list[str]:
    """The values of ``command``'s ``__org.snaplab_engine`` member, as query-qmp-schema
    describes them (type names are masked there, as QEMU masks them)."""
    schema = {t["name"]: t for t in q.execute("query-qmp-schema")}
    cmd = next(t for t in schema.values() if t["meta-type"] == "command" and t["name"] == command)
    member = next(mb for mb in schema[cmd["arg-type"]]["members"] if mb["name"] == "__org.snaplab_engine")
    values: list[str] = schema[member["type"]]["values"]
    return values


def test_a_new_engine_reaches_the_schema_the_jobs_and_the_lab(example_engines: None, make_vm: Factory,
                                                              tmp_path: Path) -> None:
    m = make_vm()
    q = m.qmp()
    assert "x-example" in _engine_enum(q, "snapshot-save")
    assert "x-example-load" in _engine_enum(q, "snapshot-load")
    q.events()
    q.execute("snapshot-save", {"job-id": "s", "tag": "t", "vmstate": "disk0", "devices": ["disk0", "disk1"],
                                "__org.snaplab_engine": "x-example"})
    assert "error" not in q.wait_job("s", 60)
    assert [e.event for e in q.events() if e.event in ("STOP", "RESUME")] == ["STOP", "RESUME"]
    stats = q.execute("__org.snaplab_query-snapshot-stats", {"id": "s"})
    assert stats["engine"] == "x-example" and stats["vmstate-bytes"] > 0
    # The real qemu-img sees the snapshot the example engine committed on both disks.
    m.stop()
    for disk in ("disk0", "disk1"):
        path = m.graph.nodes[disk].filename
        out = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(path)], capture_output=True, text=True).stdout
        assert " t " in out, out
    m.cont()
    before = ExampleLoad.loads
    q.execute("snapshot-load", {"job-id": "l", "tag": "t", "vmstate": "disk0", "devices": ["disk0", "disk1"],
                                "__org.snaplab_engine": "x-example-load"})
    assert "error" not in q.wait_job("l", 60)
    assert ExampleLoad.loads == before + 1
    assert q.execute("query-status")["status"] == "running"

    from lab.spec import ExperimentSpec, engine_title, save_engines

    assert "x-example" in save_engines() and engine_title("x-example") == "example (tests)"
    assert ExperimentSpec(engine="x-example").engine == "x-example"


def test_an_unregistered_engine_is_refused_in_qemus_words(make_vm: Factory) -> None:
    q = make_vm().qmp()
    with pytest.raises(Exception, match="Parameter '__org.snaplab_engine' does not accept value 'x-example'"):
        q.execute("snapshot-save", {"job-id": "s", "tag": "t", "vmstate": "disk0", "devices": ["disk0"],
                                    "__org.snaplab_engine": "x-example"})
    from lab.spec import ExperimentSpec, SpecError

    with pytest.raises(SpecError, match="spec field 'engine': 'x-example' is not allowed; expected blocking, cow"):
        ExperimentSpec(engine="x-example")


def _string_constants(path: Path) -> Iterator[tuple[int, str]]:
    """Every string constant, except the value of a module-level ``MIGRATE_*`` name: the label
    of QEMU's ``migrate`` interface in the reproduction, which is not an engine."""
    tree = ast.parse(path.read_text(), filename=str(path))
    labels = {id(n.value) for n in tree.body if isinstance(n, ast.Assign)
              and all(isinstance(t, ast.Name) and t.id.startswith("MIGRATE_") for t in n.targets)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in labels:
            yield node.lineno, node.value


def test_only_the_registry_spells_an_engine_name() -> None:
    """No module outside emulator/migration/engines names an engine as a string: adding an
    engine never edits a caller."""
    names = {e.name for e in registry.SAVE_ENGINES} | {e.name for e in registry.LOAD_ENGINES}
    found = []
    for path in [*(ROOT / "emulator").rglob("*.py"), *(ROOT / "lab").rglob("*.py")]:
        if (ROOT / "emulator" / "migration" / "engines") in path.parents:
            continue
        found += [f"{path.relative_to(ROOT)}:{line}: {s!r}" for line, s in _string_constants(path) if s in names]
    assert not found, "\n".join(found)


def test_a_name_both_registries_use_gets_each_registrys_title() -> None:
    from lab.spec import engine_title

    assert "savevm" in engine_title("blocking") and "savevm" in engine_title("blocking", "save")
    assert "loadvm" in engine_title("blocking", "load")
    assert engine_title("cow") != engine_title("blocking") and engine_title("prefetch", "load") != "prefetch"
