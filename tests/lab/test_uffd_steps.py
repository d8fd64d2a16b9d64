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


def test_copy_before_release_keeps_the_stop_instant_and_release_first_loses_it() -> None:
    right, wrong = (us.copy_order(o) for o in us.COPY_ORDERS)
    for r in (right, wrong):
        assert r["fault_write"] and r["fault_wp"] and r["fault_page"] == 5
        assert r["page_byte_now"] == us.NEW  # the writer's store went through either way
    assert right["snapshot_byte"] == us.OLD and right["snapshot_kept_the_stop_instant"]
    assert wrong["snapshot_byte"] == us.NEW and not wrong["snapshot_kept_the_stop_instant"]
    with pytest.raises(ValueError, match="order"):
        us.copy_order("never")


@pytest.mark.parametrize("fill", ["UFFDIO_COPY", "UFFDIO_ZEROPAGE"])
def test_a_missing_page_read_waits_for_the_fill_and_sees_it(fill: str) -> None:
    r = us.missing_fault(fill)
    assert not r["fault_write"] and not r["fault_wp"] and r["fault_page"] == 9
    assert r["filled_bytes"] == 4096
    assert r["reader_read"] == (us.FILLED if fill == "UFFDIO_COPY" else 0)
    assert r["pages_with_an_entry_before"] == 0 and r["pages_with_an_entry_after"] == 1
    assert r["reader_waited_ms"] > 0


def test_without_the_wait_copy_first_is_never_wrong() -> None:
    assert us.copy_order_trials(us.COPY_ORDERS[0], trials=200)["snapshots_wrong"] == 0
    r = us.copy_order_trials(us.COPY_ORDERS[1], trials=20)
    assert r["trials"] == 20 and 0 <= r["snapshots_wrong"] <= 20
