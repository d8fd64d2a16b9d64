"""lab.uffd_steps: the bulk contents check and the fill cases (needs userfaultfd; skipped without)."""

from __future__ import annotations

import ctypes

import pytest

from lab import uffd_steps as us


def test_range_holds_sees_one_wrong_byte() -> None:
    s = us.Scratch(us.HUGE)
    try:
        assert us.range_holds(s.addr, s.size, 1)
        ctypes.memset(s.addr + s.size // 3, 7, 1)
        assert not us.range_holds(s.addr, s.size, 1)
    finally:
        s.close()


def test_fill_costs_rows() -> None:
    if not us.kernel_offer().get("available"):
        pytest.skip("userfaultfd not available")
    rows = us.fill_costs(size=4 << 20, reps=1)
    assert rows and all(r["contents_right"] and r["bytes_filled"] == 4 << 20 for r in rows)
    assert {r["calls"] for r in rows if r["step"] == "2 MiB"} == {2}


def test_fault_granules_draws_a_point_per_run_and_a_median_per_group() -> None:
    from lab import plot

    rows = [{"writes": w, "granule": g, "faults": f, "writer_ms": t}
            for w, g, f, t in ((2000, "4 KiB", 1900, 150.0), (2000, "4 KiB", 1880, 160.0),
                               (2000, "2 MiB", 32, 9.0), (10, "4 KiB", 10, 1.2), (10, "2 MiB", 9, 1.9))]
    fig = plot.fault_granules(rows)
    ax = fig.axes[0]
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted(["median: 1890 faults, 155.0 ms", "median: 32 faults, 9.0 ms",
                             "median: 10 faults, 1.2 ms", "median: 9 faults, 1.9 ms"])
    assert len(ax.collections) == 8  # the runs of each of the four groups, and its median's ring
