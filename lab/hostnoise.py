"""The host's own speed over a few seconds, measured without snaplab: a control for every
figure that compares a guest's progress rate before and after an operation.

A guest of the lab's workloads writes pages at random over its working set, so its rate is
bound by the host's memory and shared cache, not by its core.  On a cloud host those are
shared with other tenants: on the Intel Xeon KVM guest this project measures on (300 MiB of
L3 shared with the rest of the machine), a 60-line C loop writing at random into 64 MiB
changed speed by up to 2.5x within seconds, while the same loop over a buffer that fits its
core's L2 stayed within 3%.  Nothing snaplab does can cause that; a time-to-90%-of-speed
measured on such a host can be late because the host slowed.  :func:`host_noise` measures
the spread before an experiment so the reader can see it beside the results.

Two probes, each run alone on the calling thread: ``core`` (a buffer that fits a core's L2:
its spread is the CPU's) and ``cache`` (a buffer the size of the guest's working set: its
spread is the shared cache's and memory's).  Each times batches of random read-modify-writes
(numpy gathers and scatters, one bulk operation per batch) and reports the rate in 20 ms
windows, as lab/restore.py windows the guest's progress.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

WINDOW_S = 0.02  # the same windows as the guest's progress (lab/restore.py WINDOW_NS)
BATCH = 1 << 15  # random updates per timed step: ~0.3 ms, well inside a window


def spread(rates: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles, min, max of per-window rates, and ``below90``: the
    fraction of windows under 90% of the median (how often a steady process would look
    slowed by a tenth or more)."""
    r = np.asarray(rates, dtype=np.float64)
    if not len(r):
        raise ValueError("spread: no windows")
    med = float(np.median(r))
    return {"median": med, "p10": float(np.percentile(r, 10)), "p90": float(np.percentile(r, 90)),
            "min": float(r.min()), "max": float(r.max()), "below90": float(np.mean(r < 0.9 * med)),
            "windows": int(len(r))}


def probe(seconds: float, buf_mib: float, seed: int = 0) -> dict[str, Any]:
    """Random 8-byte read-modify-writes over ``buf_mib`` MiB for ``seconds``: the rate in
    million updates per second, per WINDOW_S window (raw, rounded), and its :func:`spread`."""
    if seconds <= 0 or buf_mib <= 0:
        raise ValueError(f"probe: seconds ({seconds}) and buf_mib ({buf_mib}) must be positive")
    rng = np.random.default_rng(seed)
    buf = np.zeros(max(int(buf_mib * (1 << 20)) // 8, 1), dtype=np.int64)
    idx = [rng.integers(0, len(buf), BATCH) for _ in range(8)]
    buf[idx[0]] += 1  # first touch outside the timing
    rates: list[float] = []
    end = time.perf_counter() + seconds
    w0 = time.perf_counter()
    done = i = 0
    while True:
        buf[idx[i & 7]] += 1
        done += BATCH
        i += 1
        t = time.perf_counter()
        if t - w0 >= WINDOW_S:
            rates.append(done / (t - w0) / 1e6)
            done, w0 = 0, t
            if t >= end:
                break
    return {"buf_mib": buf_mib, "seconds": seconds, "window_s": WINDOW_S,
            "rates_mups": [round(x, 2) for x in rates]} | spread(rates)


def host_noise(seconds: float = 4.0, cache_mib: float = 64.0) -> dict[str, dict[str, Any]]:
    """Both probes, one after the other (``core``: 256 KiB; ``cache``: ``cache_mib``)."""
    return {"core": probe(seconds / 2, 0.25), "cache": probe(seconds / 2, cache_mib, seed=1)}


def describe(noise: dict[str, dict[str, Any]]) -> str:
    """One line for a log: each probe's median and 10-90% range, and its below-90% share."""
    return "; ".join(f"{k} ({v['buf_mib']:g} MiB): median {v['median']:.1f} M/s, 10-90% {v['p10']:.1f}-"
                     f"{v['p90']:.1f}, {100 * v['below90']:.0f}% of {WINDOW_S * 1e3:.0f} ms windows under 90% "
                     f"of the median" for k, v in noise.items())
