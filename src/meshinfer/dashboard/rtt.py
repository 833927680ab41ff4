"""Round trips from the dashboard's node to the servers it shows: which to measure next, and the cache.

Contract: ``RttCache`` is pure bookkeeping with the time passed in (no clock, no network): it remembers the
last round trip measured to each peer (or that the last try failed), says which peers are ``due`` for a new
measurement (never measured first, then the stalest, at most ``limit`` per round, so 200 servers never cost
200 pings at once), and forgets peers that left the swarm. ``ping_server`` measures one round trip for real:
it opens a ``meshinfer/session/1`` stream to the server (direct plane first, libp2p as fallback, as clients
do), sends ``Ping`` and times the ``Pong`` (the best of ``PINGS``; the connection set-up is not counted);
a block server answers ``Ping`` before any ``Open``, so no session and no KV memory is involved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshinfer.errors import ConfigError, TransportError

PINGS = 2
"""Pings per measurement (the best one counts: the first may pay for a cold path)."""


@dataclass(frozen=True)
class RttEntry:
    rtt_s: float | None
    """The last measured round trip in seconds; None when the last try failed."""
    measured_at: float


class RttCache:
    """Last round trip per peer, and which peers to measure next."""

    def __init__(self, *, max_age: float = 30.0, retry_after: float = 15.0) -> None:
        if not (max_age > 0 and retry_after > 0):
            raise ConfigError("max_age and retry_after must be > 0 seconds")
        self.max_age = max_age
        self.retry_after = retry_after
        self._entries: dict[str, RttEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def due(self, peers: Iterable[str], now: float, limit: int) -> list[str]:
        """Up to ``limit`` of ``peers`` to measure now: never measured (in the given order), then those whose
        measurement is older than ``max_age`` (or whose failed try is older than ``retry_after``), stalest first."""
        fresh: list[str] = []
        stale: list[tuple[float, str]] = []
        for peer in dict.fromkeys(peers):
            entry = self._entries.get(peer)
            if entry is None:
                fresh.append(peer)
                continue
            age = now - entry.measured_at
            if age >= (self.max_age if entry.rtt_s is not None else self.retry_after):
                stale.append((entry.measured_at, peer))
        stale.sort()
        return (fresh + [peer for _, peer in stale])[:max(0, limit)]

    def record(self, peer: str, rtt_s: float | None, now: float) -> None:
        """The result of one measurement of ``peer`` (None: it failed)."""
        if rtt_s is not None and not (math.isfinite(rtt_s) and rtt_s >= 0):
            rtt_s = None
        self._entries[peer] = RttEntry(rtt_s, now)

    def forget_others(self, present: Iterable[str]) -> None:
        """Drop every peer not in ``present`` (servers that left the swarm)."""
        keep = set(present)
        for peer in [p for p in self._entries if p not in keep]:
            del self._entries[peer]

    def rtt_ms(self) -> dict[str, float | None]:
        """Peer id -> last round trip in milliseconds (None when its last try failed)."""
        return {peer: None if e.rtt_s is None else round(e.rtt_s * 1000.0, 3) for peer, e in self._entries.items()}


async def ping_server(node: Any, server: Mapping[str, Any], *, timeout: float = 3.0) -> float:
    """Seconds of one ``Ping``/``Pong`` round trip to ``server`` (a swarm-document server entry) from ``node``
    (a started ``PeerNode``); ``TransportError`` when it cannot be reached or answers wrongly."""
    from meshinfer.p2p import SESSION_PROTOCOL
    from meshinfer.wire.messages import Ping, Pong

    stream = await node.open_stream(server["peer_id"], SESSION_PROTOCOL, maddrs=server.get("addresses") or (),
                                    direct=server.get("direct_addresses") or (), timeout=timeout)
    try:
        best = math.inf
        for seq in range(PINGS):
            started = time.perf_counter()
            await stream.send(Ping(seq=seq))
            reply = await stream.recv(timeout)
            if not isinstance(reply, Pong) or reply.seq != seq:
                raise TransportError(f"peer {server['peer_id']} answered a ping with {type(reply).__name__}")
            best = min(best, time.perf_counter() - started)
        return best
    finally:
        await stream.close(timeout=0.5)
