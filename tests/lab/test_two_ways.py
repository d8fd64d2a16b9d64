"""lab.two_ways on snaplab (the notebook runs it on QEMU 7.2 too)."""

from __future__ import annotations

import pytest

from lab import plot
from lab.two_ways import snapshot_two_ways, two_ways_rows


def test_internal_snapshot_in_the_image_background_snapshot_in_a_file() -> None:
    r = snapshot_two_ways("snaplab", ram_mib=64, seed=2, rate_mib_s=20, ws_mib=8)
    names = [line.split()[1] for line in r["snapshots"].strip().splitlines()[2:]]
    assert names == ["internal"]  # the background snapshot adds nothing to the image
    assert r["internal"]["vmstate_bytes"] > 4 << 20  # the pages the guest dirtied are in it
    assert r["migrate"]["file_bytes"] > 4 << 20
    assert r["disk_allocated_bytes"] >= r["internal"]["vmstate_bytes"]  # the VM state lives in the image
    assert r["steady"]
    # what the figure draws: samples from before the command to after the end, one stop each
    for op in ("internal", "migrate"):
        x = r[op]
        ts = [t for t, _ in x["timeline"]]
        # (the samples kept are those of the window the figure draws: 0.2 s before the command
        # to 0.1 s after the end, by construction)
        assert ts == sorted(ts) and ts[0] < 0 < ts[-1] and -0.2 <= ts[0] and ts[-1] <= x["end_s"] + 0.1
        assert x["rate_before"] > 0 and len(x["stops_s"]) == 1
        a, b = x["stops_s"][0]
        # the stop is the operation's own, and the same STOP and RESUME as the table's downtime
        assert 0 < a < b < x["end_s"] and (b - a) * 1e3 == pytest.approx(x["downtime_ms"], abs=1e-3)
        # the work counted from the command: none stopped, about the rate before outside the stop
        done = dict(x["timeline"])
        assert all(i <= 0 for t, i in done.items() if t <= 0) and all(i >= 0 for t, i in done.items() if t >= 0)
        assert x["timeline"][-1][1] > 0


def test_two_ways_rows_one_row_per_run_and_operation() -> None:
    rows, last = two_ways_rows("snaplab", reps=2, ram_mib=64, seed=2, rate_mib_s=20, ws_mib=8)
    assert [(r["op"], r["rep"]) for r in rows] == [("internal", 0), ("background", 0), ("internal", 1), ("background", 1)]
    assert all(r["system"] == "snaplab" and r["downtime_ms"] > 0 and r["total_s"] > 0 for r in rows)
    assert last["internal"]["downtime_ms"] == rows[2]["downtime_ms"]  # the last run's
    # the background snapshot comes after the internal one, on the same guest: it has written more
    assert all(0 < rows[k]["written_before_mib"] < rows[k + 1]["written_before_mib"] for k in (0, 2))
    fig = plot.two_ways_timelines({"snaplab": last})
    assert len(fig.axes) == 2 and all(len(ax.lines) >= 3 for ax in fig.axes)  # the guest, its end, the diagonal
