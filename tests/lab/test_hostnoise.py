"""lab/hostnoise.py: the spread of a rate series, and the probes' shape."""

import pytest

from lab.hostnoise import WINDOW_S, describe, host_noise, probe, spread


def test_spread_by_hand() -> None:
    s = spread([1.0, 2.0, 3.0, 4.0])
    assert s["median"] == 2.5  # the midpoint for an even count
    assert s["min"] == 1.0 and s["max"] == 4.0 and s["windows"] == 4
    assert s["below90"] == 0.5  # 1 and 2 are under 2.25
    assert s["p10"] == pytest.approx(1.3) and s["p90"] == pytest.approx(3.7)


def test_a_steady_series_has_no_window_below_90_percent() -> None:
    assert spread([10.0, 9.5, 10.5, 9.1])["below90"] == 0.0


def test_spread_refuses_an_empty_series() -> None:
    with pytest.raises(ValueError, match="no windows"):
        spread([])


def test_probe_reports_windows_and_their_spread() -> None:
    p = probe(0.2, 0.25, stride=64)
    assert p["window_s"] == WINDOW_S and p["buf_mib"] == 0.25 and p["stride"] == 64
    # 0.2 s of 20 ms windows, the last one past the end (fewer if the host descheduled the probe)
    assert p["windows"] == len(p["rates_mups"]) >= 2
    assert p["min"] <= p["median"] <= p["max"] and p["min"] > 0
    assert p["median"] == pytest.approx(spread(p["rates_mups"])["median"], rel=1e-3)


@pytest.mark.parametrize("seconds,mib,stride", [(0, 1, 8), (1, 0, 8), (-1, 1, 8), (1, 1, 12), (1, 1, 0)])
def test_probe_refuses_a_non_positive_size_or_time_or_a_bad_stride(seconds: float, mib: float, stride: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        probe(seconds, mib, stride)


def test_host_noise_names_its_three_probes_in_its_line() -> None:
    n = host_noise(0.3, 3)
    assert set(n) == {"core", "cache", "unicorn"} and n["cache"]["buf_mib"] == 3
    assert n["unicorn"]["buf_mib"] == 2  # rounded down to a power of two
    line = describe(n)
    assert "core (0.25 MiB)" in line and "cache (3 MiB)" in line and "unicorn (2 MiB)" in line


def test_the_bare_loop_bytes_match_their_assembly() -> None:
    pytest.importorskip("keystone")
    from emulator.guest import assemble
    from lab.hostnoise import BARE_LOOP_ASM, BARE_LOOP_BASE, BARE_LOOP_CODE

    assert assemble(BARE_LOOP_ASM, BARE_LOOP_BASE) == BARE_LOOP_CODE


def test_the_unicorn_probe_counts_the_loops_writes() -> None:
    from lab.hostnoise import unicorn_probe

    p = unicorn_probe(0.2, 1)
    assert p["buf_mib"] == 1 and p["windows"] == len(p["rates_mups"]) >= 2
    # every slice counted writes, and at no absurd rate: the loop is 14 instructions, one write each
    assert 0 < p["min"] <= p["max"] < 1000


@pytest.mark.parametrize("seconds,mib", [(0, 1), (1, 3), (1, 0)])
def test_the_unicorn_probe_wants_positive_time_and_a_power_of_two(seconds: float, mib: int) -> None:
    from lab.hostnoise import unicorn_probe

    with pytest.raises(ValueError, match="power of two"):
        unicorn_probe(seconds, mib)
