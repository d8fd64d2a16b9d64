"""Load policies: on demand, background fill, working-set prefetch, and the loading set they
record and use (emulator/migration/engines/load_*.py, loading_set.py)."""

from __future__ import annotations

import ctypes
import hashlib
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from emulator.errors import QMPError
from emulator.guest import DATA_BASE, WorkloadSpec
from emulator.machine import MACHINE_NAME
from emulator.migration import engines as registry
from emulator.migration import postcopy
from emulator.migration.loading_set import (
    LSET_CHUNK,
    SOURCE_COW_WINDOW,
    WINDOW_S,
    LoadingSet,
    empty_trailer,
    parse_trailer,
)
from emulator.migration.postcopy import LazyLoad, set_groups
from emulator.migration.vmstate import PAGE, parse_state
from emulator.migration.vmstate_io import VMStateStream
from emulator.qmp.client import QMPEvent
from tests.migration.conftest import Factory, wait_until

RAM = 64 << 20
WS_OFFSET = 40 << 20  # the working set: 4 MiB at 0x200000 + 40 MiB, chunks 21..22
ARGS = {"vmstate": "disk0", "devices": ["disk0"]}


def _spec() -> WorkloadSpec:
    return WorkloadSpec("dirty", seed=3, working_set=4 << 20, pattern="random", batch_pages=64, ws_offset=WS_OFFSET)


def _ram_digest(m) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256(m.ram.read(0, RAM)).hexdigest()


def _save(q, tag: str = "t") -> None:  # type: ignore[no-untyped-def]
    q.execute("snapshot-save", {"job-id": f"s-{tag}", "tag": tag, **ARGS})
    assert "error" not in q.wait_job(f"s-{tag}", 60)


def _load(q, job: str, engine: str, complete: bool = True) -> dict:  # type: ignore[no-untyped-def,type-arg]
    q.execute("snapshot-load", {"job-id": job, "tag": "t", **ARGS, "__org.snaplab_engine": engine})
    info = q.wait_job(job, 120, complete=complete)
    assert "error" not in info, info
    return dict(q.execute("__org.snaplab_query-snapshot-stats", {"id": job}))


def _parsed(m, size: int | None = None):  # type: ignore[no-untyped-def]
    """The parsed VM state of snapshot 't' on disk0 (read up to ``size`` bytes, default all)."""
    img = m.disk_nodes[0].format_image
    sn = img.find_snapshot("t")
    return parse_state(VMStateStream(img, sn.id_str), sn.vm_state_size if size is None else size,
                       MACHINE_NAME, m.savevm_handlers())


def _qemu_img_check(path: Path) -> None:
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_schema_lists_every_policy_and_the_old_name(make_vm: Factory) -> None:
    assert [e.name for e in registry.LOAD_ENGINES][:1] == ["blocking"]
    assert {"ondemand", "background", "prefetch"} <= set(registry.load_engine_names())
    assert "lazy" in registry.load_engine_values() and registry.load_engine("lazy").name == "background"
    q = make_vm(start=False).qmp()
    schema = {t["name"]: t for t in q.execute("query-qmp-schema")}
    cmd = next(t for t in schema.values() if t["meta-type"] == "command" and t["name"] == "snapshot-load")
    member = next(mb for mb in schema[cmd["arg-type"]]["members"] if mb["name"] == "__org.snaplab_engine")
    assert schema[member["type"]]["values"] == ["blocking", "ondemand", "background", "prefetch", "lazy"]


@pytest.mark.parametrize("engine", registry.load_engine_names())
def test_every_policy_restores_the_snapshot_bit_for_bit(make_vm: Factory, engine: str) -> None:
    m = make_vm(workload=_spec(), ram=RAM)
    q = m.qmp()
    wait_until(lambda: m.lab.last.iterations > 50_000, "the guest to dirty its working set")
    q.execute("stop")
    saved = _ram_digest(m)
    _save(q)
    q.execute("cont")
    wait_until(lambda: _ram_digest(m) != saved, "the guest to change RAM")
    q.execute("stop")  # a stopped guest stays stopped: RAM is the snapshot's once the job is over
    stats = _load(q, "l", engine)
    assert q.execute("query-status")["status"] == "paused"
    assert _ram_digest(m) == saved
    assert stats["engine"] == f"{engine}-load" and stats["resident-s"] >= 0
    assert 0 < stats["bytes-read"] <= RAM


