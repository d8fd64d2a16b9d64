"""A snapshot operation's stopped section is whole: ``cont``, ``stop`` and ``system_reset`` from
another thread wait for its end.

QEMU runs savevm and loadvm in its main loop, so a monitor's ``cont`` is carried out before or
after them.  snaplab runs them on job threads; before this rule a ``cont`` sent while a blocking
save held the guest stopped let the guest run in the middle of the save (its RAM, CPU state
and disks then no longer one instant), and a ``stop`` sent then was undone by the save's resume.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from emulator.block import Qcow2Image
from emulator.block.node import BlockGraph
from emulator.errors import SnaplabError
from emulator.guest import WorkloadSpec
from emulator.machine import DiskSpec, Machine, MachineConfig
from emulator.migration.vmstate import WARM_PAGES
from emulator.runstate import RunState

RAM = 32 << 20
COUNTER = 0x7000  # the guest's iteration counter on its lab page


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    Qcow2Image.create(tmp_path / "d0.qcow2", 64 << 20).close()
    g = BlockGraph()
    g.add({"driver": "file", "filename": str(tmp_path / "d0.qcow2"), "node-name": "d0f"})
    g.add({"driver": "qcow2", "file": "d0f", "node-name": "disk0"})
    m = Machine(MachineConfig(ram_size=RAM, workload=WorkloadSpec("dirty", seed=4),
                              disks=[DiskSpec("disk0", "disk0-dev")]), g)
    try:
        yield m
    finally:
        m.close()
        g.close()


def _counter(m: Machine) -> int:
    return int.from_bytes(m.ram.read(COUNTER, 8), "little")


def _save_held_in_its_stop(m: Machine, engine: str = "blocking", tag: str = "s") -> tuple[
        threading.Thread, threading.Event, threading.Event]:
    """A save on a job thread, held inside its stopped section (at its commit) until released."""
    inside, release = threading.Event(), threading.Event()
    ctx = m.snapshots.ctx
    commit = type(ctx).commit

    def held_commit(*a: Any, **k: Any) -> Any:
        inside.set()
        assert release.wait(60)
        return commit(ctx, *a, **k)

    ctx.commit = held_commit  # type: ignore[method-assign]
    t = threading.Thread(target=m.snapshots.save_snapshot, args=(tag, False, "disk0", ["disk0"], engine), daemon=True)
    t.start()
    assert inside.wait(60), "the save did not reach its commit"
    return t, inside, release


def _verb_waits(verb: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=verb, daemon=True)
    t.start()
    t.join(0.3)  # it waits for the save (a verb that went through returns within milliseconds)
    return t


@pytest.mark.parametrize("engine", ["blocking", "precopy"])
def test_cont_during_a_saves_stop_waits_for_the_save(machine: Machine, engine: str) -> None:
    m = machine
    m.start()
    while _counter(m) < 64:
        pass
    save, _, release = _save_held_in_its_stop(m, engine)
    at_stop = _counter(m)
    assert m.state == RunState.SAVE_VM
    cont = _verb_waits(m.cont)
    assert cont.is_alive(), "cont went through in the middle of the save"
    assert m.state == RunState.SAVE_VM and _counter(m) == at_stop  # the guest did not run
    release.set()
    save.join(60)
    cont.join(60)
    assert not save.is_alive() and not cont.is_alive()
    assert m.state == RunState.RUNNING  # the save resumed the guest; cont changed nothing after
    m.stop()
    m.snapshots.load_snapshot("s", "disk0", ["disk0"])
    assert _counter(m) == at_stop  # the snapshot is the stop instant's


def _verb_during_a_held_save(m: Machine, verb: Callable[[], None], tag: str) -> None:
    """``verb`` from another thread while a save holds the guest stopped: it waits, and is
    carried out once the save has ended."""
    save, _, release = _save_held_in_its_stop(m, tag=tag)
    waiting = _verb_waits(verb)
    assert waiting.is_alive(), f"{verb.__name__} went through in the middle of the save"
    release.set()
    save.join(60)
    waiting.join(60)
    assert not save.is_alive() and not waiting.is_alive()


def test_stop_and_reset_during_a_saves_stop_take_effect_after_it(machine: Machine) -> None:
    m = machine
    m.start()
    _verb_during_a_held_save(m, m.stop, "s")
    assert m.state == RunState.PAUSED  # not undone by the save's resume
    m.cont()
    _verb_during_a_held_save(m, m.system_reset, "s2")
    assert m.state == RunState.RUNNING


def test_quit_during_a_saves_stop_is_not_held_and_ends_the_waits(machine: Machine) -> None:
    m = machine
    m.start()
    save, _, release = _save_held_in_its_stop(m)
    refused: list[str] = []

    def cont() -> None:
        try:
            m.cont()
        except SnaplabError as err:  # after quit: QEMU's answer to cont in shutdown
            refused.append(str(err))

    waiting = _verb_waits(cont)
    assert waiting.is_alive()
    m.quit()  # never waits for the save: a shutdown request is served at once
    waiting.join(60)
    assert not waiting.is_alive() and m.state == RunState.SHUTDOWN
    assert refused == ["Resetting the Virtual Machine is required"]
    release.set()
    save.join(60)
    assert not save.is_alive() and m.state == RunState.SHUTDOWN  # the save's resume after quit does nothing


@pytest.mark.parametrize("op", ["save:blocking", "save:precopy", "save:cow", "load:blocking", "load:background",
                                "load:ondemand"])
def test_a_stop_just_before_an_operations_own_stop_is_kept(machine: Machine, op: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The state an operation goes back to is read where its stop takes the hold (QEMU reads
    runstate_is_running() just before vm_stop, under its big lock), not when it began: a
    user's ``stop`` carried out between the two leaves the guest stopped after the operation.
    Before, the operation resumed the guest to the state it had read at its start."""
    m = machine
    kind, engine = op.split(":")
    m.start()
    if kind == "load":
        m.snapshots.save_snapshot("base", False, "disk0", ["disk0"])
    # a step of the operation after it began and before its own stop: a save's stop_for_save
    # (before its vm_stop), a blocking load's bounce-buffer warm-up, a lazy load's checks
    ctx = m.snapshots.ctx
    owner, name = ((ctx, "stop_for_save") if kind == "save" else
                   (WARM_PAGES, "warm") if engine == "blocking" else (ctx, "load_checks"))
    step = getattr(owner, name)

    def a_user_stop_then_the_step(*a: Any, **k: Any) -> Any:
        user = threading.Thread(target=m.stop)  # another thread's stop, before the operation's own
        user.start()
        user.join(60)
        assert not user.is_alive() and m.state == RunState.PAUSED
        return step(*a, **k)

    monkeypatch.setattr(owner, name, a_user_stop_then_the_step)
    if kind == "save":
        m.snapshots.save_snapshot("s", False, "disk0", ["disk0"], engine)
    else:
        m.snapshots.load_snapshot("base", "disk0", ["disk0"], engine=engine)
    assert m.state == RunState.PAUSED  # the user's stop was kept


