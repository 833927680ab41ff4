"""The client's pieces of a route: one hop's session state, and what a failed hop is.

Contract: ``HopSession`` is the client's end of one server's session (hop, session id, stream,
input history, where its server pushes); ``HopFailure`` says that hop cannot go on (raised inside
``InferenceSession`` to start a failover, never out of it); ``Failover`` records one replacement;
``FAILOVER_CODES`` and ``replaceable`` say which errors another server could get past. Plain data and
predicates: no I/O.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from meshinfer.client.routing import RouteHop
from meshinfer.errors import MeshinferError, RemoteError
from meshinfer.p2p.stream import MessageStream
from meshinfer.types import BlockRange
from meshinfer.wire.messages import ErrorCode

FAILOVER_CODES = frozenset({
    ErrorCode.UNKNOWN_SESSION, ErrorCode.OVERLOADED, ErrorCode.INTERNAL, ErrorCode.TIMEOUT,
    ErrorCode.SPAN_NOT_SERVED, ErrorCode.UNKNOWN_MODEL, ErrorCode.VERSION_MISMATCH,
})
"""Error codes after which another server may well succeed (the others are the request's fault)."""

def short_peer(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


@dataclass(eq=False)
class HopSession:
    """The client's end of one server's session: the hop, its session id, stream and input history."""

    hop: RouteHop
    session_id: str
    stream: MessageStream | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)
    """Every hidden-state input this span received, step by step ([T_k, H] each)."""
    reader: asyncio.Task[None] | None = None
    tail: str | None = None
    """The session id this hop's server pushes its outputs to (None: it pushes nowhere)."""

    def where(self) -> str:
        return f"server {short_peer(self.hop.peer_id)} (blocks {self.hop.span})"


@dataclass(frozen=True)
class Failover:
    """One replaced hop: who failed, why, what replaced it, how long it took, how much was replayed."""

    peer_id: str
    span: BlockRange
    reason: str
    replacement: tuple[str, ...]
    seconds: float
    replayed_tokens: int


class HopFailure(MeshinferError):
    """Hop ``hs`` cannot go on (internal to the session: triggers a failover)."""

    def __init__(self, hs: HopSession, reason: str) -> None:
        super().__init__(f"{hs.where()}: {reason}")
        self.hs = hs
        self.reason = reason


def replaceable(err: BaseException) -> bool:
    """Whether another server could succeed where this error happened (at open)."""
    if isinstance(err, RemoteError):
        return err.code in FAILOVER_CODES
    return isinstance(err, MeshinferError | TimeoutError | OSError)
