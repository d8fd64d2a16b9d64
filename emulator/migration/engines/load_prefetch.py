"""The prefetch load: the snapshot's loading set first, in first-touch order, then the rest.

REAP (ASPLOS'21) records the pages a function touches after its first restore and prefetches
exactly those next time; FaaSnap (EuroSys'22) loads them in access order.  Here the set is
the snapshot's loading set (loading_set.py), stored with its VM state: right after RESUME the
filler reads those chunks in the order the guest first touched them, faults still served
first, then every other chunk by address at SCHED_IDLE priority: once its working set is in,
the guest runs at full speed, and the rest of RAM takes only CPU time nothing else wants (the
background policy's filler, at normal priority, slows the guest while it reads).  A snapshot without a loading set is loaded the
first time as on demand for :data:`RECORD_S` seconds (the guest's faults alone decide what is
read, so what it touches is recorded without a filler racing it), then filled in the
background, and the set is stored for the next load.
"""

from __future__ import annotations

from typing import ClassVar

from emulator.migration.engine import LoadSource
from emulator.migration.engines.load_background import BackgroundLoad, FillPlan

RECORD_S = 0.5  # faults only, recording, on a snapshot's first prefetch load


class PrefetchLoad(BackgroundLoad):
    name: ClassVar[str] = "prefetch"
    title: ClassVar[str] = "prefetch (the recorded loading set first, in access order, then the rest)"

    def fill_plan(self, src: LoadSource) -> FillPlan:
        lset = src.parsed.loading_set
        if lset is not None and lset.recorded:
            return FillPlan(order=lset.chunks, rest_idle=True)
        return FillPlan(faults_only_s=RECORD_S, record_s=RECORD_S)