def test_monitors_waiting_on_a_held_save_leave_the_others_served(machine: Machine, tmp_path: Path) -> None:
    """Twelve monitors whose ``stop`` waits for a save's stopped section do not keep a
    thirteenth waiting: its ``query-status`` is answered, and its ``quit`` is carried out while
    the save still holds the VM.  (Commands ran on eight shared workers: the ninth monitor's
    commands queued behind the waits, ``quit`` too, until the save ended.)"""
    import json
    import socket

    from emulator.qmp.transport import start_servers
    from tests.qmp import negotiated

    m = machine
    m.start()
    path = tmp_path / "q.sock"
    (server,) = start_servers(m.monitor, [{"kind": "unix", "path": str(path)}])

    def connect() -> tuple[socket.socket, Any]:
        return negotiated(path)

    def answer(f: Any, rid: int) -> dict[str, Any]:
        while "event" in (msg := json.loads(f.readline())) or msg.get("id") != rid:
            pass  # events (STOP, SHUTDOWN) may come first
        return msg  # type: ignore[no-any-return]

    save, _, release = _save_held_in_its_stop(m)
    waiting = [connect() for _ in range(12)]
    other, f = connect()
    try:
        for s, _ in waiting:
            s.sendall(b'{"execute": "stop", "id": "w"}\n')
        end = time.monotonic() + 60
        while server._inflight < 12:  # every stop taken by a worker, each waiting on the hold
            assert time.monotonic() < end, server._inflight
            time.sleep(0.01)
        other.sendall(b'{"execute": "query-status", "id": 1}\n')
        assert answer(f, 1) == {"return": {"status": "save-vm", "singlestep": False, "running": False}, "id": 1}
        assert save.is_alive() and server._inflight >= 12  # still held, the stops still waiting
        other.sendall(b'{"execute": "quit", "id": 2}\n')
        assert answer(f, 2) == {"return": {}, "id": 2}
        assert save.is_alive() and m.state == RunState.SHUTDOWN
        release.set()
        save.join(60)
        for _, wf in waiting:  # each waiting stop ends once the save lets go: answered, or hung up by the quit
            while (line := wf.readline()) and json.loads(line).get("id") != "w":
                pass
    finally:
        release.set()
        save.join(60)
        for s, wf in [*waiting, (other, f)]:
            wf.close()
            s.close()
        server.close()
