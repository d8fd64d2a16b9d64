"""The ``snaplab`` command: compare (the README's main job), run, plot."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # the CLI only writes PNG files

from lab import plot, results  # noqa: E402
from lab.run import run_experiment  # noqa: E402
from lab.spec import ExperimentSpec, SpecError  # noqa: E402

COMMITTED = Path(__file__).resolve().parents[1] / "data" / "results" / "reproduction"
QEMU_REF_MIB = (64, 16384)  # snaplab reference --qemu: the RAM sizes it will boot (reproduce's range)
REF_RUNS, REF_OUT = 3, "out/qemu-measured.csv"


def writable(path: str | Path, what: str) -> Path:
    """``path``'s folder made and checked before anything is measured (an output that cannot be
    written is refused now, not after minutes of measurement)."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{what} {p}: cannot make its folder: {err.strerror}") from None
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{what} {p}: not writable")
    return p


def cmd_compare(a: argparse.Namespace) -> int:
    """The README's main job: the dirty guest's snapshot downtime on snaplab and on QEMU 7.2,
    same guest program, same sizes; QEMU measured now when it is installed, else the committed
    reproduction's QEMU rows for the same conditions, labelled so."""
    from lab import qemu, repro_report
    from lab.reproduce import ReproSpec, parse_sizes, reproduce

    with_qemu = qemu.available_guest() and not a.no_qemu
    if not 1 <= a.repetitions <= 100:
        raise ValueError(f"--repetitions: {a.repetitions} is not allowed; expected 1 to 100")
    writable(a.png, "--png")
    spec = ReproSpec(ram_mib=parse_sizes(a.ram), reps=a.repetitions, conditions=("dirty",),
                     dirty_rate_mib_s=a.rate, working_set_mib=a.ws, seed=a.seed, with_qemu=with_qemu,
                     qemu_cache=a.qemu_cache, warm_mib=a.warm_mib)
    committed = COMMITTED if a.qemu_cache == "direct" else COMMITTED.parent / "reproduction-writeback-1206"
    out = Path(a.out)
    ws = ", ".join(f"{spec.working_set(r)} MiB at {r} MiB" for r in spec.ram_mib)
    print(f"snaplab compare: snapshot downtime of the dirty guest ({a.rate} MiB/s over a working set of {ws}), RAM "
          f"{list(spec.ram_mib)} MiB, seed {a.seed}, {a.repetitions} repetitions; QEMU 7.2 "
          f"{'measured now' if with_qemu else 'from the committed reproduction'}, "
          f"{repro_report.qemu_cache_text(a.qemu_cache)}", flush=True)
    t0 = time.monotonic()
    reproduce(spec, out, log=lambda s: print(f"  {s}", flush=True))
    rows, meta = repro_report.load_runs(out)
    qemu_rows: list[dict[str, object]] = []
    label = f"measured now, {repro_report.qemu_cache_text(a.qemu_cache)}"
    if not with_qemu and (committed / "runs.csv").exists():
        old, old_meta = repro_report.load_runs(committed)
        qemu_rows = [r for r in old if r["system"] == "qemu" and r["workload"] == "dirty"
                     and r["dirty_rate_mibs"] == a.rate and r["ram_mib"] in spec.ram_mib
                     and r["working_set_mib"] == spec.working_set(int(r["ram_mib"]))]
        label = repro_report.source_label(old_meta, committed=True)
        if not qemu_rows:
            print("  the committed reproduction has no QEMU rows for these sizes and this workload: "
                  "snaplab only", flush=True)
    repro_report.main_figure(rows, meta, a.png, qemu_rows, label)
    if qemu_rows:  # the table below mixes two runs: say which rows are which
        print(f"  in the table, the qemu rows are {label} ({len({r['rep'] for r in qemu_rows})} repetitions), "
              f"the snaplab rows measured now ({a.repetitions} repetitions)", flush=True)
    print(repro_report.table(rows + qemu_rows))
    print(f"results: {out / 'runs.csv'} (+ metadata.json); plot: {a.png}; {time.monotonic() - t0:.0f} s")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    spec = ExperimentSpec.from_toml(a.spec)
    out = writable(results.csv_path(a.out), "--out")
    meta = results.metadata(spec.seed)
    # each row saved as it comes: a run stopped part-way keeps what it measured
    rows = run_experiment(spec, on_row=lambda so_far: results.save(so_far, out, meta))
    results.save(rows, out, meta)
    print(results.table(rows))
    print(f"results: {out} (+ {out.with_suffix('.json').name})")
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from lab.sweep import grid, sweep

    axes: dict[str, list[object]] = {}
    for item in a.axis:
        field, _, values = item.partition("=")
        if not values:
            raise SpecError(f"--axis {item!r}: expected FIELD=V1,V2,...")
        conv: list[object] = []
        for v in values.split(","):
            for kind in (int, float):
                try:
                    conv.append(kind(v))
                    break
                except ValueError:
                    continue
            else:
                conv.append(v)
        axes[field] = conv
    base = ExperimentSpec.from_toml(a.spec) if a.spec else ExperimentSpec()
    if a.repetitions is not None:  # given: it wins over the spec's
        base = base.with_(repetitions=a.repetitions)
    points = grid(base, axes)
    writable(a.out, "--out")
    if Path(a.out).exists():
        results.load(a.out, results.REQUIRED)  # a file of another kind is refused before measuring
    client = None
    if a.scheduler:
        from distributed import Client

        client = Client(a.scheduler)
    rows = sweep(points, a.out, workers=a.workers, client=client)
    print(results.table(rows))
    print(f"{len(points)} points, results in {a.out}")
    return 0


