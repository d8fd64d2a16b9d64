"""Sweeps: a grid over spec fields, resumable, in local processes and on a real Dask LocalCluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import results
from lab.cli import main
from lab.spec import ExperimentSpec, SpecError
from lab.sweep import grid, sweep

BASE = ExperimentSpec(ram_mib=32, engine="blocking", repetitions=1, warmup_s=0.05, gap_s=0.0, dirty_rate_mib_s=0)


def test_grid_and_errors() -> None:
    pts = grid(BASE, {"ram_mib": [32, 64], "engine": ["blocking", "cow"]})
    assert [(p.ram_mib, p.engine) for p in pts] == [(32, "blocking"), (32, "cow"), (64, "blocking"), (64, "cow")]
    with pytest.raises(SpecError, match="spec field 'ram' is unknown"):
        grid(BASE, {"ram": [1]})
    with pytest.raises(SpecError, match="spec field 'engine'"):
        grid(BASE, {"engine": ["warp"]})


def test_local_processes_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    pts = grid(BASE, {"seed": [1, 2]})
    rows = sweep(pts, out, workers=2, progress=False)
    assert sorted(r["seed"] for r in rows) == [1, 2]
    first = out.read_text()
    rows2 = sweep(pts + grid(BASE, {"seed": [3]}), out, workers=2, progress=False)
    assert sorted(r["seed"] for r in rows2) == [1, 2, 3]
    assert out.read_text().startswith(first.splitlines()[0])
    again, meta = results.load(out)
    assert len(again) == 3 and meta["seed"] == 1
    assert main(["sweep", "--axis", "seed=1,2,3", "--repetitions", "1", "--workers", "1", "--out", str(tmp_path / "x.csv")]) == 0


def test_dask_local_cluster(tmp_path: Path) -> None:
    import socket

    distributed = pytest.importorskip("distributed")  # in the [test] extra; installed in CI
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with pytest.raises(SpecError, match="no Dask worker offers the 'timed' resource: start each worker "
                                            "with --resources timed=1"):
            sweep(grid(BASE, {"seed": [5]}), tmp_path / "none.csv", client=client, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  resources={"timed": 1}) as cluster, distributed.Client(cluster) as client:
        rows = sweep(grid(BASE, {"seed": [5, 6]}), tmp_path / "d.csv", client=client, progress=False)
    assert sorted(r["seed"] for r in rows) == [5, 6]
    assert all(r["downtime_ms"] > 0 and r["host"] == socket.gethostname() for r in rows)
