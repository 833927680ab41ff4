"""When an emulated WAN link delivers each chunk: the pure schedule behind ``bench.wan_relay``.

Contract: ``LinkSchedule(delay_s, rate_bytes_s, burst_bytes)`` models one direction of one link as a token
bucket (the bandwidth cap: ``rate_bytes_s`` bytes/s refill, at most ``burst_bytes`` saved up; ``0`` = no cap)
followed by a fixed one-way propagation delay. ``deliver_at(now, nbytes)`` is told each chunk as it arrives
(times in seconds on any monotonic clock, non-decreasing) and returns when the far end must receive it:
``release + delay_s``, where ``release`` is the first moment the bucket holds ``nbytes`` tokens, never before
the previous chunk's release (order kept: chunks leave in arrival order, none overtakes another). A chunk
larger than the burst borrows: the bucket goes into debt and the next chunk waits until it is repaid, so the
long-run rate is exactly ``rate_bytes_s``. ``handshake_floor(accepted_at)`` is the earliest time data from a
connection's dialler may arrive at the far end on a real link: a TCP handshake takes one round trip before the
dialler can send, and its first byte then takes one more one-way delay (3 delays after the SYN left).

What it does not model (see ``bench.wan_relay``): loss, jitter, reordering, queue limits of routers, and TCP's
own behaviour on a long link (slow start, window limits): the relay's TCP legs run over loopback.

``ring_limit_ms`` is the physical limit of a token (compute + one ring of delays); ``spec_limit_ms`` the same
shared by the tokens one speculative trip yields.

Pure: no sockets, no clock of its own, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshinfer.errors import ConfigError

DEFAULT_BURST_BYTES = 16 * 1024
"""Bytes a capped link may send back to back at once (a small router burst; one hidden state of a 4k model)."""


@dataclass
class LinkSchedule:
    """One direction of one emulated link (see the module doc). Mutable: it remembers the bucket's state."""

    delay_s: float = 0.0
    rate_bytes_s: float = 0.0
    """The bandwidth cap in bytes/s; 0: uncapped (chunks released as they arrive)."""
    burst_bytes: float = DEFAULT_BURST_BYTES
    _tokens: float = field(default=0.0, init=False)
    _last: float | None = field(default=None, init=False)
    _last_release: float = field(default=float("-inf"), init=False)

    def __post_init__(self) -> None:
        self.configure(self.delay_s, self.rate_bytes_s, self.burst_bytes)

    def configure(self, delay_s: float, rate_bytes_s: float, burst_bytes: float | None = None) -> None:
        """Change the link (takes effect for chunks arriving from now on; the bucket starts full)."""
        if not delay_s >= 0.0:
            raise ConfigError(f"a link's one-way delay must be >= 0 s, got {delay_s}")
        if not rate_bytes_s >= 0.0:
            raise ConfigError(f"a link's bandwidth must be >= 0 bytes/s (0: uncapped), got {rate_bytes_s}")
        burst = self.burst_bytes if burst_bytes is None else burst_bytes
        if not burst > 0.0:
            raise ConfigError(f"a link's burst must be > 0 bytes, got {burst}")
        self.delay_s, self.rate_bytes_s, self.burst_bytes = delay_s, rate_bytes_s, burst
        self._tokens = burst
        self._last = None

    def release_at(self, now: float, nbytes: int) -> float:
        """When a chunk of ``nbytes`` arriving at ``now`` leaves the bucket (before the propagation delay)."""
        if nbytes < 0:
            raise ConfigError(f"a chunk cannot have {nbytes} bytes")
        start = max(now, self._last_release)
        if self.rate_bytes_s <= 0.0:
            release = start
        else:
            if self._last is not None:
                self._tokens = min(self.burst_bytes, self._tokens + (start - self._last) * self.rate_bytes_s)
            self._tokens -= nbytes
            # in debt: released once the refill has paid it back (the next chunk then starts from 0 tokens)
            release = start if self._tokens >= 0.0 else start - self._tokens / self.rate_bytes_s
            if self._tokens < 0.0:
                self._tokens = 0.0
            self._last = release
        self._last_release = release
        return release

    def deliver_at(self, now: float, nbytes: int) -> float:
        """When the far end receives a chunk of ``nbytes`` arriving at ``now``: its release plus the delay."""
        return self.release_at(now, nbytes) + self.delay_s

    def handshake_floor(self, accepted_at: float) -> float:
        """Earliest arrival at the far end of the dialler's data on a connection accepted at ``accepted_at``:
        SYN (one delay), SYN-ACK (another), then the data itself (a third)."""
        return accepted_at + 3 * self.delay_s


def ring_limit_ms(compute_ms: float, delay_ms: float, hops: int) -> float:
    """The physical limit of one token's time: ``compute_ms`` (measured with no delay) plus one ring of
    ``hops`` one-way delays (client -> server 1 -> ... -> server k -> client: k + 1 hops with push routes)."""
    if hops < 1 or compute_ms < 0 or delay_ms < 0:
        raise ConfigError("need hops >= 1, compute_ms >= 0 and delay_ms >= 0")
    return compute_ms + hops * delay_ms


def spec_limit_ms(limit_ms: float, tokens_per_trip: float) -> float:
    """The physical limit of a token with speculative decoding: the limit of one trip (``ring_limit_ms``: compute
    plus one ring of delays) shared by the ``tokens_per_trip`` tokens each trip yields on average (>= 1)."""
    if limit_ms < 0 or not tokens_per_trip >= 1:
        raise ConfigError("need limit_ms >= 0 and tokens_per_trip >= 1")
    return limit_ms / tokens_per_trip
