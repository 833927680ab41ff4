"""``bench.wan_link``: the emulated link's delivery schedule, exactly (delay, token bucket, order, handshake)."""

from __future__ import annotations

import pytest

from meshinfer.bench.wan import parse_delays, summarise_rows
from meshinfer.bench.wan_link import LinkSchedule, ring_limit_ms
from meshinfer.errors import ConfigError


def test_delay_only_shifts_every_chunk_by_the_delay() -> None:
    link = LinkSchedule(delay_s=0.05)
    assert link.deliver_at(1.0, 100) == pytest.approx(1.05)
    assert link.deliver_at(1.001, 10**7) == pytest.approx(1.051)  # uncapped: size does not matter
    assert link.deliver_at(1.001, 1) == pytest.approx(1.051)


def test_a_burst_passes_at_once_then_the_rate_holds() -> None:
    link = LinkSchedule(delay_s=0.0, rate_bytes_s=1000.0, burst_bytes=500.0)
    assert link.release_at(0.0, 500) == pytest.approx(0.0)  # the full bucket
    assert link.release_at(0.0, 250) == pytest.approx(0.25)  # empty: waits for 250 tokens
    assert link.release_at(0.0, 1000) == pytest.approx(1.25)  # queued behind it, then 1 s of refill
    # idle long enough to refill completely, but never beyond the burst
    assert link.release_at(10.0, 600) == pytest.approx(10.1)


def test_long_run_rate_is_exact() -> None:
    link = LinkSchedule(delay_s=0.01, rate_bytes_s=1e6, burst_bytes=16384.0)
    last = 0.0
    for _ in range(1000):
        last = link.deliver_at(0.0, 10_000)  # 10 MB offered at once
    assert last == pytest.approx((10_000_000 - 16384) / 1e6 + 0.01)


def test_order_is_kept_and_a_small_chunk_never_overtakes() -> None:
    link = LinkSchedule(delay_s=0.02, rate_bytes_s=1000.0, burst_bytes=100.0)
    big = link.deliver_at(0.0, 1100)  # 1000 bytes of debt: released at 1.0
    small = link.deliver_at(0.5, 1)
    assert big == pytest.approx(1.02)
    assert small >= big
    assert small == pytest.approx(1.001 + 0.02)


def test_handshake_floor_is_three_delays() -> None:
    assert LinkSchedule(delay_s=0.05).handshake_floor(2.0) == pytest.approx(2.15)
    assert LinkSchedule().handshake_floor(2.0) == 2.0


def test_reconfigure_refills_and_refuses_bad_values() -> None:
    link = LinkSchedule(rate_bytes_s=100.0, burst_bytes=100.0)
    link.release_at(0.0, 1000)
    link.configure(0.01, 0.0)
    assert link.deliver_at(20.0, 10**6) == pytest.approx(20.01)
    for bad in ((-1.0, 0.0), (0.0, -5.0)):
        with pytest.raises(ConfigError):
            link.configure(*bad)
    with pytest.raises(ConfigError):
        LinkSchedule(burst_bytes=0.0)
    with pytest.raises(ConfigError):
        link.release_at(0.0, -1)


def test_ring_limit() -> None:
    assert ring_limit_ms(30.0, 10.0, 4) == 70.0
    assert ring_limit_ms(30.0, 0.0, 4) == 30.0
    with pytest.raises(ConfigError):
        ring_limit_ms(30.0, 10.0, 0)


def test_parse_delays_adds_zero_and_sorts() -> None:
    assert parse_delays("50,10") == [0.0, 10.0, 50.0]
    assert parse_delays("0") == [0.0]
    for bad in ("x", "-1", "2000"):
        with pytest.raises(ConfigError):
            parse_delays(bad)


def test_rows_get_the_limit_and_ratio() -> None:
    rows = {0.0: {"decode_ms_per_token": 30.0, "time_to_first_token_ms": 100.0},
            10.0: {"decode_ms_per_token": 80.0, "time_to_first_token_ms": 180.0}}
    summarise_rows(rows, hops=4)
    assert rows[10.0]["limit_ms_per_token"] == 70.0
    assert rows[10.0]["ratio_to_limit"] == pytest.approx(70.0 / 80.0)
    assert rows[10.0]["extra_ms_per_token_over_limit"] == pytest.approx(10.0)
    assert rows[10.0]["ttft_delays"] == pytest.approx(8.0)
    assert rows[0.0]["ratio_to_limit"] == 1.0 and rows[0.0]["ttft_delays"] is None


def test_parts_split_a_token() -> None:
    from meshinfer.bench.wan import parts

    out = parts(ms_per_token=100.0, delay_ms=10.0, hops=4, route_ms=90.0, server_ms=[10.0, 12.0, 8.0])
    assert out == {"client_ms": 10.0, "route_ms": 90.0, "server_steps_ms": 30.0, "between_servers_ms": 60.0,
                   "ring_delays_ms": 40.0, "between_beyond_ring_ms": 20.0}
    assert parts(ms_per_token=1.0, delay_ms=0.0, hops=4, route_ms=None, server_ms=[1.0]) is None
    assert parts(ms_per_token=1.0, delay_ms=0.0, hops=4, route_ms=1.0, server_ms=[None]) is None
