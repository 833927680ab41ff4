"""Ban list: peers that failed are avoided for a while, with exponential backoff (architecture.md section 7).

Contract: pure bookkeeping. Time is always passed in (``now``, in seconds on any monotonic clock the
caller picks); nothing here reads the clock, sleeps, or touches the network. A peer's first failure
bans it for ``base_s``, each consecutive failure multiplies the ban by ``factor`` up to ``max_s``, and
one success forgives it entirely. Memory is bounded: entries whose ban ended more than ``forget_s``
ago are dropped (their count starts afresh), and at most ``max_peers`` peers are kept (the least
recently failed go first). Bad settings raise ``ConfigError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshinfer.errors import ConfigError
from meshinfer.types import PeerIdStr

DEFAULT_MAX_PEERS = 10_000


@dataclass
class _Entry:
    failures: int
    length_s: float
    until: float


class BanList:
    """Per-peer failure counts and ban deadlines (see module doc)."""

    def __init__(
        self,
        *,
        base_s: float = 1.0,
        max_s: float = 60.0,
        factor: float = 2.0,
        forget_s: float | None = None,
        max_peers: int = DEFAULT_MAX_PEERS,
    ) -> None:
        """``forget_s`` (default ``10 * max_s``): how long after its ban ends a peer's record is kept."""
        for name, value in (("base_s", base_s), ("max_s", max_s), ("factor", factor)):
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"ban {name} must be a finite number > 0, got {value}")
        if max_s < base_s:
            raise ConfigError(f"ban max_s ({max_s}) must be >= base_s ({base_s})")
        if factor < 1:
            raise ConfigError(f"ban factor must be >= 1 (bans never shrink), got {factor}")
        forget = 10 * max_s if forget_s is None else forget_s
        if not math.isfinite(forget) or forget < 0:
            raise ConfigError(f"ban forget_s must be a finite number >= 0, got {forget_s}")
        if max_peers < 1:
            raise ConfigError(f"ban list max_peers must be >= 1, got {max_peers}")
        self.base_s = base_s
        self.max_s = max_s
        self.factor = factor
        self.forget_s = forget
        self.max_peers = max_peers
        self._entries: dict[PeerIdStr, _Entry] = {}  # insertion order = least recently failed first

    def __len__(self) -> int:
        """Peers currently remembered (banned or with a failure count)."""
        return len(self._entries)

    def fail(self, peer_id: PeerIdStr, now: float) -> float:
        """Record a failure of ``peer_id`` at ``now``; return the length of the ban it starts (seconds)."""
        self._forget_stale(now)
        entry = self._entries.pop(peer_id, None)
        if entry is None:
            length = self.base_s
            entry = _Entry(failures=1, length_s=length, until=now + length)
        else:
            length = min(entry.length_s * self.factor, self.max_s)
            entry = _Entry(failures=entry.failures + 1, length_s=length, until=max(entry.until, now + length))
        self._entries[peer_id] = entry  # re-inserted: now the most recently failed
        while len(self._entries) > self.max_peers:
            del self._entries[next(iter(self._entries))]
        return length

    def succeed(self, peer_id: PeerIdStr) -> None:
        """``peer_id`` worked: forget its failures and lift any ban."""
        self._entries.pop(peer_id, None)

    def failures(self, peer_id: PeerIdStr) -> int:
        """Consecutive failures remembered for ``peer_id`` (0 if none)."""
        entry = self._entries.get(peer_id)
        return 0 if entry is None else entry.failures

    def is_banned(self, peer_id: PeerIdStr, now: float) -> bool:
        entry = self._entries.get(peer_id)
        return entry is not None and now < entry.until

    def banned(self, now: float) -> set[PeerIdStr]:
        """Peers banned at ``now`` (pass it as a route planner's ``exclude``); also drops stale entries."""
        self._forget_stale(now, sweep=True)
        return {peer for peer, entry in self._entries.items() if now < entry.until}

    def until(self, peer_id: PeerIdStr) -> float | None:
        """When ``peer_id``'s latest ban ends (possibly in the past), or None if it is not remembered."""
        entry = self._entries.get(peer_id)
        return None if entry is None else entry.until

    def _forget_stale(self, now: float, *, sweep: bool = False) -> None:
        """Drop entries whose ban ended more than ``forget_s`` before ``now``.

        Cheap by default: only from the least recently failed end while they are stale (amortised O(1)
        per failure). ``sweep`` checks every entry.
        """
        horizon = now - self.forget_s
        if sweep:
            for peer in [p for p, e in self._entries.items() if e.until < horizon]:
                del self._entries[peer]
            return
        while self._entries:
            oldest = next(iter(self._entries))
            if self._entries[oldest].until >= horizon:
                break
            del self._entries[oldest]
