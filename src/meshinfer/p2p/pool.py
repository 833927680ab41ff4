"""``IdlePool``: idle, authenticated connections kept per (peer, protocol) for the next stream to that peer.

Contract: pure bookkeeping (no clock, no network, no asyncio; time is passed in). A caller done with a stream
that is still usable ``put``s it back; the next ``take`` of the same key gets the most recently returned one
that ``alive`` accepts, instead of dialling again (on the direct plane a fresh connection costs a TCP
handshake and the signed hellos: two round trips before the first message). Bounded everywhere: at most
``max_per_key`` idle items per key and ``max_total`` in all (the oldest go first), none older than
``max_idle_s`` (a server closes an idle session stream after ``server.handler.OPEN_TIMEOUT``, 30 s: the pool
lets its own go well before). Everything the pool lets go (evicted, expired, refused by ``alive``, dropped with
its peer) is returned to the caller, who closes it. ``drop_peer`` forgets a peer that failed, so a dead peer is
never handed out again. Knows nothing of what the items are beyond the ``alive`` predicate it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from meshinfer.errors import ConfigError

T = TypeVar("T")

MAX_IDLE_S = 15.0
"""Seconds an idle connection is kept (half the server's wait for the next ``Open``)."""
MAX_PER_KEY = 4
"""Idle connections kept per (peer, protocol): one per hop a client may open to a peer at once, roughly."""
MAX_TOTAL = 256
"""Idle connections kept in all."""


@dataclass
class _Idle(Generic[T]):
    item: T
    since: float


@dataclass
class IdlePool(Generic[T]):
    """Idle items per key, newest last (see the module docstring)."""

    max_idle_s: float = MAX_IDLE_S
    max_per_key: int = MAX_PER_KEY
    max_total: int = MAX_TOTAL
    _idle: dict[tuple[str, str], list[_Idle[T]]] = field(default_factory=dict[tuple[str, str], list[_Idle[T]]])
    reused: int = 0
    """Items handed out again (for tests and metrics)."""

    def __post_init__(self) -> None:
        if not self.max_idle_s > 0:
            raise ConfigError(f"idle pool max_idle_s must be > 0, got {self.max_idle_s}")
        if self.max_per_key < 0 or self.max_total < 0:
            raise ConfigError("idle pool bounds must be >= 0")

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def put(self, peer_id: str, protocol: str, item: T, now: float) -> list[T]:
        """Keep ``item`` idle under (peer, protocol); returns what must be closed (expired, evicted, or ``item``
        itself when the pool keeps nothing)."""
        out = self.expire(now)
        if self.max_per_key == 0 or self.max_total == 0:
            return [*out, item]
        entries = self._idle.setdefault((peer_id, protocol), [])
        entries.append(_Idle(item, now))
        while len(entries) > self.max_per_key:
            out.append(entries.pop(0).item)
        while len(self) > self.max_total:
            out.append(self._pop_oldest())
        return out

    def take(self, peer_id: str, protocol: str, now: float,
             alive: Callable[[T], bool] = lambda _: True) -> tuple[T | None, list[T]]:
        """The newest idle item of (peer, protocol) that ``alive`` accepts (or None), and what must be closed."""
        out = self.expire(now)
        entries = self._idle.get((peer_id, protocol), [])
        found: T | None = None
        while entries and found is None:
            candidate = entries.pop().item
            if alive(candidate):
                found = candidate
                self.reused += 1
            else:
                out.append(candidate)
        if not entries:
            self._idle.pop((peer_id, protocol), None)
        return found, out

    def expire(self, now: float) -> list[T]:
        """Forget every item idle for more than ``max_idle_s``; returns them."""
        out: list[T] = []
        for key in list(self._idle):
            entries = self._idle[key]
            keep = [e for e in entries if now - e.since <= self.max_idle_s]
            out += [e.item for e in entries if now - e.since > self.max_idle_s]
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return out

    def drop_peer(self, peer_id: str) -> list[T]:
        """Forget every idle item of ``peer_id`` (it failed); returns them."""
        out: list[T] = []
        for key in [k for k in self._idle if k[0] == peer_id]:
            out += [e.item for e in self._idle.pop(key)]
        return out

    def drain(self) -> list[T]:
        """Forget everything; returns it."""
        out = [e.item for entries in self._idle.values() for e in entries]
        self._idle.clear()
        return out

    def _pop_oldest(self) -> T:
        key = min(self._idle, key=lambda k: self._idle[k][0].since)
        entries = self._idle[key]
        item = entries.pop(0).item
        if not entries:
            del self._idle[key]
        return item
