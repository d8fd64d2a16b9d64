"""A real small file system: snapshots on a 64 MiB tmpfs until it is full, then everything
again on the still-full file system.

The test mounts a tmpfs (as root) and puts the machine's disks on it.  Snapshots are taken
with QMP ``snapshot-save`` jobs, the engines of the registry in turn, the guest stopped for
each (so its RAM and disks can be fingerprinted), until a save fails; a filler file then takes
every byte left.  On that full file system: the failed job has QEMU's text, the guest runs,
every snapshot saved before is listed and loads (with every load engine of the registry) with
its saved content, a delete works and the next save reuses what it freed, ``migrate`` to a file
there fails as QEMU's does (and its partial file is given back), and ``qemu-img check`` finds
nothing wrong.  Skipped only when the kernel refuses the mount.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator.guest import WorkloadSpec
from emulator.machine import Machine
from emulator.migration.engines import LOAD_ENGINES, SAVE_ENGINES
from tests.faults.conftest import (
    DISKS,
    assert_runs,
    fill_up,
    fingerprint,
    mounted_tmpfs,
    names,
    wait_until,
)

SIZE = "64m"
WORKLOAD = WorkloadSpec("mixed", seed=21, working_set=20 << 20, batch_pages=64)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs in the test's directory (requested before ``make_vm``, it is torn down
    after the machine closed)."""
    with mounted_tmpfs(tmp_path / "tmpfs", SIZE) as mnt:
        yield mnt


def save(m: Machine, tag: str, engine: str) -> str | None:
    """snapshot-save as a QMP job; the job's error, or None."""
    q = m.qmp()
    q.execute("snapshot-save", {"job-id": f"save-{tag}", "tag": tag, "vmstate": "disk0", "devices": list(DISKS),
                                "__org.snaplab_engine": engine})
    job = q.wait_job(f"save-{tag}")
    q.execute("job-dismiss", {"id": f"save-{tag}"})
    return job.get("error")


def test_snapshots_on_a_full_tmpfs(tmpfs: Path, make_vm, qemu_img) -> None:  # type: ignore[no-untyped-def]
    # werror=report: the guest's own writes to the full disk fail back to it and it runs on
    # (QEMU's default, werror=enospc, would pause it: tests/faults/test_werror.py).
    m = make_vm(workload=WORKLOAD, sub=str(tmpfs / "w"), werror="report")
    q = m.qmp()
    files = {d: tmpfs / "w" / f"{d}.qcow2" for d in DISKS}
    saved: dict[str, dict[str, str]] = {}
    error = None
    for i in range(32):  # 64 MiB hold a few snapshots of 20 MiB of RAM each
        wait_until(lambda: int(m.ram.read_u64(0x7000)) > 500 * (i + 1), "the guest to run on")  # noqa: B023
        q.execute("stop")
        tag = f"s{i}"
        fp = fingerprint(m)
        error = save(m, tag, SAVE_ENGINES[i % len(SAVE_ENGINES)].name)
        q.execute("cont")
        if error is not None:
            break
        saved[tag] = fp
    assert error is not None and len(saved) >= 2, (error, list(saved))
    failed_tag = tag
    assert error in ("Error while writing VM state: No space left on device",  # either disk can be the one
                     *(f"Could not create snapshot '{failed_tag}' on '{d}': No space left on device" for d in DISKS)), error
    assert_runs(m)
    fill_up(tmpfs / "filler")  # not a byte left
    assert names(m) == {d: list(saved) for d in DISKS}

    # On the full file system: every snapshot loads, with every load engine, as it was saved.
    q.execute("stop")
    for k, load in enumerate(LOAD_ENGINES):
        tag = list(saved)[k % len(saved)]
        q.execute("snapshot-load", {"job-id": f"load{k}", "tag": tag, "vmstate": "disk0", "devices": list(DISKS),
                                    "__org.snaplab_engine": load.name})
        job = q.wait_job(f"load{k}", complete=True)
        assert "error" not in job, (load.name, job.get("error"))
        assert fingerprint(m) == saved[tag], (load.name, tag)
    q.execute("cont")

    # A delete works on the full file system; the next save uses what it freed, or, if that
    # is not room enough, fails as cleanly as the first.
    first = list(saved)[0]
    q.execute("snapshot-delete", {"job-id": "del", "tag": first, "devices": list(DISKS)})
    assert "error" not in q.wait_job("del")
    del saved[first]
    error = save(m, "again", SAVE_ENGINES[0].name)
    assert error in (None, "Error while writing VM state: No space left on device",
                     *(f"Could not create snapshot 'again' on '{d}': No space left on device" for d in DISKS)), error
    if error is None:
        saved["again"] = {}
    assert names(m) == {d: list(saved) for d in DISKS}
    assert_runs(m)

    # migrate to a file on the full file system: QEMU's error, the partial file given back.
    out = tmpfs / "stream"
    q.execute("migrate", {"uri": f"file:{out}"})
    wait_until(lambda: q.execute("query-migrate")["status"] in ("completed", "failed"), "the migration to end")
    info = q.execute("query-migrate")
    assert info["status"] == "failed" and info["error-desc"] == "Unable to write to file: No space left on device"
    assert out.stat().st_size == 0
    assert_runs(m)

    q.execute("stop")
    for d, path in files.items():
        res = qemu_img("check", "-U", str(path))
        assert res.returncode == 0 and "No errors were found" in res.stdout, (d, res.stdout, res.stderr)
