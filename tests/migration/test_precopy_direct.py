"""Pre-copy's direct path: which cluster layouts let a later round write pages in place."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from emulator.migration.precopy import PAGE, Precopy


def _contiguous(host: list[int], cluster: int, data_offset: int) -> bool:
    me = SimpleNamespace(img=SimpleNamespace(cluster_size=cluster), sparse=SimpleNamespace(data_offset=data_offset))
    return bool(Precopy._pages_contiguous(me, np.array(host, dtype=np.int64)))  # type: ignore[arg-type]


def test_a_break_in_the_header_splits_no_page_but_one_inside_a_page_does() -> None:
    cs, off = 512, 2 * PAGE  # 512-byte clusters; RAM data from stream offset 8 KiB
    run = [10_000 * cs + i * cs for i in range(64)]  # 32 KiB of host-contiguous clusters
    assert _contiguous(run, cs, off)
    header_break = run[:3] + [c + 100 * cs for c in run[3:]]  # new run at stream offset 1536: header
    assert _contiguous(header_break, cs, off)
    page_edge = run[:24] + [c + 100 * cs for c in run[24:]]  # new run at 12 KiB: a page boundary
    assert _contiguous(page_edge, cs, off)
    mid_page = run[:26] + [c + 100 * cs for c in run[26:]]  # new run at 13 KiB: inside the third page
    assert not _contiguous(mid_page, cs, off)