def test_an_on_demand_load_is_ready_until_job_complete_and_refuses_other_operations(make_vm: Factory) -> None:
    m = make_vm(workload=_spec(), ram=RAM)
    q = m.qmp()
    wait_until(lambda: m.lab.last.iterations > 20_000, "the guest to run")
    _save(q)
    q.events()
    q.execute("snapshot-load", {"job-id": "od", "tag": "t", **ARGS, "__org.snaplab_engine": "ondemand"})
    q.wait_event("JOB_STATUS_CHANGE", 60, {"id": "od", "status": "ready"})
    assert [j["status"] for j in q.execute("query-jobs") if j["id"] == "od"] == ["ready"]
    before = m.lab.last.iterations
    wait_until(lambda: m.lab.last.iterations > before + 10_000, "the guest to run on faulted-in chunks")
    q.execute("snapshot-save", {"job-id": "s2", "tag": "t2", **ARGS})
    info = q.wait_job("s2", 60)
    assert info["error"].startswith("Another snapshot operation is in progress (snapshot load (ondemand))")
    q.execute("job-complete", {"id": "od"})
    assert "error" not in q.wait_job("od", 120)
    stats = q.execute("__org.snaplab_query-snapshot-stats", {"id": "od"})
    assert stats["faults"] > 0 and stats["fault-chunks"] > 0
    assert stats["fault-chunks"] + stats["bg-chunks"] == RAM // LSET_CHUNK
    with pytest.raises(QMPError, match="cannot accept command verb 'complete'"):
        q.execute("job-complete", {"id": "od"})


def test_a_lazy_loads_events_go_out_after_its_resume_in_order_and_stamped_when_raised(make_vm: Factory) -> None:
    """A lazy snapshot-load's JOB_STATUS_CHANGE created/running are held until the command's
    first step (up to RESUME) is done: no connection's thread is woken on the way to RESUME.
    Every client still sees QEMU's order, each event stamped with the time it was raised and
    before the command's reply; a blocking load's go out at once, and a refused lazy load's
    events still go out."""
    import time

    m = make_vm(workload=_spec(), ram=RAM)
    q = m.qmp()
    wait_until(lambda: m.lab.last.iterations > 20_000, "the guest to run")
    _save(q)
    got: list[tuple[str, str, float, float]] = []  # name, job status, stamped, delivered (s)

    def listen(name: str, data: dict | None, sec: int, usec: int) -> None:  # type: ignore[type-arg]
        got.append((name, (data or {}).get("status", ""), sec + usec / 1e6, time.time()))

    m.monitor.subscribe(listen)
    try:
        for engine in ("background", "blocking"):
            got.clear()
            reply_at: list[float] = []
            q.execute("snapshot-load", {"job-id": engine, "tag": "t", **ARGS, "__org.snaplab_engine": engine})
            reply_at.append(time.time())
            assert "error" not in q.wait_job(engine, 120)
            seq = [(n, st) for n, st, _, _ in got]
            assert seq[:2] == [("JOB_STATUS_CHANGE", "created"), ("JOB_STATUS_CHANGE", "running")], seq
            assert ("STOP", "") in seq and ("RESUME", "") in seq and seq.index(("STOP", "")) < seq.index(("RESUME", ""))
            stamps = [ts for _, _, ts, _ in got]
            assert stamps == sorted(stamps)
            resume_ts = got[seq.index(("RESUME", ""))][2]
            created_delivered = got[0][3]
            if engine == "background":
                assert created_delivered >= resume_ts, "created went out before the load resumed the guest"
                assert got[seq.index(("RESUME", ""))][3] <= reply_at[0]
            else:  # the blocking load runs on a worker: its job's first events go out at once
                assert created_delivered < resume_ts
            q.execute("job-dismiss", {"id": engine})
        got.clear()
        q.execute("snapshot-load", {"job-id": "bad", "tag": "nosuch", **ARGS, "__org.snaplab_engine": "background"})
        assert "error" in q.wait_job("bad", 60)
        # (its failure is concluded on a worker thread: held too, so it cannot overtake them)
        assert [st for n, st, _, _ in got if n == "JOB_STATUS_CHANGE"] == ["created", "running", "aborting", "concluded"]
        assert q.execute("query-status")["status"] == "running"
    finally:
        m.monitor.unsubscribe(listen)


