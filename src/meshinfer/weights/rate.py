"""Rate limiting of piece transfers: a token bucket that a seeder's uploads (``--max-upload``) or a
fetch's downloads (``--max-download``) draw from.

Contract: ``RateLimiter(rate, burst)`` lets ``rate`` bytes per second through on average, with at most
``burst`` bytes of saved-up credit (default: a quarter second of rate, at least one piece). ``reserve(n,
now)`` is the pure part: it books ``n`` bytes at time ``now`` and returns how many seconds the caller
must wait before sending them (0 when credit covers them); bookings beyond the credit become a debt
that later bookings queue behind, so any number of concurrent uploads share the rate fairly, in
booking order. ``take(n)`` books and sleeps, and returns the seconds it slept. Knows nothing of
peers or pieces.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from meshinfer.errors import ConfigError

MB = 1_000_000


class RateLimiter:
    """A token bucket of ``rate`` bytes/s (see the module docstring)."""

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ConfigError(f"a transfer rate must be > 0 bytes/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(self.rate / 4, 1 << 20)
        if not self.burst > 0:
            raise ConfigError(f"a rate limiter's burst must be > 0 bytes, got {burst}")
        self._clock = clock
        self._tokens = self.burst
        self._last: float | None = None

    def reserve(self, n: int, now: float) -> float:
        """Book ``n`` bytes at ``now``; the seconds to wait before sending them."""
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        return max(0.0, -self._tokens / self.rate)

    async def take(self, n: int) -> float:
        """Wait until ``n`` more bytes may be moved; the seconds waited."""
        delay = self.reserve(n, self._clock())
        if delay > 0:
            await asyncio.sleep(delay)
        return delay
