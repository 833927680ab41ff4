"""KV memory admission: which sessions a server takes on, by token budget and session count, per peer too.

Contract: pure bookkeeping (no torch, no network, no clock). A session reserves its ``max_length``
tokens when it opens and gives them back when it ends; ``reserve`` refuses with ``Overloaded`` (a
``MeshinferError`` whose message names the limit hit and its value: tokens asked and left, the session
limit, or one of the per-peer limits) instead of over-committing. Each reservation belongs to a peer (the
authenticated peer that opened the session); one peer may hold at most ``peer_sessions`` sessions and
``peer_tokens`` tokens, so no single peer can take the whole budget (``PeerLimits``). ``release`` is
idempotent, so every way a session can end (close, disconnect, idle expiry, shutdown) may call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshinfer.errors import ConfigError, MeshinferError, UsageError


class Overloaded(MeshinferError):
    """The server cannot take this session now (KV budget, session limit or a per-peer limit full)."""


def short_peer(peer: str) -> str:
    """A peer id short enough for a message (its first 12 characters)."""
    return peer[:12] + ("…" if len(peer) > 12 else "")


@dataclass(frozen=True)
class PeerLimits:
    """What one peer may hold at once on a server: sessions and KV tokens (reserved cache)."""

    sessions: int
    tokens: int

    def __post_init__(self) -> None:
        if self.sessions <= 0 or self.tokens <= 0:
            raise ConfigError(f"per-peer limits must be > 0, got {self.sessions} sessions and {self.tokens} tokens")


@dataclass
class MemoryBudget:
    """``cache_tokens`` tokens of KV cache shared by at most ``max_sessions`` sessions; ``per_peer`` (None: no
    per-peer limits) bounds what one peer may hold of it."""

    cache_tokens: int
    max_sessions: int
    per_peer: PeerLimits | None = None
    _reserved: dict[str, int] = field(default_factory=dict)
    _owner: dict[str, str] = field(default_factory=dict)  # session id -> peer
    _peer_tokens: dict[str, int] = field(default_factory=dict)
    _peer_sessions: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cache_tokens <= 0 or self.max_sessions <= 0:
            raise ConfigError(
                f"a memory budget needs cache_tokens > 0 and max_sessions > 0, "
                f"got {self.cache_tokens} and {self.max_sessions}"
            )

    @property
    def tokens_reserved(self) -> int:
        return sum(self._reserved.values())

    @property
    def tokens_left(self) -> int:
        return self.cache_tokens - self.tokens_reserved

    @property
    def sessions(self) -> int:
        return len(self._reserved)

    def holds(self, session_id: str) -> bool:
        return session_id in self._reserved

    def peer_usage(self, peer: str) -> tuple[int, int]:
        """(sessions, tokens) that ``peer`` holds now."""
        return self._peer_sessions.get(peer, 0), self._peer_tokens.get(peer, 0)

    def reserve(self, session_id: str, tokens: int, peer: str = "") -> None:
        """Reserve ``tokens`` for ``session_id`` of ``peer`` or raise ``Overloaded`` (nothing reserved then)."""
        if tokens <= 0:
            raise ConfigError(f"a session must reserve > 0 tokens, got {tokens}")
        if session_id in self._reserved:
            raise UsageError(f"session {session_id[:8]!r}… already holds a reservation")
        if len(self._reserved) >= self.max_sessions:
            raise Overloaded(
                f"server is at its limit of {self.max_sessions} open sessions; try another server or later"
            )
        left = self.tokens_left
        if tokens > left:
            raise Overloaded(
                f"not enough KV cache: session asks for {tokens} tokens, {left} of {self.cache_tokens} left"
            )
        if self.per_peer is not None:
            held, used = self.peer_usage(peer)
            if held >= self.per_peer.sessions:
                raise Overloaded(f"peer {short_peer(peer)} has {held} open sessions here "
                                 f"(limit --max-sessions-per-peer {self.per_peer.sessions}); close one first")
            if used + tokens > self.per_peer.tokens:
                raise Overloaded(f"peer {short_peer(peer)} holds {used} KV tokens here and asks for {tokens} more "
                                 f"(limit --max-kv-tokens-per-peer {self.per_peer.tokens} tokens)")
        self._reserved[session_id] = tokens
        self._owner[session_id] = peer
        self._peer_sessions[peer] = self._peer_sessions.get(peer, 0) + 1
        self._peer_tokens[peer] = self._peer_tokens.get(peer, 0) + tokens

    def release(self, session_id: str) -> int:
        """Give back what ``session_id`` reserved; returns the tokens freed (0 if it held none)."""
        tokens = self._reserved.pop(session_id, 0)
        peer = self._owner.pop(session_id, None)
        if peer is not None:
            left = self._peer_sessions[peer] - 1
            if left:
                self._peer_sessions[peer] = left
                self._peer_tokens[peer] -= tokens
            else:
                del self._peer_sessions[peer], self._peer_tokens[peer]
        return tokens
