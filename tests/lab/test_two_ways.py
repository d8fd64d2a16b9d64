"""lab.two_ways on snaplab (the notebook runs it on QEMU 7.2 too)."""

from __future__ import annotations

from lab.two_ways import snapshot_two_ways, two_ways_rows


def test_internal_snapshot_in_the_image_background_snapshot_in_a_file() -> None:
    r = snapshot_two_ways("snaplab", ram_mib=64, seed=2, rate_mib_s=20, ws_mib=8)
    names = [line.split()[1] for line in r["snapshots"].strip().splitlines()[2:]]
    assert names == ["internal"]  # the background snapshot adds nothing to the image
    assert r["internal"]["vmstate_bytes"] > 4 << 20  # the pages the guest dirtied are in it
    assert r["migrate"]["file_bytes"] > 4 << 20
    assert r["disk_allocated_bytes"] >= r["internal"]["vmstate_bytes"]  # the VM state lives in the image
    assert r["steady"]


def test_two_ways_rows_one_row_per_run_and_operation() -> None:
    rows, first = two_ways_rows("snaplab", reps=2, ram_mib=64, seed=2, rate_mib_s=20, ws_mib=8)
    assert [(r["op"], r["rep"]) for r in rows] == [("internal", 0), ("background", 0), ("internal", 1), ("background", 1)]
    assert all(r["system"] == "snaplab" and r["downtime_ms"] > 0 and r["total_s"] > 0 for r in rows)
    assert first["internal"]["downtime_ms"] == rows[0]["downtime_ms"]
