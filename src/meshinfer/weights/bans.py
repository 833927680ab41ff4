"""Peers to avoid for a while: failing peers back off exponentially, misbehaving peers are banned.

Contract: pure bookkeeping, shared by the client's failover (architecture.md section 7) and the weight
fetches (``weights.plan``). Time is always passed in (``now``, in seconds on any monotonic clock the caller
picks); nothing here reads the clock, sleeps, or touches the network. Two reasons to avoid a peer:

- it FAILED (``fail``: unreachable, broke a stream, stalled): its first failure makes it back off for
  ``base_s``, each consecutive failure multiplies that by ``factor`` up to ``max_s`` (a late report of an
  older failure never shortens a backoff), and one success (``succeed``) forgives it entirely;
- it MISBEHAVED (``ban``: sent bytes that do not verify, or announced what it does not serve): it is banned
  for ``ban_s``, whatever it does meanwhile (a success does not lift a ban); with ``ban_factor`` > 1 each
  ban of a peer banned before (within ``forget_s`` of its last ban's end) lasts ``ban_factor`` times the
  previous one, up to ``ban_max_s`` (default: every ban lasts ``ban_s``).

``usable(peer, now)`` is neither; ``avoided(now)`` lists the peers that are not usable (pass it as a route
planner's ``exclude``). Memory is bounded: a failure record whose backoff ended more than ``forget_s`` ago
is dropped (its count starts afresh), ended bans are dropped, and at most ``max_peers`` peers of each kind
are kept (the least recently failed or banned go first). Bad settings raise ``ConfigError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshinfer.errors import ConfigError
from meshinfer.types import PeerIdStr

DEFAULT_MAX_PEERS = 10_000


@dataclass
class _Failing:
    failures: int
    length_s: float
    until: float


class PeerBans:
    """Per-peer failure counts with backoff deadlines, and bans (see the module docstring)."""

    def __init__(
        self,
        *,
        base_s: float = 1.0,
        max_s: float = 60.0,
        factor: float = 2.0,
        forget_s: float | None = None,
        max_peers: int = DEFAULT_MAX_PEERS,
        ban_s: float = 600.0,
        ban_factor: float = 1.0,
        ban_max_s: float | None = None,
    ) -> None:
        """``forget_s`` (default ``10 * max_s``): how long after its backoff ends a peer's failures are kept."""
        ban_max = ban_s if ban_max_s is None else ban_max_s
        for name, value in (("base_s", base_s), ("max_s", max_s), ("factor", factor), ("ban_s", ban_s),
                            ("ban_factor", ban_factor), ("ban_max_s", ban_max)):
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"ban {name} must be a finite number > 0, got {value}")
        if max_s < base_s:
            raise ConfigError(f"ban max_s ({max_s}) must be >= base_s ({base_s})")
        if factor < 1 or ban_factor < 1:
            raise ConfigError(f"ban factors must be >= 1 (bans never shrink), got {factor} and {ban_factor}")
        if ban_max < ban_s:
            raise ConfigError(f"ban ban_max_s ({ban_max}) must be >= ban_s ({ban_s})")
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
        self.ban_s = ban_s
        self.ban_factor = ban_factor
        self.ban_max_s = ban_max
        self._strikes: dict[PeerIdStr, tuple[float, float]] = {}  # peer -> (length of its last ban, its end)
        self._failing: dict[PeerIdStr, _Failing] = {}  # insertion order = least recently failed first
        self._banned: dict[PeerIdStr, float] = {}  # peer -> end of its ban; insertion order = oldest ban first

    def __len__(self) -> int:
        """Peers currently remembered (backing off, with a failure count, or banned)."""
        return len(self._failing.keys() | self._banned.keys())

    # ---- failures: backoff ------------------------------------------------------------------------

    def fail(self, peer_id: PeerIdStr, now: float) -> float:
        """Record a failure of ``peer_id`` at ``now``; return the length of the backoff it starts (seconds)."""
        self._forget_stale(now)
        entry = self._failing.pop(peer_id, None)
        if entry is None:
            length = self.base_s
            entry = _Failing(failures=1, length_s=length, until=now + length)
        else:
            length = min(entry.length_s * self.factor, self.max_s)
            entry = _Failing(failures=entry.failures + 1, length_s=length, until=max(entry.until, now + length))
        self._failing[peer_id] = entry  # re-inserted: now the most recently failed
        while len(self._failing) > self.max_peers:
            del self._failing[next(iter(self._failing))]
        return length

    def succeed(self, peer_id: PeerIdStr) -> None:
        """``peer_id`` worked: forget its failures and end its backoff (a ban stays)."""
        self._failing.pop(peer_id, None)

    def failures(self, peer_id: PeerIdStr) -> int:
        """Consecutive failures remembered for ``peer_id`` (0 if none)."""
        entry = self._failing.get(peer_id)
        return 0 if entry is None else entry.failures

    def until(self, peer_id: PeerIdStr) -> float | None:
        """When ``peer_id``'s latest backoff ends (possibly in the past), or None if no failure is remembered."""
        entry = self._failing.get(peer_id)
        return None if entry is None else entry.until

    def backing_off(self, peer_id: PeerIdStr, now: float) -> bool:
        entry = self._failing.get(peer_id)
        return entry is not None and now < entry.until

    # ---- misbehaviour: bans -----------------------------------------------------------------------

    def ban(self, peer_id: PeerIdStr, now: float) -> float:
        """``peer_id`` misbehaved at ``now``: ban it for ``ban_s`` (or ``ban_factor`` times its previous ban, up to
        ``ban_max_s``); return the ban's length (seconds). A ban never ends earlier than one already running."""
        last = self._strikes.pop(peer_id, None)
        length = self.ban_s
        if last is not None and now <= last[1] + self.forget_s:
            length = min(last[0] * self.ban_factor, self.ban_max_s)
        end = max(now + length, self._banned.pop(peer_id, -math.inf))
        self._banned[peer_id] = end
        self._strikes[peer_id] = (length, end)
        while len(self._strikes) > self.max_peers:
            del self._strikes[next(iter(self._strikes))]
        if len(self._banned) > self.max_peers:
            for peer in [p for p, end in self._banned.items() if end <= now]:
                del self._banned[peer]
            while len(self._banned) > self.max_peers:
                del self._banned[next(iter(self._banned))]
        return length

    def banned(self, peer_id: PeerIdStr, now: float) -> bool:
        """Whether ``peer_id`` is banned at ``now`` (for misbehaving; backing off is not being banned)."""
        return self._banned.get(peer_id, -math.inf) > now

    # ---- both -------------------------------------------------------------------------------------

    def usable(self, peer_id: PeerIdStr, now: float) -> bool:
        """Neither banned nor backing off at ``now``."""
        return not self.banned(peer_id, now) and not self.backing_off(peer_id, now)

    def avoided(self, now: float) -> set[PeerIdStr]:
        """Peers not usable at ``now`` (pass it as a route planner's ``exclude``); also drops stale entries."""
        self._forget_stale(now, sweep=True)
        for peer in [p for p, (_, end) in self._strikes.items() if end + self.forget_s < now]:
            del self._strikes[peer]
        for peer in [p for p, end in self._banned.items() if end <= now]:
            del self._banned[peer]
        return {peer for peer, entry in self._failing.items() if now < entry.until} | self._banned.keys()

    def _forget_stale(self, now: float, *, sweep: bool = False) -> None:
        """Drop failure records whose backoff ended more than ``forget_s`` before ``now``.

        Cheap by default: only from the least recently failed end while they are stale (amortised O(1)
        per failure). ``sweep`` checks every entry.
        """
        horizon = now - self.forget_s
        if sweep:
            for peer in [p for p, e in self._failing.items() if e.until < horizon]:
                del self._failing[peer]
            return
        while self._failing:
            oldest = next(iter(self._failing))
            if self._failing[oldest].until >= horizon:
                break
            del self._failing[oldest]
