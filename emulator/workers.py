"""Warm worker threads for short-lived background work (jobs, page freeing, savers).

Starting a thread costs a clone and a fresh stack; on some hosts (VMs whose guest memory is
backed lazily) that is 0.5-5 ms, which would land in a snapshot's critical path.  Work given
to :func:`spawn` runs on an idle daemon worker if there is one, else on a new one that stays
around for the next call (QEMU's thread pool, util/thread-pool.c, in spirit).  Workers are
daemons: a process never waits for them at exit.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

_IDLE_S = 60.0  # an idle worker exits after this long


def _nothing() -> None:
    pass


class _Task:
    __slots__ = ("fn", "args", "done")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()


class Pool:
    """An unbounded pool of daemon threads that are reused while idle."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._q: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._count = 0

    def spawn(self, fn: Callable[..., Any], *args: Any) -> threading.Event:
        """Run ``fn(*args)`` in the background; the returned event is set when it has returned.
        Exceptions are the callee's business (wrap ``fn`` to keep them)."""
        task = _Task(fn, args)
        with self._lock:
            if self._idle > 0:
                self._idle -= 1  # this task is that worker's
                start = False
            else:
                self._count += 1
                start = True
        if start:
            # Started before the task is queued: if the thread cannot start (RuntimeError:
            # "can't start new thread"), nothing was promised and the count is given back.
            try:
                threading.Thread(target=self._work, name=f"{self.name}-{self._count}", daemon=True).start()
            except BaseException:
                with self._lock:
                    self._count -= 1
                raise
        self._q.put(task)
        return task.done

    def _work(self) -> None:
        while True:
            try:
                task = self._q.get(timeout=_IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody has counted on this worker: leave
                        self._idle -= 1
                        self._count -= 1
                        return
                continue  # a task was promised to us: it is on its way
            try:
                task.fn(*task.args)
            except BaseException:  # noqa: BLE001 - the callee reports its own errors
                pass
            finally:
                # An idle worker keeps nothing of its last task alive (the callee's bound
                # method, its arguments: a whole machine for a snapshot job).
                task.fn, task.args = _nothing, ()
                with self._lock:
                    self._idle += 1  # idle before the caller hears it is done: its next task reuses us
                task.done.set()
                del task


_POOL = Pool("snaplab-worker")


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads: start from an empty pool."""
    global _POOL
    _POOL = Pool("snaplab-worker")


os.register_at_fork(after_in_child=_after_fork_in_child)


def spawn(fn: Callable[..., Any], *args: Any) -> threading.Event:
    """Run ``fn(*args)`` on a warm daemon worker; returns an event set when it is done."""
    return _POOL.spawn(fn, *args)


def prestart(n: int) -> None:
    """Have ``n`` idle workers ready (outside any critical path)."""
    events = [spawn(lambda: None) for _ in range(n)]
    for e in events:
        e.wait()