def test_lazy_loads_of_a_halting_guest_race_stop_cont_and_reset_without_a_hang(make_vm: Factory) -> None:
    """A paced guest sleeps between batches, so a lazy load's downtime runs on the job's thread
    with the vCPU held out (RunControl.with_vcpu_out), not on the vCPU thread.  Loads of every
    lazy policy, while another monitor sends stop, cont and system_reset as fast as it can:
    every load concludes (or fails with QEMU's words), the monitor stays answering, every
    verb returns, and a blocking load of the stopped guest afterwards gives the snapshot's RAM
    bit for bit."""
    spec = WorkloadSpec("dirty", seed=3, working_set=4 << 20, rate=2 << 20, pattern="random",
                        batch_pages=16, ws_offset=WS_OFFSET)
    m = make_vm(workload=spec, ram=RAM)
    q, other = m.qmp(), m.qmp()
    wait_until(lambda: m.lab.last.iterations > 2_000, "the guest to run")
    q.execute("stop")
    saved = _ram_digest(m)
    _save(q)
    q.execute("cont")
    vm_stop = m.vm_stop  # the loads' own stop (a monitor's stop goes through RunControl.stop)
    here = 0

    def counted(*a):  # type: ignore[no-untyped-def]
        nonlocal here
        here += threading.current_thread().name != "vcpu"
        return vm_stop(*a)

    m.vm_stop = counted  # type: ignore[method-assign]
    stop = threading.Event()
    verbs = 0
    failures: list[str] = []

    def harass() -> None:
        nonlocal verbs
        cycle = ("stop", "cont", "query-status", "cont", "system_reset", "cont")
        while not stop.is_set():
            try:
                other.execute(cycle[verbs % len(cycle)])
            except QMPError as err:  # (cont after a reset the guest needs: QEMU's refusals only)
                if "Resetting the Virtual Machine is required" not in str(err):
                    failures.append(str(err))
            verbs += 1

    t = threading.Thread(target=harass, daemon=True)
    t.start()
    try:
        policies = [e for e in registry.load_engine_names() if e != "blocking"]
        for i in range(12):
            job = f"l{i}"
            q.execute("snapshot-load", {"job-id": job, "tag": "t", **ARGS, "__org.snaplab_engine": policies[i % len(policies)]})
            info = q.wait_job(job, 120, complete=True)
            assert "error" not in info or "internal error" not in info["error"], info
            q.execute("job-dismiss", {"id": job})
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive() and not failures and verbs > 12, (verbs, failures)
    assert here >= 1  # at least one downtime ran with the vCPU held out, off its thread
    q.execute("stop")
    _load(q, "final", "blocking")
    assert _ram_digest(m) == saved


def test_quit_during_an_on_demand_load_does_not_hang(make_vm: Factory) -> None:
    m = make_vm(workload=_spec(), ram=RAM)
    q = m.qmp()
    wait_until(lambda: m.lab.last.iterations > 20_000, "the guest to run")
    _save(q)
    q.execute("snapshot-load", {"job-id": "od", "tag": "t", **ARGS, "__org.snaplab_engine": "ondemand"})
    q.wait_event("JOB_STATUS_CHANGE", 60, {"id": "od", "status": "ready"})
    closer = threading.Thread(target=m.close)
    closer.start()
    closer.join(120)
    assert not closer.is_alive(), "close() hung during an on-demand load"


