"""Benchmark: restore to full speed, every load policy on one snapshot (issue #19).

    python bench/bench_restore.py [--quick] [--ram-mib N] [--ws-mib N] [--runs N] [--seed S]
                                  [--horizon-s S] [--rate-mib-s N] [--no-qemu] [--no-control]
                                  [--no-disk-floor] [--out FILE]

A guest whose RAM is full of random bytes (4 GiB; --quick 1 GiB) runs the dirty workload,
unthrottled (``--rate-mib-s``: paced, so that its rate before a load is a known one), over a working set (256 MiB; --quick 64 MiB) at a seeded random place in RAM.
One blocking snapshot; then each policy of the registry loads it once untimed (the first
on-demand or prefetch load records the snapshot's loading set) and ``--runs`` times timed
(5; --quick 3), policies interleaved.  Definitions in lab/restore.py: ``resume_ms`` command
-> RESUME; ``first_instr_ms`` command -> the vCPU's first entry into the guest after it; ``to50_ms``/``to90_ms`` command -> the guest's progress rate back at 50%/90% of
its steady rate before the command (median of 20 ms windows over the 2 s settle), within the
horizon (``--horizon-s``; by default 5 s, plus 0.5 s per GiB above 4 GiB, so that a blocking
load of 16 GiB, 5-6 s here, is watched back to speed); ``resident_s`` RESUME -> all of RAM in place.
Medians (a load not back to 50%/90% within the horizon counts as later than all the others,
never dropped: ``late`` column); the VM state is read around the page cache (O_DIRECT,
docs/deviations.md 57).  When
QEMU 7.2 is installed, its blocking load of a guest of the same size is measured in the same
run (its RAM filled with -device loader files, which its reset copies again: an upper bound,
see data/results/reproduction/README.md).  Before the guest starts, the host's and Unicorn's own
speed is probed for 6 s (lab/hostnoise.py: a core-bound and a cache-bound numpy loop, the second
over a buffer the working set's size, and a bare Unicorn loop writing at random pages); each load's row has the guest's rate before and over its last second
watched (``rate_after``), to tell a host that slowed from a slow recovery.  Each run also
watches the guest once with no load (the ``control`` row, lab.restore.CONTROL; ``--no-control``:
none): the same windows and reference rate from an instant at which nothing is sent; the
to-50%/90% rule applied from every 20 ms of those watches gives the noise floor under every
policy's figure (lab.restore.noise_floor), printed and stored under "control".  Each run also
reads as many bytes as the working set's from the middle of the snapshot's image, with the
guest running (``--no-disk-floor``: not), one 2 MiB chunk at a time and with the prefetch
policy's readers (lab/diskfloor.py): the disk's own speed beside the lazy loads' times to
speed, which moves with the host (about 3x between two nights on the EPYC host), printed run
by run beside the loads and stored under "disk".  Raw rows go to --out (JSON).  The last line
printed is one JSON object:
{"ram_mib": N, "policies": {"blocking": {"resume_ms": x, "to90_ms": y, "faults": n,
"resident_s": z}, ...}, "control": {"to90_ms": ..., ...}, "ratios": {...}, "disk": {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lab import qemu as qemu_lab
from lab.hostnoise import describe, host_noise
from lab.restore import (
    CONTROL,
    RestoreSpec,
    disk_pairs,
    disk_summary,
    noise_floor,
    restore_experiment,
    summarize,
)
from lab.spec import load_engines

GOAL_PREFETCH_VS_BLOCKING = 5.0
GOAL_PREFETCH_VS_BACKGROUND = 2.0
GOAL_RESUME_MS = 1.0


def qemu_load_ms(mib: int, runs: int) -> float:
    """QEMU 7.2's blocking snapshot-load, command to RESUME, median ms (same host, same run)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d, qemu_lab.running(Path(d), mib) as q:
        return float(np.median([c2r for c2r, _ in qemu_lab.snapshot_loads(q, runs)])) * 1e3


def _num(x: float, digits: int) -> float | None:
    """A figure for the JSON line: rounded, or null where it is NaN (a median that was late:
    half the loads or more never got back within the watch)."""
    return round(x, digits) if np.isfinite(x) else None


