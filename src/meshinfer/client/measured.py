"""``PeerStats``: what a client has MEASURED of the servers it used (routes are planned on it, not on claims).

Contract: pure bookkeeping (no clock, no network, no torch): sessions feed it and the route planner
(``client.routing``) reads it. ``record_rtt(peer, s)``: the round trip of one ``Open`` (it also marks the peer
as reached: it answered this client at least once); ``record_step(peer, blocks, s, now)``: the seconds one
one-token step spent on ``peer`` running ``blocks`` blocks (from the previous hop's answer to its own, as the
client saw them: compute, queueing behind other sessions and the network together). Both are smoothed
(exponential moving averages, weight ``SMOOTHING`` for a new sample); ``block_seconds(now)`` gives the smoothed
seconds per token per block of every peer measured within the last ``max_age`` seconds (the planner's
``measured``; an older figure is dropped, so a server once measured slow, say during a burst of load, is judged
on its prior again and re-measured rather than avoided for ever), ``rtt()`` the round trips. Time is passed in
(any monotonic clock); nothing here reads the clock.
A nonsensical sample (negative, nan, infinite, no blocks) is ignored. Memory is bounded: at most ``max_peers``
peers are remembered, the least recently measured go first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshinfer.errors import ConfigError
from meshinfer.types import PeerIdStr

SMOOTHING = 0.3
"""Weight of a new sample in a smoothed estimate."""

MAX_AGE_S = 600.0
"""Seconds a step-time figure is used after its last sample."""

DEFAULT_MAX_PEERS = 10_000


@dataclass
class _Peer:
    rtt_s: float | None = None
    block_s: float | None = None
    steps: int = 0
    stepped_at: float = -math.inf


def _smooth(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - SMOOTHING) * old + SMOOTHING * sample


class PeerStats:
    """Smoothed round trips and per-block step times of the peers a client used (see the module docstring)."""

    def __init__(self, *, max_peers: int = DEFAULT_MAX_PEERS, max_age: float = MAX_AGE_S) -> None:
        if max_peers < 1:
            raise ConfigError(f"max_peers must be >= 1, got {max_peers}")
        if not max_age > 0:
            raise ConfigError(f"max_age must be > 0 seconds, got {max_age}")
        self.max_peers = max_peers
        self.max_age = max_age
        self._peers: dict[PeerIdStr, _Peer] = {}  # insertion order = least recently measured first

    def __len__(self) -> int:
        return len(self._peers)

    def _touch(self, peer_id: PeerIdStr) -> _Peer:
        entry = self._peers.pop(peer_id, None) or _Peer()
        self._peers[peer_id] = entry
        while len(self._peers) > self.max_peers:
            del self._peers[next(iter(self._peers))]
        return entry

    def record_rtt(self, peer_id: PeerIdStr, seconds: float) -> None:
        """One measured round trip to ``peer_id`` (an ``Open`` answered): smoothed, and the peer counts as reached."""
        if math.isfinite(seconds) and seconds >= 0:
            entry = self._touch(peer_id)
            entry.rtt_s = _smooth(entry.rtt_s, seconds)

    def record_step(self, peer_id: PeerIdStr, blocks: int, seconds: float, now: float) -> None:
        """One one-token step took ``seconds`` on ``peer_id`` running ``blocks`` blocks, at ``now``."""
        if blocks > 0 and math.isfinite(seconds) and seconds >= 0:
            entry = self._touch(peer_id)
            fresh = now - entry.stepped_at <= self.max_age
            entry.block_s = _smooth(entry.block_s if fresh else None, seconds / blocks)
            entry.steps += 1
            entry.stepped_at = now

    def reached(self, peer_id: PeerIdStr) -> bool:
        """Whether ``peer_id`` ever answered this client (an ``Open`` round trip or a step was measured)."""
        entry = self._peers.get(peer_id)
        return entry is not None and (entry.rtt_s is not None or entry.steps > 0)

    def steps(self, peer_id: PeerIdStr) -> int:
        """One-token steps measured on ``peer_id``."""
        entry = self._peers.get(peer_id)
        return 0 if entry is None else entry.steps

    def block_seconds(self, now: float) -> dict[PeerIdStr, float]:
        """Smoothed seconds per token per block of every peer with a step measured within ``max_age`` of ``now``
        (the planner's ``measured``)."""
        return {peer: e.block_s for peer, e in self._peers.items()
                if e.block_s is not None and now - e.stepped_at <= self.max_age}

    def rtt(self) -> dict[PeerIdStr, float]:
        """Smoothed round trips (seconds) of the peers measured so far."""
        return {peer: e.rtt_s for peer, e in self._peers.items() if e.rtt_s is not None}
