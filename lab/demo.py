"""Small demonstrations for the notebooks (each returns plain data a notebook prints)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from lab.session import default_machine


def monitor_during_save(ram_mib: int = 256, seed: int = 1) -> dict[str, Any]:
    """Start a blocking snapshot-save of a RAM full of random bytes and ask query-status at once.

    QEMU 7.2 answers only after the whole save (its monitor runs the save); snaplab's monitor
    answers while the job runs.
    """
    s = default_machine(ram_mib=ram_mib, seed=seed, workload="idle")
    m = s.machine
    try:
        rng = np.random.default_rng(seed)
        chunk = 32 << 20
        for off in range(16 << 20, m.ram.size - chunk, chunk):
            m.ram.write(off, rng.integers(0, 256, chunk, dtype=np.uint8).tobytes())
        m.start()
        q = m.qmp()
        q.events()
        q.execute("snapshot-save", {"job-id": "big", "tag": "big", "vmstate": "disk0", "devices": ["disk0"]})
        t_status = time.time()
        status = q.execute("query-status")["status"]
        jobs = [j["status"] for j in q.execute("query-jobs")]
        info = q.wait_job("big", 300)
        concluded = [e for e in q.events() if e.event == "RESUME"]
        resumed_at = concluded[0].timestamp if concluded else float("inf")
        return {"job error": info.get("error"), "status while saving": status, "job states seen": jobs,
                "answered before the guest resumed": t_status < resumed_at}
    finally:
        s.close()