def _print_row(r: dict[str, Any]) -> None:
    print(f"  run {r['run']} {r['policy']:>10}: resume {r['resume_ms']:7.2f} ms  to50 {r['to50_ms']:8.1f} ms  "
          f"to90 {r['to90_ms']:8.1f} ms  faults {r['faults']:5d}  resident {r['resident_s']:6.3f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ram-mib", type=int)
    ap.add_argument("--ws-mib", type=int)
    ap.add_argument("--runs", type=int)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--horizon-s", type=float, help="how long each load is watched (default: see above)")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--no-fill", action="store_true", help="leave RAM as the guest writes it (mostly zero): a scale test")
    ap.add_argument("--out", default="out/bench_restore.json")
    ap.add_argument("--rate-mib-s", type=int, default=0,
                    help="pace the guest at this many MiB of page stamps a second (default: unpaced; see lab.restore.RestoreSpec)")
    ap.add_argument("--no-control", action="store_true",
                    help="no control watch (the same watch with no load) in each run")
    ap.add_argument("--no-disk-floor", action="store_true",
                    help="no bare read of the working set's size from the image in each run (lab/diskfloor.py)")
    a = ap.parse_args()
    if a.rate_mib_s < 0:
        ap.error(f"--rate-mib-s must be 0 (unpaced) or more, not {a.rate_mib_s}")
    for name in ("ram_mib", "ws_mib", "runs"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1 (leave it out for the default)")
    if a.horizon_s is not None and a.horizon_s <= 0:
        ap.error("--horizon-s must be more than 0")
    ram_mib = a.ram_mib or (1024 if a.quick else 4096)
    if (a.ws_mib or (64 if a.quick else 256)) > ram_mib // 2:
        ap.error(f"--ws-mib: at most half of the guest's RAM ({ram_mib // 2} MiB)")
    horizon = a.horizon_s if a.horizon_s is not None else max(5.0, 3.0 + 0.5 * ram_mib / 1024)
    spec = RestoreSpec(ram_mib=ram_mib, ws_mib=a.ws_mib or (64 if a.quick else 256),
                       runs=a.runs or (3 if a.quick else 5), seed=a.seed, fill_random=not a.no_fill, horizon_s=horizon,
                       control=not a.no_control, rate_mib_s=a.rate_mib_s, disk_floor=not a.no_disk_floor)
    pace = f"paced at {spec.rate_mib_s} MiB/s" if spec.rate_mib_s else "unpaced"
    print(f"restore to full speed: {spec.ram_mib} MiB guest ({'random' if spec.fill_random else 'mostly zero'} RAM, {pace}), working set {spec.ws_mib} MiB at "
          f"+{spec.workload().ws_offset >> 20} MiB, seed {spec.seed}, {spec.runs} timed loads per policy, "
          f"each watched {spec.horizon_s:g} s; "
          f"VM state read around the page cache (O_DIRECT, docs/deviations.md 57)", flush=True)
    noise = host_noise(6.0, spec.ws_mib)  # alone, before the guest starts
    print(f"the host's and Unicorn's own speed (lab/hostnoise.py, 2 s each): {describe(noise)}", flush=True)
    res = restore_experiment(spec, progress=_print_row) | {"host_noise": noise}
    summary = summarize(res["rows"])
    print(f"{'policy':>10} {'resume':>9} {'1st insn':>9} {'progress':>9} {'to50':>9} {'to90':>9} {'to90 IQR':>9} {'late':>6} {'faults':>7} "
          f"{'stall p99':>9} {'resident':>9} {'read':>9}")
    for p, s in summary.items():
        late = f"{s['to90_late']:.0f}/{s['loads']:.0f}"
        print(f"{p:>10} {s['resume_ms']:7.2f}ms {s['first_instr_ms']:7.2f}ms {s['first_progress_ms']:7.1f}ms {s['to50_ms']:7.1f}ms "
              f"{s['to90_ms']:7.1f}ms {s['to90_iqr_ms']:7.1f}ms {late:>6} {s['faults']:7.0f} {s['stall_p99_ms']:7.2f}ms "
              f"{s['resident_s']:8.3f}s {s['bytes_read'] / 2**20:6.0f}MiB")
    rb = np.array([r["rate_before"] for r in res["rows"]]) / 1e6
    ra = np.array([r["rate_after"] for r in res["rows"]]) / 1e6
    slow_end = {p: (sum(1 for r in rs if r["rate_after"] < 0.9 * r["rate_before"]), len(rs))
                for p in summary for rs in [[r for r in res["rows"] if r["policy"] == p]]}
    print(f"guest rate before each load: median {np.nanmedian(rb):.2f} M/s, {np.nanmin(rb):.2f}-{np.nanmax(rb):.2f}; "
          f"over each load's last second watched: {np.nanmedian(ra):.2f}, {np.nanmin(ra):.2f}-{np.nanmax(ra):.2f}; "
          "loads ending under 90% of their rate before (the guest's speed switched, or the load's filler still ran): "
          + ", ".join(f"{p} {n}/{total}" for p, (n, total) in slow_end.items()))
    floor = {f"to{int(lv * 100)}": noise_floor(res["rows"], lv) for lv in (0.5, 0.9)} if spec.control else {}
    for name, nf in floor.items():
        if nf.get("starts"):
            print(f"noise floor {name} (lab.restore.noise_floor: the to-level rule from every 20 ms of the control watches, "
                  f"{nf['starts']:.0f} starts): >= 60 ms from {nf['share_60ms']:.0%}, >= 200 ms from {nf['share_200ms']:.0%}, "
                  f"90th percentile {nf['p90_ms']:.0f} ms, longest {nf['max_ms']:.0f} ms")
    blocking, *lazy = load_engines()
    pf, bg = "prefetch", "background"  # the goals name them
    disk = disk_summary(res["disk"], summary, parallel=(pf, bg), serial=tuple(p for p in lazy if p != pf))
    if disk.get("errors"):
        print("the disk's own reads failed in "
              + ", ".join(f"run {d['run']}: {d['error']}" for d in res["disk"] if "error" in d), flush=True)
    if "mib" in disk:
        print(f"the disk alone (lab/diskfloor.py: {disk['mib']:.0f} MiB from the middle of the image's VM state, "
              f"read in each run with the guest running{', through the page cache' if disk['page_cache'] else ', around the page cache'}): "
              f"serial 2 MiB reads {disk['serial_ms']:.1f} ms ({disk['serial_min_ms']:.1f}-{disk['serial_max_ms']:.1f}), "
              f"prefetch's readers {disk['parallel_ms']:.1f} ms ({disk['parallel_min_ms']:.1f}-{disk['parallel_max_ms']:.1f}); "
              "median to90 over them: "
              + ", ".join(f"{k.replace('_over_', ' / ')} {v:.2f}" for k, v in disk.items() if "_over_" in k), flush=True)
        for pr in disk_pairs(res["rows"], res["disk"], pf, bg):
            print(f"  run {pr['run']:.0f}: {pf}'s set in at {pr['set_over_parallel']:.2f} of that run's parallel read; "
                  f"{bg} / {pf} to90 {pr['to90_ratio']:.2f}; serial / parallel read "
                  f"{pr['serial_over_parallel']:.2f}", flush=True)
    ratios = {"blocking_over_prefetch_to90": summary[blocking]["to90_ms"] / summary[pf]["to90_ms"],
              "background_over_prefetch_to90": summary[bg]["to90_ms"] / summary[pf]["to90_ms"]}
    print(f"to90: {blocking}/{pf} = {ratios['blocking_over_prefetch_to90']:.1f}x "
          f"(goal >= {GOAL_PREFETCH_VS_BLOCKING}), {bg}/{pf} = {ratios['background_over_prefetch_to90']:.1f}x "
          f"(goal >= {GOAL_PREFETCH_VS_BACKGROUND}); lazy resume medians "
          + ", ".join(f"{p} {summary[p]['resume_ms']:.2f} ms" for p in lazy) + f" (goal <= {GOAL_RESUME_MS} ms)")
    out: dict[str, Any] = {"ram_mib": spec.ram_mib, "ws_mib": spec.ws_mib, "seed": spec.seed, "runs": spec.runs,
                           "rate_mib_s": spec.rate_mib_s,
                           "policies": {p: {k: _num(v, 3) for k, v in s.items()} for p, s in summary.items() if p != CONTROL},
                           # the same watch with no load (lab.restore.CONTROL): the host's own noise floor
                           "control": {k: _num(v, 3) for k, v in summary.get(CONTROL, {}).items()}
                           | {f"noise_floor_{name}": {k: _num(v, 3) for k, v in nf.items()} for name, nf in floor.items()},
                           "ratios": {k: _num(v, 2) for k, v in ratios.items()},
                           # as many bytes read bare from the image in each run (lab/diskfloor.py)
                           "disk": {k: _num(v, 3) for k, v in disk.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res | {"summary": out}, indent=1, default=float))
    if qemu_lab.available() and not a.no_qemu:
        try:
            out["qemu_blocking_load_resume_ms"] = round(qemu_load_ms(spec.ram_mib, 3), 1)
            print(f"QEMU 7.2 blocking load, command -> RESUME (OVMF guest, loader-filled RAM: an upper bound): "
                  f"{out['qemu_blocking_load_resume_ms']} ms", flush=True)
        except (OSError, EOFError, RuntimeError) as err:  # QEMU's side failed: ours is kept
            out["qemu_error"] = f"{type(err).__name__}: {err}"
            print(f"QEMU 7.2 reference failed: {out['qemu_error']}", flush=True)
        Path(a.out).write_text(json.dumps(res | {"summary": out}, indent=1, default=float))
    print(f"raw rows: {a.out}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
