"""The warm worker pool: tasks run, workers are reused, and a forked child starts afresh."""

from __future__ import annotations

import multiprocessing
import threading

from emulator import workers


def test_tasks_run_and_idle_workers_are_reused() -> None:
    workers.prestart(1)
    before = workers._POOL._count
    seen: list[str] = []
    for _ in range(20):
        assert workers.spawn(lambda: seen.append(threading.current_thread().name)).wait(5)
    assert len(seen) == 20 and all(n.startswith("snaplab-worker") for n in seen)
    assert workers._POOL._count == before  # sequential tasks never needed a new thread


def test_a_task_that_raises_does_not_kill_the_pool() -> None:
    def boom() -> None:
        raise RuntimeError("x")

    assert workers.spawn(boom).wait(5)
    box: list[int] = []
    assert workers.spawn(box.append, 7).wait(5) and box == [7]


def _child(q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    box: list[int] = []
    q.put(workers.spawn(box.append, 1).wait(5) and box == [1])


def test_a_forked_child_gets_working_workers() -> None:
    workers.prestart(2)  # the parent has idle workers; the child has none of those threads
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(20)
    assert p.exitcode == 0 and q.get(timeout=1) is True


def test_chunk_buffers_are_page_aligned_warm_and_reused() -> None:
    """Copy-on-write fault buffers: page-aligned (O_DIRECT takes them as they are), distinct,
    handed back and out again rather than made anew."""
    import ctypes

    from emulator.migration.cow import CHUNK, WARM_BUFFERS, fault_buffers

    before = WARM_BUFFERS.total
    bufs = WARM_BUFFERS.take_n(3)
    addrs = [ctypes.addressof(b) for b in bufs]
    assert all(a % 4096 == 0 for a in addrs) and len(set(addrs)) == 3
    assert all(ctypes.sizeof(b) == CHUNK for b in bufs)
    WARM_BUFFERS.give_back(bufs)
    total = WARM_BUFFERS.total
    assert total >= before
    again = WARM_BUFFERS.take_n(3)
    assert WARM_BUFFERS.total == total  # handed out again, none made
    WARM_BUFFERS.give_back(again)
    WARM_BUFFERS.reserve(total)
    assert WARM_BUFFERS.total == total  # reserve never shrinks nor makes more than asked
    assert fault_buffers(16 << 20) == 16 and fault_buffers(64 << 20) == 32  # small: all of RAM, never under 16
    assert fault_buffers(256 << 20) == 64 and fault_buffers(512 << 20) == 64  # at least 128 MiB
    assert fault_buffers(1 << 30) == 128 and fault_buffers(64 << 30) == 256  # a quarter, at most 512 MiB


def test_an_idle_worker_keeps_nothing_of_its_last_task() -> None:
    """A worker waiting for its next task (up to a minute) must not keep the last one's
    callable and arguments alive: for a snapshot job that is a whole machine."""
    import gc
    import weakref

    class Payload:
        def run(self, other: object) -> None:
            pass

    p, arg = Payload(), Payload()
    refs = [weakref.ref(p), weakref.ref(arg)]
    assert workers.spawn(p.run, arg).wait(5)
    del p, arg
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_a_thread_that_cannot_start_leaves_the_pool_as_it_was(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """When the host refuses a thread ("can't start new thread"), the caller hears it, no
    task is left queued for a worker that never came, and the pool still works afterwards."""
    pool = workers.Pool("t-refused")
    real_start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    ran: list[int] = []
    try:
        pool.spawn(ran.append, 1)
    except RuntimeError:
        pass
    else:
        raise AssertionError("a refused thread start was not reported")
    assert pool._count == 0 and pool._q.empty()
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert pool.spawn(ran.append, 2).wait(5)
    assert ran == [2] and pool._count == 1
