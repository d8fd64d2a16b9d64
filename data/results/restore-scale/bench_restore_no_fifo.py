"""bench/bench_restore.py with the fault thread left at the default scheduling policy (for an A/B;
run from the repository root with the bench's arguments)."""
import runpy
import sys

import emulator.migration.cow as cow

cow.latency_priority = lambda: ""
sys.argv = ["bench/bench_restore.py"] + sys.argv[1:]
runpy.run_path("bench/bench_restore.py", run_name="__main__")
