"""The on-demand load: resume, then each fault reads its chunk, and nothing else.

Firecracker's userfaultfd snapshot restore with the simplest handler: pages arrive only when
the guest touches them.  The job becomes ``ready`` after RESUME (as a mirror job in sync):
``job-complete`` (or the machine's shutdown) makes the filler read the rest, and the job
concludes once all of RAM is in; it also concludes by itself when the guest has touched every
chunk.  Until then the VM's one snapshot operation is this load: a ``snapshot-save``,
``snapshot-load`` or ``snapshot-delete`` is refused (docs/deviations.md).  When the snapshot
has no loading set yet, the chunks touched in the first seconds are stored as one
(loading_set.py): an on-demand load records exactly what the guest touches, with no filler
racing it.
"""

from __future__ import annotations

from typing import ClassVar

from emulator.migration.engine import LoadSource
from emulator.migration.engines.load_background import BackgroundLoad, FillPlan

RECORD_S = 2.0  # the window a first restore records (seconds after RESUME)


class OnDemandLoad(BackgroundLoad):
    name: ClassVar[str] = "ondemand"
    title: ClassVar[str] = "on demand (resume, each fault reads its chunk, nothing else)"
    waits_for_complete: ClassVar[bool] = True

    def fill_plan(self, src: LoadSource) -> FillPlan:
        return FillPlan(faults_only_s=None, record_s=RECORD_S)
