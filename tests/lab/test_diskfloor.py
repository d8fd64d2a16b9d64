"""lab/diskfloor.py: the bare reads that give a restore measurement its disk reference."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from lab.diskfloor import CHUNK, _open, data_span, disk_floor, read_span
from lab.restore import disk_pairs, disk_summary


def _image(tmp: Path, chunks: int) -> tuple[Path, bytes]:
    data = np.random.default_rng(7).integers(0, 256, chunks * CHUNK, dtype=np.uint8).tobytes()
    p = tmp / "img"
    p.write_bytes(data)
    return p, data


@pytest.mark.parametrize(("block", "threads", "seed"), [(CHUNK, 1, 3), (4 * CHUNK, 3, None), (CHUNK, 4, 1)])
def test_a_span_is_read_whole_and_in_place(tmp_path: Path, block: int, threads: int, seed: int | None) -> None:
    p, data = _image(tmp_path, 8)
    mem = mmap.mmap(-1, 5 * CHUNK)
    buf = memoryview(mem)
    fd, _ = _open(p)
    try:
        assert read_span(fd, CHUNK, buf, block, threads, seed) > 0
        assert bytes(buf) == data[CHUNK:6 * CHUNK]  # every block at its place, none twice, none left out
    finally:
        os.close(fd)
        buf.release()
        mem.close()


def test_the_span_is_the_files_middle_in_whole_chunks(tmp_path: Path) -> None:
    p, _ = _image(tmp_path, 9)
    assert data_span(p, 3 * CHUNK) == (3 * CHUNK, 3 * CHUNK)
    assert data_span(p, 3 * CHUNK + 5) == (3 * CHUNK, 3 * CHUNK)  # whole chunks only
    assert data_span(p, 100 * CHUNK) == (0, 9 * CHUNK)  # a short file: all of it


def test_the_span_is_inside_the_longest_data_extent(tmp_path: Path) -> None:
    p = tmp_path / "sparse"
    with open(p, "wb") as f:  # data in chunks 1-2 and 5-9 (holes between), then a hole to chunk 16
        f.truncate(16 * CHUNK)
        for first, n in ((1, 2), (5, 5)):
            f.seek(first * CHUNK)
            f.write(b"\x01" * (n * CHUNK))
    assert data_span(p, 3 * CHUNK) == (6 * CHUNK, 3 * CHUNK)
    assert data_span(p, 40 * CHUNK) == (5 * CHUNK, 5 * CHUNK)


def test_no_data_or_no_bytes_is_refused_by_name(tmp_path: Path) -> None:
    p = tmp_path / "hole"
    with open(p, "wb") as f:
        f.truncate(8 * CHUNK)  # all hole
    with pytest.raises(ValueError, match="no data extent"):
        data_span(p, 2 * CHUNK)
    small = tmp_path / "small"
    small.write_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match="no data extent"):
        data_span(small, 2 * CHUNK)
    with pytest.raises(ValueError, match="nbytes"):
        data_span(small, 0)


def test_the_floor_times_both_ways_and_the_summary_sets_policies_beside_it(tmp_path: Path) -> None:
    p, _ = _image(tmp_path, 16)
    rows = [disk_floor(p, 8 * CHUNK, seed=1, parallel_first=first) | {"run": i} for i, first in enumerate((True, False))]
    for r in rows:
        assert r["bytes"] == 8 * CHUNK and r["offset"] == 4 * CHUNK
        assert r["serial_ms"] > 0 and r["parallel_ms"] > 0
    # hand-made rows: medians of the reads, and each policy's to90 over the right one
    disk = [{"parallel_ms": 40.0, "serial_ms": 100.0, "bytes": 256 << 20, "page_cache": False},
            {"parallel_ms": 60.0, "serial_ms": 140.0, "bytes": 256 << 20, "page_cache": False}]
    summary = {"prefetch": {"to90_ms": 55.0}, "background": {"to90_ms": 150.0}, "ondemand": {"to90_ms": 180.0},
               "blocking": {"to90_ms": 700.0}}
    s = disk_summary(disk, summary, parallel=("prefetch", "background"), serial=("background", "ondemand"))
    assert s["parallel_ms"] == 50.0 and s["serial_ms"] == 120.0 and s["mib"] == 256.0
    assert s["prefetch_over_parallel"] == pytest.approx(1.1)
    assert s["background_over_serial"] == pytest.approx(1.25) and s["ondemand_over_serial"] == pytest.approx(1.5)
    assert s["background_over_parallel"] == pytest.approx(3.0) and s["errors"] == 0
    assert (s["parallel_min_ms"], s["parallel_max_ms"], s["serial_min_ms"], s["serial_max_ms"]) == (40, 60, 100, 140)
    assert "blocking_over_parallel" not in s  # only the policies named
    assert disk_summary([], summary) == {}
    # a run whose reads failed is left out of the medians and counted
    failed = {"run": 2, "error": "OSError: short read"}
    assert disk_summary([*disk, failed], summary)["parallel_ms"] == 50.0
    assert disk_summary([*disk, failed], summary)["errors"] == 1
    assert disk_summary([failed], summary) == {"errors": 1}


def test_pairs_set_each_runs_loads_beside_its_own_reads() -> None:
    disk = [{"run": 0, "parallel_ms": 100.0, "serial_ms": 150.0}, {"run": 1, "error": "ValueError: no data"},
            {"run": 2, "parallel_ms": 200.0, "serial_ms": 220.0}]
    rows = [{"run": 0, "policy": "prefetch", "prefetch_s": 0.09, "to90_ms": 80.0},
            {"run": 0, "policy": "background", "to90_ms": 200.0},
            {"run": 1, "policy": "prefetch", "prefetch_s": 0.1, "to90_ms": 90.0},
            {"run": 1, "policy": "background", "to90_ms": 180.0},
            {"run": 2, "policy": "prefetch", "prefetch_s": 0.25, "to90_ms": 250.0},
            {"run": 2, "policy": "background", "to90_ms": 300.0}]
    pairs = disk_pairs(rows, disk, "prefetch", "background")
    assert [p["run"] for p in pairs] == [0, 2]  # the run without reads has no pair
    assert pairs[0]["set_over_parallel"] == pytest.approx(0.9) and pairs[0]["to90_ratio"] == pytest.approx(2.5)
    assert pairs[1]["set_over_parallel"] == pytest.approx(1.25) and pairs[1]["serial_over_parallel"] == pytest.approx(1.1)


def test_a_failed_read_is_raised_and_leaves_the_buffer_free(tmp_path: Path) -> None:
    p, _ = _image(tmp_path, 2)
    mem = mmap.mmap(-1, 4 * CHUNK)
    buf = memoryview(mem)
    fd, _ = _open(p)
    try:
        with pytest.raises(OSError, match="short read"):  # the file ends inside the span
            read_span(fd, 0, buf, CHUNK, 3)
    finally:
        os.close(fd)
    buf.release()
    mem.close()  # no read left a view of it behind (BufferError otherwise)
