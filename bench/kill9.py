"""kill -9 at scale (issue #20, item 4): 500 SIGKILLs by default at random points of
``snaplab-system`` processes doing a ``snapshot-save`` (every save engine of the registry),
a ``snapshot-delete``, a ``snapshot-load`` (every load engine, background fills included) or
only the guest's disk writes.  After each kill: the real ``qemu-img check`` (leaks are fine,
corruption is not), every earlier snapshot listed by ``qemu-img snapshot -l`` and loadable
with correct RAM and disk content.  Prints a summary table; exit status 1 if anything was
corrupted, missing, unloadable or wrong.  The CI-sized version is tests/stress/test_kill9.py.

    flock /tmp/snaplab-timed.lock python bench/kill9.py [--kills 500] [--seed 9] [--reset-every 25]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.stress.kill9 import run, summary  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=500)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--reset-every", type=int, default=25, help="fresh images every N kills")
    ap.add_argument("--keep", type=Path, help="copy the images of every failed content check here")
    args = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="snaplab-kill9-") as root:
        tally = run(args.kills, args.seed, Path(root), args.reset_every, args.keep)
    print(summary(tally, time.monotonic() - t0))
    return 1 if tally.bad() else 0


if __name__ == "__main__":
    sys.exit(main())
