"""KV memory admission: which sessions a server takes on, by token budget and session count.

Contract: pure bookkeeping (no torch, no network, no clock). A session reserves its ``max_length``
tokens when it opens and gives them back when it ends; ``reserve`` refuses with ``Overloaded`` (a
``MeshinferError`` whose message says how many tokens were asked and how many are left, or that the
session limit is reached) instead of over-committing. ``release`` is idempotent, so every way a
session can end (close, disconnect, idle expiry, shutdown) may call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshinfer.errors import ConfigError, MeshinferError, UsageError


class Overloaded(MeshinferError):
    """The server cannot take this session now (KV budget or session limit full)."""


@dataclass
class MemoryBudget:
    """``cache_tokens`` tokens of KV cache shared by at most ``max_sessions`` sessions."""

    cache_tokens: int
    max_sessions: int
    _reserved: dict[str, int] = field(default_factory=dict)

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

    def reserve(self, session_id: str, tokens: int) -> None:
        """Reserve ``tokens`` for ``session_id`` or raise ``Overloaded`` (nothing reserved then)."""
        if tokens <= 0:
            raise ConfigError(f"a session must reserve > 0 tokens, got {tokens}")
        if session_id in self._reserved:
            raise UsageError(f"session {session_id!r} already holds a reservation")
        if len(self._reserved) >= self.max_sessions:
            raise Overloaded(
                f"server is at its limit of {self.max_sessions} open sessions; try another server or later"
            )
        left = self.tokens_left
        if tokens > left:
            raise Overloaded(
                f"not enough KV cache: session asks for {tokens} tokens, {left} of {self.cache_tokens} left"
            )
        self._reserved[session_id] = tokens

    def release(self, session_id: str) -> int:
        """Give back what ``session_id`` reserved; returns the tokens freed (0 if it held none)."""
        return self._reserved.pop(session_id, 0)