def cmd_reference(a: argparse.Namespace) -> int:
    from lab import qemu
    from lab.reproduce import parse_sizes

    sizes = parse_sizes(a.ram)
    if not sizes or min(sizes) <= 0:
        raise SpecError(f"--ram: {a.ram!r}: expected positive sizes in MiB such as 256,1024")
    if not a.qemu:
        if a.runs != REF_RUNS or a.out != REF_OUT:
            print("snaplab: --runs and --out apply to --qemu only (nothing is measured without it)", file=sys.stderr)
        from lab.reference import qemu_reference

        recorded = qemu_reference()
        print(f"recorded figures (data/reference/), RAM {', '.join(map(str, sizes))} MiB; --qemu measures them here")
        for name, pts in sorted(recorded.items()):
            print(f"{name}: " + ", ".join(f"{k} MiB {pts[k]:.4g} s" if k in pts else f"{k} MiB not recorded"
                                          for k in sizes))
        return 0
    if not qemu.available():
        print("snaplab: qemu-system-x86_64 and OVMF are needed (apt-get install -y qemu-system-x86 ovmf)",
              file=sys.stderr)
        return 1
    lo, hi = QEMU_REF_MIB
    if not all(lo <= s <= hi for s in sizes):
        raise SpecError(f"--ram: {a.ram}: expected sizes from {lo} to {hi} MiB with --qemu")
    if not 1 <= a.runs <= 100:
        raise SpecError(f"--runs: {a.runs} is not allowed; expected 1 to 100")
    import shutil

    # one size at a time in /var/tmp: its random fill files and a VM state per run, plus room
    need = (max(sizes) << 20) * (1 + a.runs) + (2 << 30)
    free = shutil.disk_usage("/var/tmp").free
    if free < need:
        raise SpecError(f"--ram: {max(sizes)} MiB with --runs {a.runs} needs about {need / 2**30:.0f} GiB free in "
                        f"/var/tmp (QEMU's random fill files and snapshots); {free / 2**30:.0f} GiB are free")
    writable(a.out, "--out")
    rows = qemu.measure(list(sizes), runs=a.runs)
    meta = results.metadata(None)
    meta["measured"] = "qemu-system-x86_64 7.2 (see lab/qemu.py); RAM filled with random bytes via -device loader"
    path = results.save(rows, a.out, meta)
    for r in rows:
        print(f"{r['measurement']:<30} {r['ram_mib']:>6} MiB run {r['run']}: {r['seconds']:.4f} s")
    print(f"written: {path} (+ .json metadata)")
    return 0


