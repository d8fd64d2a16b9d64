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