def test_the_first_load_records_a_loading_set_the_next_prefetch_uses(make_vm: Factory, tmp_path: Path) -> None:
    m = make_vm(workload=_spec(), ram=RAM)
    q = m.qmp()
    wait_until(lambda: m.lab.last.iterations > 50_000, "the guest to dirty its working set")
    _save(q)
    first = _parsed(m)
    assert first.loading_set is not None and not first.loading_set.recorded

    rec = _load(q, "rec", "prefetch")  # no set yet: faults only for a while, recorded, then filled
    assert rec["recorded-chunks"] > 0 and rec["prefetched-chunks"] == 0
    stored = _parsed(m)
    lset = stored.loading_set
    assert lset is not None and len(lset.chunks) == rec["recorded-chunks"]
    ws_chunks = set(range((DATA_BASE + WS_OFFSET) // LSET_CHUNK, (DATA_BASE + WS_OFFSET + (4 << 20)) // LSET_CHUNK))
    assert ws_chunks <= set(lset.chunks.tolist())  # the working set was touched, so it was recorded
    assert len(set(lset.chunks.tolist())) == len(lset.chunks)

    again = _load(q, "pf", "prefetch")
    assert again["loading-set-chunks"] == len(lset.chunks) and again["recorded-chunks"] == 0
    assert again["loading-set"] == rec["recorded-set"] == lset.chunks.tolist()
    assert again["prefetched-chunks"] + again["fault-chunks"] >= len(ws_chunks)
    # the memory map: every chunk came in once, the set's by its readers or a fault, the others
    # by a fault or the rest fill; the set's readers started right after RESUME, before it was in
    log = again["fill-log"]
    assert sorted(c for _, c, _, _ in log) == list(range(again["chunks"]))
    by = {c: who for _, c, who, _ in log}
    assert {by[c] for c in lset.chunks.tolist()} <= {0, 1} and {by[c] for c in set(by) - set(lset.chunks.tolist())} <= {0, 2}
    assert all(c in set(again["fault-chunk"]) for c, w in by.items() if w == 0)  # a chunk a fault read had a fault
    assert again["prefetched-chunks"] == sum(w == 1 for w in by.values())
    assert 0 <= again["prefetch-start-s"] <= again["prefetch-s"]
    assert len(again["fault-at-s"]) == len(again["fault-chunk"]) == again["faults"]
    q.execute("stop")  # a stopped guest stays stopped: RAM is the snapshot's once a load is over
    _load(q, "ref", "blocking")
    want = _ram_digest(m)
    # Garbage over the zero pages of every chunk that also holds data: the load must clear
    # them, whichever buffer or recycled page it reads such a chunk into.
    pages = np.frombuffer(m.ram.read(0, RAM), dtype=np.uint8).reshape(-1, PAGE).any(axis=1)
    per = LSET_CHUNK // PAGE
    mixed = [c for c in range(RAM // LSET_CHUNK) if 0 < pages[c * per:(c + 1) * per].sum() < per]
    assert mixed
    for c in mixed:
        m.ram.fill(int(np.flatnonzero(~pages[c * per:(c + 1) * per])[0] + c * per) * PAGE, 0xA5, PAGE)
    stopped = _load(q, "pf2", "prefetch")  # the set read ahead, bit for bit
    assert stopped["prefetched-chunks"] >= len(ws_chunks)
    assert _ram_digest(m) == want
    q.execute("quit")
    m.close()
    _qemu_img_check(tmp_path / "w" / "disk0.qcow2")
    r = subprocess.run(["qemu-img", "snapshot", "-l", str(tmp_path / "w" / "disk0.qcow2")],
                       capture_output=True, text=True, check=True)
    assert " t " in r.stdout


def test_a_copy_on_write_save_records_its_window_as_the_loading_set(make_vm: Factory, tmp_path: Path) -> None:
    """The chunks the guest wrote first during a copy-on-write save's window are the
    snapshot's loading set (source 2): its first prefetch load prefetches them, records
    nothing, and restores the snapshot bit for bit."""
    m = make_vm(workload=_spec(), ram=RAM)
    q = m.qmp()
    wait_until(lambda: m.lab.last.iterations > 50_000, "the guest to dirty its working set")
    ws_chunks = set(range((DATA_BASE + WS_OFFSET) // LSET_CHUNK, (DATA_BASE + WS_OFFSET + (4 << 20)) // LSET_CHUNK))
    # A save the guest wrote nothing during (a busy host) records no set, and one during which
    # it wrote only its lab page (chunk 0: a window that ended mid-batch) no working-set chunk:
    # both are taken again.
    for attempt in range(20):
        q.execute("snapshot-save", {"job-id": f"s{attempt}", "tag": "t", **ARGS, "__org.snaplab_engine": "cow"})
        assert "error" not in q.wait_job(f"s{attempt}", 60)
        saved = q.execute("__org.snaplab_query-snapshot-stats", {"id": f"s{attempt}"})
        if saved["faults"] > 0 and (got := _parsed(m).loading_set) is not None and ws_chunks & set(got.chunks.tolist()):
            break
        q.execute("snapshot-delete", {"job-id": f"d{attempt}", "tag": "t", "devices": ARGS["devices"]})
        assert "error" not in q.wait_job(f"d{attempt}", 60)
    assert saved["faults"] > 0, "the guest wrote nothing during 20 copy-on-write saves"
    lset = _parsed(m).loading_set
    assert lset is not None and lset.source == SOURCE_COW_WINDOW and lset.window_ms == WINDOW_S * 1000
    chunks = lset.chunks.tolist()
    assert ws_chunks & set(chunks), chunks  # the guest writes its working set: some chunk of it faulted first
    assert len(set(chunks)) == len(chunks) <= saved["faults"]  # written chunks only, once each
    q.execute("stop")  # a stopped guest stays stopped: RAM is the snapshot's once a load is over
    _load(q, "ref", "blocking")
    want = _ram_digest(m)
    pf = _load(q, "pf", "prefetch")
    assert pf["loading-set"] == chunks and pf["recorded-chunks"] == 0
    assert pf["prefetched-chunks"] >= 1
    assert _ram_digest(m) == want
    q.execute("quit")
    m.close()
    _qemu_img_check(tmp_path / "w" / "disk0.qcow2")


def test_a_loading_set_lies_past_eof_so_a_reader_that_stops_there_sees_none() -> None:
    trailer = empty_trailer(RAM)
    assert parse_trailer(b"", 0, RAM) is None
    empty = parse_trailer(trailer, 100, RAM)
    assert empty is not None and not empty.recorded and empty.capacity == RAM // LSET_CHUNK
    full = LoadingSet(100, empty.capacity, np.array([5, 2, 9], dtype=np.uint32), 1, 500).encode()
    got = parse_trailer(full, 100, RAM)
    assert got is not None and got.chunks.tolist() == [5, 2, 9] and got.window_ms == 500
    damaged = bytearray(full)
    damaged[0] ^= 0xFF
    assert parse_trailer(bytes(damaged), 100, RAM) is None  # a damaged trailer is absent, never an error
    out_of_range = LoadingSet(100, empty.capacity, np.array([empty.capacity], dtype=np.uint32)).encode()
    assert parse_trailer(out_of_range, 100, RAM) is None
    assert parse_trailer(full, 100, RAM * 2) is None  # made for another RAM size


def test_a_vm_state_read_up_to_eof_has_no_loading_set(make_vm: Factory) -> None:
    """What an older snaplab reads (it stops at EOF): the same state, no loading set."""
    m = make_vm(workload=_spec(), ram=RAM)
    q = m.qmp()
    wait_until(lambda: m.lab.last.iterations > 20_000, "the guest to run")
    _save(q)
    parsed = _parsed(m)
    assert parsed.loading_set is not None
    eof = parsed.loading_set.pos
    cut = _parsed(m, eof)
    assert cut.loading_set is None and cut.layout is not None and parsed.layout is not None
    assert cut.layout.data_offset == parsed.layout.data_offset and (cut.layout.bits == parsed.layout.bits).all()
    assert [(h.idstr, p) for h, p, _ in cut.pending] == [(h.idstr, p) for h, p, _ in parsed.pending]


def test_prefetch_paces_the_rest_and_quit_ends_the_pacing(make_vm: Factory) -> None:
    """After the loading set, prefetch's filler pauses between chunks (background's never does);
    closing the machine during the paced fill fills the rest at once: no hang."""
    m = make_vm(workload=_spec(), ram=RAM)
    q = m.qmp()
    wait_until(lambda: m.lab.last.iterations > 50_000, "the guest to dirty its working set")
    _save(q)
    _load(q, "rec", "prefetch")  # records the loading set
    paced = _load(q, "pf", "prefetch")
    assert paced["paced-s"] > 0 and paced["bg-chunks"] > 0
    assert _load(q, "bg", "background")["paced-s"] == 0
    q.execute("snapshot-load", {"job-id": "pf2", "tag": "t", **ARGS, "__org.snaplab_engine": "prefetch"})
    q.wait_event("RESUME", 60)
    closer = threading.Thread(target=m.close)
    closer.start()
    closer.join(120)
    assert not closer.is_alive(), "close() hung during a paced prefetch fill"


def test_a_chunk_that_was_all_zero_faults_once_during_an_on_demand_load(make_vm: Factory) -> None:
    """A lazy load reads nothing for a chunk that held only zeros at the save and installs
    nothing for it until the guest touches it; then the whole chunk gets the zero page at once,
    so the guest's writes to its other pages do not fault one by one.  Here the guest writes its
    working set in page order and the snapshot is taken (by instruction count, not by time)
    when it has written only the first pages of it: after the load it writes into chunks that
    were all zero."""
    spec = WorkloadSpec("dirty", seed=3, working_set=16 << 20, pattern="sequential", batch_pages=64,
                        ws_offset=WS_OFFSET)
    m = make_vm(workload=spec, ram=RAM, start=False)
    first, last = DATA_BASE + WS_OFFSET, DATA_BASE + WS_OFFSET + (16 << 20) - PAGE
    while m.ram.read_u64(first) == 0:
        assert m.run_instructions(20_000) is None
    m.snapshots.save_snapshot("t", False, "disk0", ["disk0"])
    ws_chunks = range(first // LSET_CHUNK, (last + PAGE) // LSET_CHUNK)
    img_zero = [c for c in ws_chunks if not any(m.ram.read(c * LSET_CHUNK, LSET_CHUNK))]
    assert len(img_zero) >= 4  # the point of the test: most of the working set was all zero
    q = m.qmp()
    q.execute("cont")
    q.events()
    q.execute("snapshot-load", {"job-id": "od", "tag": "t", **ARGS, "__org.snaplab_engine": "ondemand"})
    q.wait_event("JOB_STATUS_CHANGE", 60, {"id": "od", "status": "ready"})
    # from the snapshot's instant on, the guest writes on in page order to the working set's end
    # (a host read through ctypes: it may fault too, served like the guest's)
    wait_until(lambda: m.ram.read_u64(last) != 0, "the guest to write its working set's last page")
    q.execute("job-complete", {"id": "od"})
    assert "error" not in q.wait_job("od", 120)
    stats = q.execute("__org.snaplab_query-snapshot-stats", {"id": "od"})
    assert stats["zero-chunks"] >= len(img_zero)
    # one fault per chunk touched, plus a few for the guest's code, stack and lab page: not one
    # per page written (one per page would be thousands here)
    assert stats["faults"] <= RAM // LSET_CHUNK + 8, stats["faults"]


def test_a_loading_sets_neighbours_are_grouped_in_its_order_and_only_when_side_by_side_in_the_file() -> None:
    """set_groups: a group starts at each set chunk not yet grouped, in the set's order, and
    takes the set's chunks around it in its aligned block while they are not grouped yet, have
    every page non-zero and follow each other in the file; blocks shrink for a small set."""
    per = LSET_CHUNK // PAGE

    def dense(first_byte: int) -> np.ndarray:  # a chunk whose pages lie side by side from there
        return first_byte + np.arange(per, dtype=np.int64) * PAGE

    base = 1 << 30
    hosts = {c: dense(base + c * LSET_CHUNK) for c in range(10, 20)}  # 10..19: one run in the file
    hosts[13][5] = 0  # a zero page: chunk 13 is read alone
    hosts[16] = dense(base + 99 * LSET_CHUNK)  # elsewhere in the file: not read with 17
    hosts[30] = dense(base + 30 * LSET_CHUNK)[: per // 2]  # RAM's last chunk, short
    hosts[31] = dense(base + 31 * LSET_CHUNK)
    order = [17, 11, 10, 12, 13, 14, 15, 16, 18, 19, 30, 31]
    groups = set_groups(order, hosts, group=4, readers=1)  # blocks 8-11, 12-15, 16-19, 28-31
    assert groups == [[17, 18, 19], [10, 11], [12], [13], [14, 15], [16], [30], [31]]
    assert sorted(c for g in groups for c in g) == sorted(order)  # each chunk once
    down = {c: dense(base + c * LSET_CHUNK) for c in range(20, 25)}  # a guest going down through RAM
    assert set_groups([24, 23, 22, 21, 20], down, group=4, readers=1) == [[24], [20, 21, 22, 23]]
    assert set_groups(order, hosts, group=1, readers=1) == [[c] for c in order]
    # a set too small for a group of that size per reader gets smaller blocks, of at least 2
    run = {c: dense(base + c * LSET_CHUNK) for c in range(64, 96)}  # 32 chunks, one run
    for readers, size in ((2, 8), (4, 8), (8, 4), (16, 2), (64, 2)):
        got = set_groups(list(run), run, group=8, readers=readers)
        assert got == [list(range(b, b + size)) for b in range(64, 96, size)], readers


@pytest.mark.parametrize("cut", [False, True])
def test_prefetch_reads_neighbouring_set_chunks_together_bit_for_bit(make_vm: Factory, monkeypatch: pytest.MonkeyPatch,
                                                                      cut: bool) -> None:
    """A working set of four chunks, all pages written: the prefetch load reads its chunks in
    groups (``grouped-chunks``) and restores RAM bit for bit; also when a fault has taken a
    group's second chunk first (``cut``: the group is cut there and the rest read one by one)."""
    spec = WorkloadSpec("dirty", seed=3, working_set=8 << 20, pattern="random", batch_pages=64, ws_offset=WS_OFFSET)
    m = make_vm(workload=spec, ram=RAM)
    q = m.qmp()
    wait_until(lambda: m.lab.last.iterations > 100_000, "the guest to dirty its working set")
    _save(q)
    _load(q, "rec", "prefetch")  # records the loading set
    cuts: list[list[int]] = []
    if cut:
        original = postcopy._fill_group

        def taken_first(lazy: LazyLoad, group: list[int], hosts: dict[int, np.ndarray], buf: ctypes.Array[ctypes.c_char]) -> list[int]:
            if len(group) > 1:  # (a group of one is an ordinary fill)
                assert lazy._fill(group[1], buf, hosts[group[1]])  # as a fault would, before the group's read
                cuts.append(group)
            return original(lazy, group, hosts, buf)

        monkeypatch.setattr(postcopy, "_fill_group", taken_first)
    q.execute("stop")
    _load(q, "ref", "blocking")
    want = _ram_digest(m)
    pf = _load(q, "pf", "prefetch")
    ws = set(range((DATA_BASE + WS_OFFSET) // LSET_CHUNK, (DATA_BASE + WS_OFFSET + (8 << 20)) // LSET_CHUNK))
    assert ws <= set(pf["loading-set"])
    assert _ram_digest(m) == want
    if cut:
        assert cuts and pf["grouped-chunks"] == 0  # every group lost its second chunk: none read together
        assert pf["prefetched-chunks"] == len(set(pf["loading-set"])) - len(cuts)
    else:
        assert pf["grouped-chunks"] >= 2 and pf["prefetched-chunks"] == len(set(pf["loading-set"]))
    q.execute("quit")


def test_job_complete_after_an_on_demand_load_finished_by_itself_is_not_an_error(make_vm: Factory) -> None:
    """An on-demand load concludes by itself once every chunk was touched; a client that saw
    READY and sends ``job-complete`` just after (the dashboard's race) is refused by the job,
    in QEMU's words, and QMPClient.wait_job(complete=True) takes that as done, not as an error."""
    m = make_vm(workload=_spec(), ram=RAM)
    q = m.qmp()
    wait_until(lambda: m.lab.last.iterations > 20_000, "the guest to run")
    _save(q)
    q.execute("stop")
    q.events()
    q.execute("snapshot-load", {"job-id": "od", "tag": "t", **ARGS, "__org.snaplab_engine": "ondemand"})
    q.wait_event("JOB_STATUS_CHANGE", 60, {"id": "od", "status": "ready"})
    m.ram.read(0, RAM)  # the host touches every chunk: each is read in, and the job is done
    wait_until(lambda: any(j["id"] == "od" and j["status"] == "concluded" for j in q.execute("query-jobs")),
               "the load to conclude by itself")
    with pytest.raises(QMPError, match="in state 'concluded' cannot accept command verb 'complete'"):
        q.execute("job-complete", {"id": "od"})
    q.events()
    # READY seen, CONCLUDED not yet: the moment the race hits
    with q._cond:
        q._events.append(QMPEvent("JOB_STATUS_CHANGE", {"id": "od", "status": "ready"}, time.time()))
    sent: list[str] = []
    execute = q.execute
    q.execute = lambda cmd, args=None: (sent.append(cmd), execute(cmd, args))[1]  # type: ignore[method-assign]
    q._complete_when_ready("od", 30)  # refused by the job, taken as done
    assert sent[0] == "job-complete"  # it sent the command (did not wait for a READY to come)
    assert q.execute("query-status")["status"] == "paused"