def cmd_reproduce(a: argparse.Namespace) -> int:
    from pathlib import Path

    from lab import repro_report
    from lab.reproduce import QUICK_REPS, QUICK_SIZES, ReproSpec, parse_sizes, reproduce

    sizes = parse_sizes(a.ram) if a.ram else (QUICK_SIZES if a.quick else ReproSpec().ram_mib)
    reps = a.reps if a.reps is not None else (QUICK_REPS if a.quick else ReproSpec().reps)
    conditions = tuple(c.strip() for c in a.conditions.split(",") if c.strip())
    spec = ReproSpec(ram_mib=sizes, reps=reps, conditions=conditions, dirty_rate_mib_s=a.rate,
                     working_set_mib=a.ws, seed=a.seed, with_qemu=not a.no_qemu, qemu_cache=a.qemu_cache,
                     touched_ws=a.touched, warm_mib=a.warm_mib)
    committed = None
    if a.compare:
        committed = repro_report.load_runs(a.compare)  # fail on a bad directory before measuring
    out = Path(a.out)
    print(f"snaplab reproduce: RAM {list(spec.ram_mib)} MiB, {spec.reps} repetitions, {', '.join(conditions)}, "
          f"seed {spec.seed}, {'with' if spec.with_qemu else 'without'} QEMU -> {out}", flush=True)
    client = None
    if a.scheduler:
        from distributed import Client

        client = Client(a.scheduler)
    t0 = time.monotonic()
    try:
        reproduce(spec, out, log=lambda s: print(f"  {s}", flush=True), client=client)
    finally:
        if client is not None:
            client.close()
    rows, meta = repro_report.load_runs(out)
    print(repro_report.table(rows))
    pngs = repro_report.figures(rows, meta, out)
    print(repro_report.goals_text(rows))
    if committed is not None:
        print(repro_report.compare_text(rows, committed[0], repro_report.source_label(committed[1], True)))
    took = time.monotonic() - t0
    print(f"runs: {out / 'runs.csv'}, metadata: {out / 'metadata.json'}, figures: {', '.join(map(str, pngs))}; "
          f"{took:.0f} s")
    if a.quick:
        verdict = ("met" if took < QUICK_GOAL_S else "NOT met") if spec.with_qemu else "not the goal's condition (no QEMU)"
        print(f"Issue #16's goal: snaplab reproduce --quick in under {QUICK_GOAL_S / 60:.0f} minutes, QEMU installed: "
              f"{took:.0f} s, {verdict}")
    return 0


QUICK_GOAL_S = 600.0  # issue #16: snaplab reproduce --quick in under 10 minutes on this kind of host


