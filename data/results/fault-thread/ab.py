import os
import sys

if sys.argv[1] == "off":
    import emulator.migration.cow as cow
    cow.latency_priority = lambda: ""
if os.environ.get("VCPU_RT"):
    import emulator.migration.cow as cow2
    import emulator.runctl as rc
    _m = rc.RunControl._vcpu_main
    def vm(self):
        cow2.latency_priority(); _m(self)
    rc.RunControl._vcpu_main = vm
import numpy as np

from lab import teach
from lab.run import run_experiment
from lab.spec import ExperimentSpec

ram, ws, rate, reps = (int(x) for x in sys.argv[2:6])
rows = run_experiment(ExperimentSpec(ram_mib=ram, engine="cow", working_set_mib=ws, dirty_rate_mib_s=rate, warmup_s=1.2, gap_s=1.1, repetitions=reps))
w = [teach.cow_window_summary(r) for r in rows]
pr = [r["progress_during_save"] for r in rows]
print(f"{sys.argv[1]:>3} ram {ram} ws {ws} rate {rate}: progress med {np.median(pr):.2f} [{min(pr):.2f}-{max(pr):.2f}] first progress med {np.median([x['first_progress_ms'] for x in w]):.1f} ms "
      f"job med {np.median([r['details']['job_s'] for r in rows])*1e3:.1f} ms faults med {np.median([r['faults'] for r in rows]):.0f} lat p50 {np.median([r['fault_latency_p50_ms'] for r in rows]):.2f} "
      f"downtime med {np.median([r['downtime_ms'] for r in rows]):.2f} thread {rows[0].get('fault_thread', '?')}", flush=True)
