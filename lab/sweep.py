"""Sweeps over any spec field: resumable, one timed experiment at a time per host.

Two timed runs on one host spoil each other, so a sweep runs its points one after another by
default; ``workers`` > 1 runs local processes in parallel (for quick functional sweeps, not
for figures).  Parallelism belongs across hosts: on a Dask cluster every point needs the
worker resource ``timed`` (start each worker with ``--resources timed=1``), so each worker runs
one timed experiment at a time, and every row records the host it ran on.  Each point of the grid is an :class:`~lab.spec.ExperimentSpec`; its rows are appended to the
results CSV as soon as it finishes, under a ``point`` key, so a sweep that stops can be run
again and only the missing points run.  Progress shows as a tqdm bar in a terminal and as an
ipywidgets bar in a notebook (``tqdm.auto``).
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from lab import results
from lab.run import run_experiment
from lab.spec import ExperimentSpec, SpecError


def grid(base: ExperimentSpec, axes: Mapping[str, Iterable[Any]]) -> list[ExperimentSpec]:
    """Every combination of the axes' values over ``base`` (errors name the field)."""
    known = set(base.as_dict())
    for k in axes:
        if k not in known:
            raise SpecError(f"spec field '{k}' is unknown; known fields: {', '.join(sorted(known))}")
    keys = list(axes)
    return [base.with_(**dict(zip(keys, combo, strict=True))) for combo in itertools.product(*(list(axes[k]) for k in keys))]


def point_key(spec: ExperimentSpec) -> str:
    return json.dumps(spec.as_dict(), sort_keys=True)


TIMED = "timed"  # the Dask worker resource a timed experiment holds


def _run_point(spec_dict: dict[str, Any]) -> list[dict[str, Any]]:
    spec = ExperimentSpec.from_dict(spec_dict)
    rows = run_experiment(spec)
    host = socket.gethostname()
    for r in rows:
        r["point"] = point_key(spec)
        r["host"] = host
    return rows


def check_timed_resource(client: Any) -> None:
    """Refuse a cluster none of whose workers offers the ``timed`` resource."""
    workers = client.scheduler_info().get("workers", {})
    if not any(w.get("resources", {}).get(TIMED, 0) >= 1 for w in workers.values()):
        raise SpecError(f"no Dask worker offers the '{TIMED}' resource: start each worker with "
                        f"--resources {TIMED}=1 (one timed experiment at a time per host)")


def sweep(points: list[ExperimentSpec], out: str | Path, *, workers: int | None = None, client: Any = None,
          progress: bool = True) -> list[dict[str, Any]]:
    """Run the points not yet in ``out``; returns every row (old and new).

    ``client``: a ``dask.distributed.Client`` to run on that cluster instead of local processes.
    """
    out = Path(out)
    done_rows: list[dict[str, Any]] = []
    if out.exists():
        done_rows, _ = results.load(out)
    done = {str(r.get("point")) for r in done_rows}
    todo = [p for p in points if point_key(p) not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(points), initial=len(points) - len(todo), desc="sweep", unit="point")
    rows = list(done_rows)

    def finished(new: list[dict[str, Any]]) -> None:
        rows.extend(new)
        results.save(rows, out, results.metadata(points[0].seed if points else None))
        if bar is not None:
            bar.update(1)

    try:
        if not todo:
            return rows
        if client is not None:
            from distributed import as_completed as dask_completed

            check_timed_resource(client)
            futures = client.map(_run_point, [p.as_dict() for p in todo], pure=False, resources={TIMED: 1})
            for fut in dask_completed(futures):
                finished(fut.result())
        elif (workers or 1) == 1:
            for p in todo:
                finished(_run_point(p.as_dict()))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futs = [pool.submit(_run_point, p.as_dict()) for p in todo]
                for f in as_completed(futs):
                    finished(f.result())
    finally:
        if bar is not None:
            bar.close()
    return rows
