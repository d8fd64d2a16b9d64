"""Checks a notebook can show: the saved state is the instant the snapshot says it is."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from emulator.guest import expected_generations
from lab.session import default_machine
from lab.spec import DEFAULT_ENGINE, guest_runs


def stop_instant_proof(engine: str = DEFAULT_ENGINE, *, ram_mib: int = 64, seed: int = 7, run_s: float = 0.3) -> dict[str, Any]:
    """Snapshot a guest that keeps overwriting pages, load it, and compare every page's
    generation stamp with the host model at the guest's own iteration counter (RBX... R13)."""
    s = default_machine(ram_mib=ram_mib, seed=seed, dirty_rate_mib_s=0)
    m = s.machine
    try:
        m.start()
        time.sleep(run_s)
        q = m.qmp()
        args = {"job-id": "proof", "tag": "proof", "vmstate": "disk0", "devices": ["disk0"],
                "__org.snaplab_engine": engine}
        q.execute("snapshot-save", args)
        info = q.wait_job("proof", 120)
        stats = q.execute("__org.snaplab_query-snapshot-stats", {"id": "proof"})
        time.sleep(run_s)  # the guest runs on and overwrites pages
        m.stop()
        m.snapshots.load_snapshot("proof", "disk0", ["disk0"])
        counter = m.cpu.get_state()["R13"]
        spec = m.config.workload
        ram = m.config.ram_size
        n = spec.pages(ram)
        stamps = np.frombuffer(m.ram.read(spec.base, n * 4096), np.uint64).reshape(n, 512)[:, 0]
        exp = expected_generations(spec, ram, counter)
        diff = np.flatnonzero(stamps != exp)
        in_flight = all(stamps[d] == counter + 1 for d in diff) and len(diff) <= 1
        return {"engine": engine, "job error": info.get("error"), "pages checked": int(n),
                "pages as at the snapshot instant": int(n - len(diff) + (len(diff) if in_flight else 0)),
                "guest wrote during the save": bool(stats.get("faults", 0) > 0 or not guest_runs(engine)),
                "exact": bool(in_flight)}
    finally:
        s.close()
