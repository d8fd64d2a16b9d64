"""How long does warmed host memory stay warm?  (docs/reproduction.md, "Warm memory")

    python bench/warm_decay.py [--mib 512] [--waits 0,0.5,1,2,4,8,16]

On a VM whose kernel reports freed memory back to its hypervisor (free page reporting), memory
touched and freed is cold again (each first touch a hypervisor fault) a few seconds later.  For
each wait: touch and free ``--mib`` MiB, sleep the wait, then time touching ``--mib`` MiB again;
the first line is a cold touch (after the longest wait), for scale.  Not a timed test: the
reproduction's warm-up decision (lab.reproduce.ReproSpec.warm_bytes) rests on what it prints.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lab.reproduce import reported_free_kib


def touch(nbytes: int) -> float:
    """Seconds to allocate, write and free ``nbytes`` (numpy fills every page)."""
    t0 = time.perf_counter()
    a = np.ones(nbytes, dtype=np.uint8)
    del a
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512, help="MiB touched each time")
    ap.add_argument("--waits", default="0,0.5,1,2,4,8,16", help="seconds between the warm and the touch timed")
    a = ap.parse_args()
    if a.mib <= 0:
        ap.error(f"--mib: {a.mib} is not allowed; expected a positive size in MiB")
    try:
        waits = [float(w) for w in a.waits.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--waits: {a.waits!r} is not a list of seconds")
    if not waits or min(waits) < 0:
        ap.error(f"--waits: {a.waits!r}: expected seconds >= 0")
    n = a.mib << 20
    print(f"free page reporting: {reported_free_kib()} KiB reported so far (0: the kernel does not say)")
    time.sleep(max(waits))
    cold = touch(n)
    print(f"cold touch of {a.mib} MiB: {cold:.3f} s ({cold / a.mib * 1024:.1f} s/GiB)")
    for w in waits:
        touch(n)  # warm
        time.sleep(w)
        t = touch(n)
        print(f"touched again {w:>5.1f} s after the warm: {t:.3f} s ({t / cold:.0%} of the cold touch)", flush=True)


if __name__ == "__main__":
    main()