def cmd_plot(a: argparse.Namespace) -> int:
    from pathlib import Path

    if Path(a.results).is_dir():  # a reproduction's directory
        from lab import repro_report

        rows, meta = repro_report.load_runs(a.results)
        where = Path(a.png).parent if a.png != "out/plot.png" else Path(a.results)
        pngs = repro_report.figures(rows, meta, where, committed=a.committed)
        print(repro_report.table(rows))
        print(repro_report.goals_text(rows))
        print(f"plots: {', '.join(map(str, pngs))} ({repro_report.source_label(meta, a.committed)})")
        return 0
    rows, meta = results.load(a.results, results.REQUIRED)
    plot.downtime_vs_ram(rows, a.png)  # snaplab only: QEMU beside it comes from a reproduction (same guest)
    print(results.table(rows))
    print(f"plot: {a.png} (data from {meta.get('date', '?')}, seed {meta.get('seed')})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per job (compare, run, sweep, reference, plot, reproduce)."""
    ap = argparse.ArgumentParser(prog="snaplab", description="VM snapshot experiments")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="snapshot downtime, snaplab beside QEMU 7.2, same guest and sizes")
    c.add_argument("--ram", default="256,1024", help="RAM sizes in MiB, comma-separated")
    c.add_argument("--seed", type=int, default=1, help="the guest's seed: the same seed, the same instruction stream")
    c.add_argument("--repetitions", type=int, default=3, help="saves and loads per size and system")
    c.add_argument("--rate", type=int, default=100, help="the guest's dirty rate, MiB/s")
    c.add_argument("--ws", type=int, default=256, help="the guest's working set, MiB")
    c.add_argument("--no-qemu", action="store_true", help="do not run QEMU (use the committed data)")
    c.add_argument("--qemu-cache", default="direct", choices=("direct", "writeback"),
                   help="QEMU's image: direct (cache.direct=on, around the page cache as snaplab's VM state; "
                        "data/results/reproduction) or writeback (QEMU's default; data/results/reproduction-writeback-1206)")
    c.add_argument("--warm-mib", type=int, default=None, help="host memory touched and freed before each "
                   "block, MiB (default: 3 x RAM + 2048; 0: none; docs/reproduction.md, Warm memory)")
    c.add_argument("--out", default="out/compare", help="the directory of the runs (runs.csv, metadata.json)")
    c.add_argument("--png", default="out/compare.png", help="the figure written")
    c.set_defaults(fn=cmd_compare)
    r = sub.add_parser("run", help="run one experiment from a TOML spec (fields: docs/specs.md)")
    r.add_argument("spec", help="a TOML file: an [experiment] table of ExperimentSpec's fields (docs/specs.md)")
    r.add_argument("--out", default="out/run.csv", help="the CSV written (+ .json metadata beside it), a row "
                   "at a time as they are measured")
    r.set_defaults(fn=cmd_run)
    w = sub.add_parser("sweep", help="run a grid of experiments (resumable; processes or a Dask cluster)")
    w.add_argument("--axis", action="append", default=[], help="FIELD=V1,V2,... (repeatable), e.g. ram_mib=64,128")
    w.add_argument("--spec", help="a TOML spec for the fixed fields")
    w.add_argument("--repetitions", type=int, default=None,
                   help="repetitions per point (default: the spec's, 3 without a spec)")
    w.add_argument("--workers", type=int, default=1,
                   help="local processes (default 1: one timed experiment at a time; more spoil the timings)")
    w.add_argument("--scheduler", help="a dask.distributed scheduler address")
    w.add_argument("--out", default="out/sweep.csv", help="the CSV written (+ .json metadata); a sweep "
                   "started again with the same --out skips the points it has")
    w.set_defaults(fn=cmd_sweep)
    f = sub.add_parser("reference", help="QEMU 7.2's numbers: the recorded ones, or --qemu to measure them here")
    f.add_argument("--qemu", action="store_true", help="run the real qemu-system-x86_64 and measure")
    f.add_argument("--ram", default="256,1024", help="RAM sizes in MiB, comma-separated (64 to 16384 with --qemu)")
    f.add_argument("--runs", type=int, default=REF_RUNS, help="runs per size, with --qemu")
    f.add_argument("--out", default=REF_OUT, help="the CSV written, with --qemu (+ .json metadata)")
    f.set_defaults(fn=cmd_reference)
    p = sub.add_parser("plot", help="re-plot saved results (a CSV, or a reproduction's directory)")
    p.add_argument("results", help="a CSV written by snaplab run/sweep, or a reproduction's directory")
    p.add_argument("--png", default="out/plot.png",
                   help="the figure for a CSV; for a reproduction's directory only its folder counts (four "
                        "figures go there: downtime.png, total.png, progress.png, lost.png; default: the "
                        "directory itself)")
    p.add_argument("--committed", action="store_true", help="label the figure as committed data")
    p.set_defaults(fn=cmd_plot)
    e = sub.add_parser("reproduce", help="snaplab beside the real QEMU 7.2: same guest, same sizes, same definitions")
    e.add_argument("--quick", action="store_true", help="256 and 1024 MiB, 3 repetitions")
    e.add_argument("--out", default="out/reproduction", help="the directory written: runs.csv, metadata.json, "
                   "the figures")
    e.add_argument("--ram", default="", help="RAM sizes in MiB, comma-separated (default 256,1024,4096)")
    e.add_argument("--reps", type=int, default=None, help="repetitions (default 5; --quick 3)")
    e.add_argument("--conditions", default="idle-random,dirty", help="comma-separated, of: idle-random (RAM of random bytes, as QEMU's "
                   "reference), dirty (--rate over --ws)")
    e.add_argument("--rate", type=int, default=100, help="the dirty workload's rate, MiB/s")
    e.add_argument("--ws", type=int, default=256, help="the dirty workload's working set, MiB")
    e.add_argument("--seed", type=int, default=1, help="the guests' seed (both systems run the same stream)")
    e.add_argument("--no-qemu", action="store_true", help="measure snaplab only")
    e.add_argument("--compare", default="", help="a committed reproduction to compare the ratios with")
    e.add_argument("--qemu-cache", default="direct", choices=("direct", "writeback"), help="QEMU's image file node: direct (cache.direct=on, "
                   "O_DIRECT as snaplab) or writeback (QEMU's default, through the page cache)")
    e.add_argument("--touched", type=float, default=7.0, help="working sets' worth of pages the dirty guest "
                   "writes before any measured operation, on both systems (7: 99.9%% of it touched)")
    e.add_argument("--warm-mib", type=int, default=None, help="host memory touched and freed before each "
                   "block, MiB (default: 3 x RAM + 2048; 0: none; docs/reproduction.md, Warm memory)")
    e.add_argument("--scheduler", default="", help="a dask.distributed scheduler address: each (size, condition) "
                   "pair runs on one worker started with --resources timed=1")
    e.set_defaults(fn=cmd_reproduce)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    import lab.reproduce

    lab.reproduce.COMMAND_LINE = " ".join(["snaplab", *(sys.argv[1:] if argv is None else argv)])
    old_term = _terminate_as_exit()
    try:
        return int(a.fn(a))
    except KeyboardInterrupt:
        print("snaplab: interrupted; rows measured so far were kept where the command writes them",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # (output piped into head, say)
        sys.stderr.close()
        return 0
    except OSError as err:
        where = f": '{err.filename}'" if err.filename else ""
        print(f"snaplab: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except (SpecError, ValueError) as err:
        print(f"snaplab: {err}", file=sys.stderr)
        return 2
    finally:
        lab.reproduce.COMMAND_LINE = ""
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _terminate_as_exit() -> Any:
    """SIGTERM (``timeout``, ``kill``) raises SystemExit in the main thread, so every scratch
    directory and guest is closed by its ``with`` on the way out, as on Ctrl-C; returns the
    handler it replaced (None off the main thread, where signals cannot be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    sys.exit(main())
