"""Pushed steps that arrive before their session's ``Open``: held briefly instead of refused.

Contract: a client sends every hop's ``Open`` and the first step at once (no ``Opened`` wait), so the previous hop's
push of that step can overtake the ``Open`` (the client is farther from this server than the previous hop is, or
this server is still allocating). ``EarlyPushes`` is pure bookkeeping (no clock, no network: time is passed in):
``hold(session_id, peer, item, nbytes, now)`` keeps one pushed step that no session takes now, within ``max_steps``
steps and ``max_bytes`` bytes of hidden states in all, ``max_per_session`` per session and ``max_per_peer`` per
pusher (False: not held, the caller refuses it as today); ``take(session_id)`` hands back the steps held for a
session just opened, in arrival order (the caller checks that their pusher may push into it); ``expire(now)``
returns those held longer than ``max_age_s`` (the caller refuses them then, as it would have at once: the pushing
server tells its client ``next_hop_failed`` and the client drives the hop itself). Knows nothing of what the items
are.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from meshinfer.errors import ConfigError

T = TypeVar("T")

EARLY_PUSH_S = 2.0
"""Seconds a pushed step may wait for its session's ``Open``."""


@dataclass
class _Held(Generic[T]):
    item: T
    peer: str
    nbytes: int
    since: float


@dataclass
class EarlyPushes(Generic[T]):
    """Held pushed steps per session id (see the module docstring)."""

    max_age_s: float = EARLY_PUSH_S
    max_steps: int = 64
    max_per_session: int = 4
    max_per_peer: int = 16
    max_bytes: int = 64 * 1024 * 1024
    _held: OrderedDict[str, list[_Held[T]]] = field(default_factory=OrderedDict[str, list[_Held[T]]])
    _steps: int = 0
    _bytes: int = 0
    _per_peer: dict[str, int] = field(default_factory=dict[str, int])

    def __post_init__(self) -> None:
        if not self.max_age_s > 0 or min(self.max_steps, self.max_per_session, self.max_per_peer, self.max_bytes) < 0:
            raise ConfigError("early pushes: max_age_s must be > 0 and the bounds >= 0")

    def __len__(self) -> int:
        return self._steps

    def hold(self, session_id: str, peer: str, item: T, nbytes: int, now: float) -> bool:
        """Keep ``item``, pushed by ``peer``, until its session opens; False when a bound is reached (nothing
        kept)."""
        entries = self._held.get(session_id, [])
        if (self._steps >= self.max_steps or len(entries) >= self.max_per_session
                or self._per_peer.get(peer, 0) >= self.max_per_peer or self._bytes + nbytes > self.max_bytes):
            return False
        entries.append(_Held(item, peer, nbytes, now))
        self._held[session_id] = entries
        self._steps += 1
        self._bytes += nbytes
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return True

    def take(self, session_id: str) -> list[T]:
        """The steps held for ``session_id``, oldest first (forgotten here)."""
        entries = self._held.pop(session_id, [])
        self._forget(entries)
        return [e.item for e in entries]

    def expire(self, now: float) -> list[T]:
        """Forget the steps held longer than ``max_age_s``; returns them."""
        out: list[T] = []
        for session_id in list(self._held):
            entries = self._held[session_id]
            old = [e for e in entries if now - e.since > self.max_age_s]
            if not old:
                continue
            keep = [e for e in entries if now - e.since <= self.max_age_s]
            self._forget(old)
            out += [e.item for e in old]
            if keep:
                self._held[session_id] = keep
            else:
                del self._held[session_id]
        return out

    def _forget(self, entries: list[_Held[T]]) -> None:
        self._steps -= len(entries)
        self._bytes -= sum(e.nbytes for e in entries)
        for e in entries:
            left = self._per_peer[e.peer] - 1
            if left:
                self._per_peer[e.peer] = left
            else:
                del self._per_peer[e.peer]
