"""The seeders' upload token bucket (pure, with a fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from meshinfer.errors import ConfigError
from meshinfer.weights.rate import RateLimiter


def test_credit_covers_a_burst_then_the_rate_holds() -> None:
    limiter = RateLimiter(100.0, burst=50.0)
    assert limiter.reserve(50, 0.0) == 0.0  # the saved-up credit
    assert limiter.reserve(100, 0.0) == pytest.approx(1.0)  # 100 bytes more at 100 B/s
    assert limiter.reserve(100, 0.0) == pytest.approx(2.0)  # queued behind the first debt


def test_concurrent_uploads_share_the_rate_in_booking_order() -> None:
    limiter = RateLimiter(1000.0, burst=1.0)
    waits = [limiter.reserve(100, 10.0) for _ in range(10)]
    assert waits == sorted(waits)
    assert waits[-1] == pytest.approx((10 * 100 - 1) / 1000)  # 1000 bytes (less the credit) take about 1 s


def test_idle_time_refills_credit_up_to_the_burst_only() -> None:
    limiter = RateLimiter(100.0, burst=50.0)
    limiter.reserve(50, 0.0)
    assert limiter.reserve(50, 0.5) == 0.0  # 0.5 s refilled 50 bytes
    assert limiter.reserve(50, 100.0) == 0.0  # a long idle refills only up to the burst...
    assert limiter.reserve(10, 100.0) == pytest.approx(0.1)  # ...so the next bytes wait


def test_default_burst_is_a_quarter_second_or_one_piece() -> None:
    assert RateLimiter(100e6).burst == 25e6
    assert RateLimiter(1e6).burst == 1 << 20


def test_take_sleeps_off_the_debt() -> None:
    now = [0.0]
    limiter = RateLimiter(1e6, burst=1.0, clock=lambda: now[0])

    async def main() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await limiter.take(20_000)  # 20 ms at 1 MB/s
        return loop.time() - start

    assert asyncio.run(main()) >= 0.015


@pytest.mark.parametrize("rate, burst", [(0.0, None), (-1.0, None), (float("nan"), None), (10.0, 0.0)])
def test_bad_settings_are_refused(rate: float, burst: float | None) -> None:
    with pytest.raises(ConfigError):
        RateLimiter(rate, burst)
