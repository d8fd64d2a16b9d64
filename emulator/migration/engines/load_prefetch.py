"""The prefetch load: the snapshot's loading set first, in first-touch order, then the rest.

REAP (ASPLOS'21) records the pages a function touches after its first restore and prefetches
exactly those next time; FaaSnap (EuroSys'22) loads them in access order.  Here the set is
the snapshot's loading set (loading_set.py), stored with its VM state: recorded by a first
restore, or by the copy-on-write save itself (the chunks the guest wrote first in its window).
Right after RESUME the filler reads those chunks in the order the guest first touched them,
:data:`~emulator.migration.postcopy.PREFETCH_READERS` at once (one reader read the set more
slowly than the guest came to it, so it faulted on most of it anyway), faults still served
first, then every other chunk by address, slowly: at SCHED_IDLE priority and using only
REST_DUTY of a CPU (its CPU time: a read's wait for the disk costs the guest nothing; measured
on a 2-vCPU host: a filler reading at full speed on the other vCPU held the guest near half its
speed, at SCHED_IDLE too).  Once its working set is in,
the guest runs at full speed; RAM is all resident much later (a chunk needed before is read at
its fault; quit fills the rest at once).  A snapshot without a loading set is loaded the
first time as on demand for :data:`RECORD_S` seconds (the guest's faults alone decide what is
read, so what it touches is recorded without a filler racing it), then filled in the
background, and the set is stored for the next load.
"""

from __future__ import annotations

from typing import ClassVar

from emulator.migration.engine import LoadSource
from emulator.migration.engines.load_background import BackgroundLoad, FillPlan
from emulator.migration.loading_set import WINDOW_S

RECORD_S = WINDOW_S  # faults only, recording, on a snapshot's first prefetch load
REST_DUTY = 0.05  # the rest of RAM: the filler uses a twentieth of a CPU


class PrefetchLoad(BackgroundLoad):
    name: ClassVar[str] = "prefetch"
    title: ClassVar[str] = "prefetch (the recorded loading set first, in access order, then the rest)"

    def fill_plan(self, src: LoadSource) -> FillPlan:
        lset = src.parsed.loading_set
        if lset is not None and lset.recorded:
            return FillPlan(order=lset.chunks, rest_idle=True, rest_duty=REST_DUTY)
        return FillPlan(faults_only_s=RECORD_S, record_s=RECORD_S)
