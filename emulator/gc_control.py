"""Keeping CPython's cyclic garbage collector out of snapshot downtimes and fault service.

A full collection walks every tracked object; with numpy, Unicorn and the lab's plotting
loaded that is ~40,000 objects and 13-19 ms on this workplace's VMs, during which the GIL is
held: a lazy load's command waits, and so does every guest fault the Python fault thread
serves.  Two tools:

* :func:`freeze_long_lived` (``gc.freeze()`` after one collection), once per process, just
  before the first machine object exists (``Machine.__new__``) and before any guest runs
  (that collection stalls nobody): what exists then (modules, classes, the lab's imports) is
  never walked again, so a later full collection only walks what came after.  Frozen objects
  are still freed by reference counting; only a reference cycle among them that becomes
  garbage later is kept, which is why the machine itself (all cycles) must not be frozen.
* :func:`gc_paused`: no collection inside the block (nested and thread-safe: collection is
  back on when the last block on any thread ends).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = False
_frozen = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection until the outermost block ends."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


def freeze_long_lived() -> None:
    """Collect once, then move every surviving object out of the collector's sight (once)."""
    global _frozen
    with _lock:
        if _frozen:
            return
        _frozen = True
    gc.collect()
    gc.freeze()
