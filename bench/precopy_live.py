"""Pre-copy saves of the kill -9 campaign's mixed guest, in-process, each followed by a check of
the *live* disk0 against the model of the guest's writes: does a guest disk write go wrong
while a save runs?

Each iteration boots the mixed guest (tests/stress/kill9.py's SPEC) on two images (fresh ones
of a random layout every 10 iterations), saves a snapshot with ``--engine`` after a random
delay, stops the guest a moment later and compares disk0 as the guest sees it now with what
its writes up to its counter must have made (tests/model/guestdisk.py); the snapshot is then
deleted.  A wrong disk is told word by word: for each wrong 8-byte word, whose pattern it holds
(the guest's pattern is a function of the sector and the word), and which guest writes cover it.

    python bench/precopy_live.py [--iterations 3000] [--seed 7] [--engine precopy]

Found 2026-12-05 at eb0b7aa, beside a 3-lane test campaign (a loaded 2-core host): iteration
75 of seed 7 (4 KiB clusters, VM state on disk0): the guest's write 13 (sectors 673-680)
holds, from its word 202 on, the words its write buffer held for the write before it (write
12, sector 6700): the data of a write taken when the guest had refilled only the first 202 of
its 512 buffer words.  An earlier run (seed 1) found one such block in 217 iterations.  The
kill -9 test's wrong snapshots (docs/test-runs.md) likely have the same cause: one word of
the written block from the wrong place.  The cause (found 2026-12-05, fixed in c7607e8): the
pre-copy engine read the running CPU's registers when it began, and Unicorn's MSR read borrows
the live RAX, RCX and RDX (tests/machine/test_cpu_state.py, docs/test-runs.md).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.stress.kill9 as k  # noqa: E402
from emulator.block import Qcow2Image  # noqa: E402
from tests.model.guestdisk import (  # noqa: E402
    disk_difference,
    disk_matches,
    expected_disk,
    op_sectors,
    splitmix64,
)

_WORDS = splitmix64(np.bitwise_xor(np.arange(0, (k.DISK // 512) * 64, dtype=np.uint64), np.uint64(k.SPEC.seed)))


def whose(word: int) -> str:
    """Which (sector, word) of the guest's pattern holds this value (or zero, or none)."""
    hit = np.flatnonzero(_WORDS == np.uint64(word))
    return f"s{int(hit[0]) // 64}.{int(hit[0]) % 64}" if len(hit) else ("zero" if word == 0 else "?")


def explain(base0: bytes, counter: int, live: bytes) -> str:
    """The wrong words of ``live``: where, whose pattern, and the guest writes covering them."""
    e = np.frombuffer(expected_disk(k.SPEC, base0, counter, True), dtype="<u8")
    a = np.frombuffer(live, dtype="<u8")
    bad = np.flatnonzero(a != e)
    sectors = sorted(set((bad // 64).tolist()))
    words = [f"s{w // 64}.{w % 64} holds {whose(int(a[w]))}" for w in bad[:4].tolist()]
    starts = op_sectors(k.SPEC, len(base0) // 512, counter)
    ops = [(i, int(s)) for i, s in enumerate(starts) if any(s <= x < s + 8 for x in sectors)]
    return f"{len(bad)} words wrong in sectors {sectors[:10]}: {'; '.join(words)}; guest writes (index, sector) {ops[-4:]}"


def one(work: Path, rng: random.Random, engine: str) -> str | None:
    base0 = k.read_disk(work / "disk0.qcow2")
    m, g = k.machine_on(work)
    vmstate = rng.choice(k.DISKS)
    try:
        m.start()
        time.sleep(rng.uniform(0.02, 0.3))
        m.snapshots.save_snapshot("t", False, vmstate, list(k.DISKS), engine)
        time.sleep(rng.uniform(0, 0.2))
        m.stop()
        counter = m.ram.read_u64(k.LAB_COUNTER)
        img0 = g["disk0"].format_image
        live = img0.read(0, img0.size)
        problem = None
        if not disk_matches(k.SPEC, base0, counter, live):
            problem = (f"live disk0 wrong at counter {counter} (VM state on {vmstate}): "
                       f"{disk_difference(k.SPEC, base0, counter, live)} | {explain(base0, counter, live)}")
        m.snapshots.delete_snapshot("t", list(k.DISKS))
        return problem
    finally:
        m.close()
        g.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--engine", default="precopy")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    wrong = 0
    with tempfile.TemporaryDirectory(prefix="snaplab-live-") as d:
        work = Path(d) / "images"
        layout = k.LAYOUTS[0]
        for it in range(args.iterations):
            if it % 10 == 0:
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                layout = rng.choice(k.LAYOUTS)
                for disk in k.DISKS:
                    Qcow2Image.create(work / f"{disk}.qcow2", k.DISK, cluster_size=layout[0],
                                      refcount_bits=layout[1]).close()
            problem = one(work, rng, args.engine)
            if problem is not None:
                wrong += 1
                print(f"iteration {it} (cluster {layout[0]}, refcount bits {layout[1]}): {problem}", flush=True)
            if it % 100 == 0:
                print(f"{it} iterations, {wrong} wrong, {time.strftime('%H:%M:%S')}", flush=True)
    print(f"{args.iterations} iterations ({args.engine}), {wrong} with a wrong live disk0")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
