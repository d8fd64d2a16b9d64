"""Teardown under stress: machines quit, closed or signalled at random points of every
engine's save and load, a lazy fill and ``migrate``, in-process and as ``snaplab-system``
processes.  0 hangs (every wait bounded), 0 deaths by signal, and threads, fds,
userfaultfd registrations and RSS flat (generous bounds, no timing).  The 1000-cycle
version with a summary is bench/stress_teardown.py."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulator.errors import UffdUnavailable
from emulator.uffd import UserFaultFD
from tests.stress.cycles import Tally, in_process_cycle, process_cycle, sample, scenarios

WARMUP = 10
CYCLES = 80
PROCESSES = 12


def uffd_or_skip() -> None:
    try:
        UserFaultFD().close()
    except UffdUnavailable as err:
        pytest.skip(f"the kernel refuses userfaultfd here: {err}")


def test_in_process_teardown_at_random_points_hangs_never_and_leaks_nothing(tmp_path: Path) -> None:
    uffd_or_skip()
    rng = random.Random(2020)
    tally = Tally()
    for i in range(WARMUP):  # the pools (workers, chunk buffers) reach their size
        (tmp_path / f"w{i}").mkdir()
        in_process_cycle(tmp_path / f"w{i}", rng, tally)
    before = sample()
    for i in range(CYCLES):
        (tmp_path / f"c{i}").mkdir()
        in_process_cycle(tmp_path / f"c{i}", rng, tally)
    after = sample()
    assert tally.hangs == 0 and tally.failures == [], tally
    assert set(tally.by_scenario) == set(scenarios())  # every engine, migrate and idle were hit
    assert after.threads <= before.threads + 8, (before, after)
    assert after.fds <= before.fds + 4, (before, after)
    assert after.uffd_fds <= before.uffd_fds and after.uffd_ranges <= before.uffd_ranges, (before, after)
    # One machine's RAM is 32 MiB: a machine (or its chunk buffers) kept per cycle would add GiBs.
    assert after.rss_kib <= before.rss_kib + 192 * 1024, (before, after)


def test_snaplab_system_signalled_at_random_points_exits_cleanly(tmp_path: Path) -> None:
    uffd_or_skip()
    rng = random.Random(2021)
    tally = Tally()
    for i in range(PROCESSES):
        (tmp_path / f"p{i}").mkdir()
        process_cycle(tmp_path / f"p{i}", rng, tally)
    assert tally.hangs == 0 and tally.signal_deaths == 0 and tally.bad_exits == 0, tally


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_is_a_shutdown_request_as_in_qemu(tmp_path: Path, sig: signal.Signals) -> None:
    """QEMU's termsig_handler: SHUTDOWN {"guest": false, "reason": "host-signal"}, exit 0."""
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen([sys.executable, "-m", "emulator.cli", "-m", "32M", "-snaplab-workload", "dirty,seed=1",
                             "-qmp", f"unix:{sock},server=on,wait=off"], stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.stderr else b""
            time.sleep(0.01)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(str(sock))
        f = s.makefile("rwb")
        f.readline()
        f.write(b'{"execute": "qmp_capabilities"}\n')
        f.flush()
        assert "return" in json.loads(f.readline())
        proc.send_signal(sig)
        events = [json.loads(line) for line in f]
        assert proc.wait(60) == 0
        shutdown = [e for e in events if e.get("event") == "SHUTDOWN"]
        assert [e["data"] for e in shutdown] == [{"guest": False, "reason": "host-signal"}], events
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
