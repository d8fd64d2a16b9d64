"""Benchmark: blocking snapshot-save downtime and snapshot-load time, snaplab vs QEMU 7.2.

    python bench/bench_snapshot.py [--ram-mib 1024] [--runs 3] [--no-qemu]

Both sides get the same guest: RAM filled with the same random bytes through
``-device loader`` (QEMU's way), one 1 GiB qcow2 disk, the VM state on it.  Downtime is
STOP -> RESUME from the QMP event timestamps; load time is the snapshot-load job's STOP ->
RESUME.  QEMU runs here when ``qemu-system-x86_64`` and OVMF are installed; otherwise the
figures recorded in docs/reference/qemu-7.2-qmp.md are used, and the output says so.

This workplace's VMs pay ~2.4 s/GiB the first time any memory is touched (host-side
first touch), which lands on whichever side first writes new page-cache pages.  The bench
therefore touches and frees ((runs + 3) x RAM + 2 GiB) of memory first, says how long that
took, and drops clean page cache (root) before each side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lab.qemu import OVMF
from lab.qemu import RawQMP as Raw
from lab.reproduce import drop_caches  # noqa: F401 - the other benches import it from here
from lab.reproduce import warm_memory as lab_warm_memory


def recorded(ram_mib: int) -> dict[str, float | None]:
    """QEMU 7.2's recorded medians at this RAM size (data/reference/qemu-7.2.csv), None where
    that size was not recorded: never another size's figure."""
    from lab.reference import qemu_reference

    ref = qemu_reference()
    return {"save": ref.get("blocking save downtime", {}).get(ram_mib),
            "load": ref.get("blocking load", {}).get(ram_mib)}


def warm_memory(nbytes: int) -> float:
    """Touch and free ``nbytes`` of host memory (at most what is available less 2 GiB:
    lab.reproduce.warm_memory); returns the seconds it took."""
    t0 = time.perf_counter()
    lab_warm_memory(nbytes)
    return time.perf_counter() - t0


def run(argv: list[str], sock: Path, ram_mib: int, runs: int, settle: float) -> dict[str, list[float]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 120
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{argv[0]} did not start")
            time.sleep(0.1)
        q = Raw(sock)
        time.sleep(settle)
        out: dict[str, list[float]] = {"save": [], "load": []}
        base = {"vmstate": "disk0", "devices": ["disk0"]}
        for i in range(runs):
            out["save"].append(q.job("snapshot-save", {"job-id": f"s{i}", "tag": f"p{i}", **base}))
            time.sleep(1)
        for i in range(runs):
            out["load"].append(q.job("snapshot-load", {"job-id": f"l{i}", "tag": f"p{i}", **base}))
        for i in range(runs):
            q.job("snapshot-delete", {"job-id": f"d{i}", "tag": f"p{i}", "devices": ["disk0"]})
        q.quit()
        return out
    finally:
        time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    if not 128 <= args.ram_mib <= 16384 or args.runs < 1:
        ap.error("--ram-mib must be 128 to 16384 (RAM less 64 MiB is filled with random bytes), --runs at least 1")
    ram = args.ram_mib << 20
    fill = ram - (64 << 20)
    warm = (args.runs + 3) * ram + (2 << 30)
    print(f"warming {warm >> 20} MiB of host memory: {warm_memory(warm):.1f} s")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        w = Path(d)
        rnd = w / "rand.bin"
        rng = np.random.default_rng(0)
        with open(rnd, "wb") as f:
            for _ in range(fill >> 26):
                f.write(rng.integers(0, 256, 1 << 26, dtype=np.uint8).tobytes())
        results = {}
        sides = ["snaplab"]
        have_qemu = shutil.which("qemu-system-x86_64") and (OVMF / "OVMF_CODE.fd").exists() and not args.no_qemu
        if have_qemu:
            sides.append("qemu")
        for side in sides:
            drop_caches()
            sw = w / side
            sw.mkdir()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(sw / "disk0.qcow2"), "1G"], check=True)
            common = ["-m", f"{args.ram_mib}M", "-nographic", "-nodefaults", "-display", "none",
                      "-blockdev", json.dumps({"driver": "file", "filename": str(sw / "disk0.qcow2"),
                                               "node-name": "disk0-file"}),
                      "-blockdev", json.dumps({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"}),
                      "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev",
                      "-device", f"loader,file={rnd},addr=0x1000000,force-raw=on",
                      "-qmp", f"unix:{sw / 'q.sock'},server=on,wait=off"]
            if side == "qemu":
                shutil.copy(OVMF / "OVMF_VARS.fd", sw / "vars.fd")
                argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35,pflash0=fw-code,pflash1=fw-vars",
                        "-blockdev", json.dumps({"driver": "file", "filename": str(OVMF / "OVMF_CODE.fd"),
                                                 "node-name": "fw-code-file", "read-only": True}),
                        "-blockdev", json.dumps({"driver": "raw", "file": "fw-code-file", "node-name": "fw-code",
                                                 "read-only": True}),
                        "-blockdev", json.dumps({"driver": "file", "filename": str(sw / "vars.fd"),
                                                 "node-name": "fw-vars-file"}),
                        "-blockdev", json.dumps({"driver": "raw", "file": "fw-vars-file", "node-name": "fw-vars"}),
                        *common]
                settle = 4.0
            else:
                argv = [sys.executable, "-m", "emulator.cli", *common]
                settle = 1.0
            results[side] = run(argv, sw / "q.sock", args.ram_mib, args.runs, settle)
    med = {s: {k: float(np.median(v)) for k, v in r.items()} for s, r in results.items()}
    ref: dict[str, float | None] = dict(med["qemu"]) if "qemu" in med else recorded(args.ram_mib)
    why = "--no-qemu" if args.no_qemu else "QEMU or OVMF not installed here"
    src = ("measured in this run" if "qemu" in med else
           f"RECORDED at this size in data/reference/qemu-7.2.csv ({why})")
    print(f"RAM {args.ram_mib} MiB, {args.runs} runs, QEMU figures {src}")
    for k in ("save", "load"):
        ours = results["snaplab"][k]
        theirs = ref.get(k)
        vs = (f"QEMU median {theirs:.3f} s; QEMU/snaplab = {theirs / med['snaplab'][k]:.1f}x" if theirs is not None
              else f"QEMU: nothing recorded at {args.ram_mib} MiB (run with QEMU installed to compare)")
        print(f"{k:5} snaplab {', '.join(f'{x:.3f}' for x in ours)} s (median {med['snaplab'][k]:.3f}); {vs}")
    print("goals: save downtime >= 4x shorter, load >= 2x faster than QEMU 7.2")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
