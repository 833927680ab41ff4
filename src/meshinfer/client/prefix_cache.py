"""Prompt-cache reuse across generations: which idle session a new prompt can continue.

Contract: pure bookkeeping (no torch, no network, no clock: callers pass ``now`` in seconds of a monotonic clock).
``PrefixCache`` holds up to ``capacity`` idle sessions (opaque objects of type ``S``), each with the token ids
whose KV the servers hold for it (its ``history``: exactly the ids sent, positions [0, len)) and its
``max_length``. ``take(prompt, length, now)`` removes and returns the session whose history shares the longest
prefix with ``prompt`` (a ``Reuse``: the session, and ``keep``: the positions to keep, at most ``len(prompt) - 1``
so that the prompt's last position is run and gives logits), provided the match is at least ``min_match(len)``
tokens and the session holds at least ``length`` tokens; a taken session is the caller's alone. ``put`` adds an
idle session and returns the sessions it pushed out (least recently used first, beyond ``capacity``) for the
caller to close; ``expire(now)`` removes and returns those idle for more than ``ttl`` seconds; ``drain`` all of
them; ``held_on(peers, peers_of)`` lists those on given servers (least recently used first) and ``remove`` takes one
out (to make room on a full server). ``stats`` counts hits, misses, tokens reused, evictions, expirations and room
made on full servers (``PromptCacheStats``).
``DistributedModel`` (``client.model``) does the I/O: rewinding a taken session to ``keep``, closing what comes
back from ``put`` / ``expire`` / ``drain``, and falling back to a fresh session when a taken one fails.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from meshinfer.errors import UsageError

S = TypeVar("S")

MIN_MATCH: Final = 16
"""Tokens a prompt must share with a held session's history for a reuse (or half the prompt, if shorter)."""


def min_match(prompt_len: int) -> int:
    """The fewest positions worth reusing for a prompt of ``prompt_len`` tokens: 16, or half a shorter prompt
    (at least 1)."""
    return max(1, min(MIN_MATCH, prompt_len // 2))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class PromptCacheStats:
    """What the prompt cache did, over a client's life."""

    hits: int = 0
    """Generations that continued a held session."""
    misses: int = 0
    """Generations (with the cache on) that opened a fresh session."""
    tokens_reused: int = 0
    """Prompt positions not sent again thanks to hits."""
    evictions: int = 0
    """Held sessions closed to make room (least recently used)."""
    expirations: int = 0
    """Held sessions closed after idling longer than the TTL."""
    fallbacks: int = 0
    """Hits whose session failed before its first token: a fresh session took over."""
    room_closes: int = 0
    """Held sessions closed because a server refused a fresh session for want of room (``OVERLOADED``)."""
    open_retries: int = 0
    """Fresh sessions opened again at once after such a refusal (no route wait, no failover)."""
    confirmed_opens: int = 0
    """Fresh sessions whose ``Open`` was awaited before their first step because held sessions might fill a server
    on their route (see ``client.held_sessions``)."""


@dataclass
class Held(Generic[S]):
    """One idle session and what its servers hold."""

    session: S
    history: list[int]
    max_length: int
    since: float


@dataclass(frozen=True)
class Reuse(Generic[S]):
    """A taken session: rewind it to ``keep`` positions and run the prompt from there."""

    session: S
    keep: int


@dataclass
class PrefixCache(Generic[S]):
    """Up to ``capacity`` idle sessions by recency (see the module docstring)."""

    capacity: int
    ttl: float
    stats: PromptCacheStats = field(default_factory=PromptCacheStats)
    _held: list[Held[S]] = field(default_factory=lambda: [])  # least recently used first

    def __post_init__(self) -> None:
        if self.capacity < 0 or not self.ttl > 0:
            raise UsageError(f"a prefix cache needs capacity >= 0 and ttl > 0, got {self.capacity}, {self.ttl}")

    def __len__(self) -> int:
        return len(self._held)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def take(self, prompt: Sequence[int], length: int, now: float) -> Reuse[S] | None:
        """The held session to continue for ``prompt`` (needing ``length`` tokens in all), removed from the cache;
        None (a miss): none shares enough of the prompt or has room. Expired sessions are not candidates (the
        caller's next ``expire`` closes them)."""
        if not self.enabled or not prompt:
            return None
        best: Held[S] | None = None
        best_keep = 0
        for held in self._held:
            if held.max_length < length or now - held.since > self.ttl:
                continue
            keep = min(common_prefix(held.history, prompt), len(prompt) - 1)
            if keep > best_keep or (keep == best_keep and best is not None and held.since > best.since):
                best, best_keep = held, keep
        if best is None or best_keep < min_match(len(prompt)):
            self.stats.misses += 1
            return None
        self._held.remove(best)
        self.stats.hits += 1
        self.stats.tokens_reused += best_keep
        return Reuse(best.session, best_keep)

    def put(self, session: S, history: Sequence[int], max_length: int, now: float) -> list[S]:
        """Hold ``session`` (idle, its servers holding ``history``); returns the sessions to close: those pushed
        out, least recently used first (``session`` itself when the cache is off or ``history`` is empty)."""
        if not self.enabled or not history:
            return [session]
        if len(history) > max_length:
            raise UsageError(f"a session of max_length {max_length} cannot hold {len(history)} tokens")
        self._held.append(Held(session, list(history), max_length, now))
        out: list[S] = []
        while len(self._held) > self.capacity:
            out.append(self._held.pop(0).session)
            self.stats.evictions += 1
        return out

    def expire(self, now: float) -> list[S]:
        """Remove and return the sessions idle for more than ``ttl`` seconds."""
        old = [h for h in self._held if now - h.since > self.ttl]
        if old:
            self._held = [h for h in self._held if now - h.since <= self.ttl]
            self.stats.expirations += len(old)
        return [h.session for h in old]

    def next_expiry(self) -> float | None:
        """When the oldest held session expires (None: none held)."""
        return min(h.since for h in self._held) + self.ttl if self._held else None

    def held_on(self, peers: Collection[str], peers_of: Callable[[S], Collection[str]]) -> list[S]:
        """The held sessions whose servers (``peers_of(session)``) include one of ``peers``, least recently used
        first."""
        return [h.session for h in self._held if not set(peers).isdisjoint(peers_of(h.session))]

    def remove(self, session: S) -> bool:
        """Remove ``session`` (to close it: see ``stats.room_closes``); False when it is not held."""
        for i, h in enumerate(self._held):
            if h.session is session:
                del self._held[i]
                return True
        return False

    def drain(self) -> list[S]:
        """Remove and return every held session."""
        out = [h.session for h in self._held]
        self._held.clear()
        return out
