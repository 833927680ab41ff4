"""One inference session on a server, and the checks every step meets before it is queued.

Contract: ``Session`` is the state of one client session (docs/architecture.md section 10): its
sub-span, max length, wire dtype, next hop, KV cache (opaque here: allocated and used only by the
runtime's worker thread), step queue, last computed step (for duplicate step ids) and last activity.
Only the session's client and the previous hop it named may push into it (``may_push``); session ids
appear in logs and messages only as ``short_id`` prefixes.
``check_step`` validates a ``Step`` against the session using only the wire tensor's metadata (no
decoding, no torch) and classifies it: ``NEW`` (queue it), ``REPEAT`` (answer again from the last
result) or ``IN_FLIGHT`` (already queued: its result is on its way). Anything wrong raises
``SessionError`` carrying the wire ``ErrorCode``. A ``StepJob`` carries its own progress (tokens done,
the runtime's state between chunks). The ``Outbox`` protocol (send, send now if possible, close) is how
results reach the session's client; this module never touches streams, peers or the clock itself (callers pass ``now``).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from meshinfer.errors import MeshinferError
from meshinfer.p2p.commit import CommitChain
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Burst, ErrorCode, Hop, Message, Step
from meshinfer.wire.tensor import Tensor

if TYPE_CHECKING:
    import asyncio


class SessionError(MeshinferError):
    """A request a session refuses; ``code`` is the ``Error.code`` sent back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Outbox(Protocol):
    """Where a session's replies go (its client's stream, a ``p2p.stream.MessageStream``)."""

    async def send(self, msg: Message) -> None:
        """Send ``msg``, waiting while the client is slow to read."""
        ...

    def send_nowait(self, payload: bytes) -> bool:
        """Write an encoded message now if that needs no waiting; False: nothing written, use ``send``."""
        ...

    async def close(self, timeout: float = 2.0) -> None:
        """Close the stream (idempotent, never raises)."""
        ...


class StepKind(enum.Enum):
    NEW = "new"
    REPEAT = "repeat"
    IN_FLIGHT = "in_flight"


@dataclass
class StepJob:
    """A validated step waiting for (or in) the runtime; ``hidden`` is still the wire tensor."""

    session: Session
    step_id: int
    position: int
    hidden: Tensor  # [T, H] on the wire, in the session's dtype
    arrived: float
    pushed: bool = False
    burst: Burst | None = None
    """The step's burst tag (``wire.burst``): the loop holds it until the rest of its burst is in."""
    want_commit: bool = False
    """The step asked for a signed commit on its result (``Step.want_commit``)."""
    done: int = 0
    """Tokens of the step computed so far (a prefill runs in chunks; ``server.scheduler``)."""
    work: Any = None
    """What the runtime keeps between the chunks of the step (decoded input, outputs so far); opaque here."""

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0]


@dataclass(eq=False)
class Session:
    session_id: str
    span: BlockRange
    max_length: int
    dtype: str
    outbox: Outbox
    next_hop: Hop | None = None
    client: str = ""
    """The peer id of the client that opened the session (final results to one client leave as a burst; the
    per-peer limits and fair scheduling count the session as this peer's)."""
    prev_peer: str | None = None
    """The previous hop's server, the one peer besides ``client`` allowed to push steps into the session."""
    cache: Any = None
    """The KV cache of ``span`` (a ``models.kv_cache.KVCache``); touched only by the worker thread."""
    last_activity: float = 0.0
    pending: deque[StepJob] = field(default_factory=deque)
    queued_ids: set[int] = field(default_factory=set)
    """Step ids queued or being computed."""
    busy: bool = False
    """A step of this session is being computed right now."""
    last_step_id: int | None = None
    last_output: Tensor | None = None
    ended: bool = False
    end_reason: str = ""
    delivery: asyncio.Task[None] | None = None
    """The latest delivery task; each one awaits the previous, so replies leave in step order."""
    chain: CommitChain | None = None
    """This server's commitment chain over the session's results (``p2p.commit``; None: no commits)."""

    def __hash__(self) -> int:
        return id(self)

    @property
    def short_id(self) -> str:
        """The session id as logs and messages show it (a prefix only: the full id lets one push into it)."""
        return short_id(self.session_id)

    def may_push(self, peer: str) -> bool:
        """Whether ``peer`` may push steps into this session (its client, or the previous hop it named)."""
        return peer == self.client or (self.prev_peer is not None and peer == self.prev_peer)

    @property
    def idle(self) -> bool:
        return not self.pending and not self.busy

    def idle_for(self, now: float) -> float:
        return now - self.last_activity if self.idle else 0.0


def short_id(session_id: str) -> str:
    """What logs and error messages show of a session id: its first 8 characters."""
    return session_id[:8] + ("…" if len(session_id) > 8 else "")


def check_step(session: Session, step: Step, *, hidden_size: int, max_step_tokens: int) -> StepKind:
    """Validate ``step`` for ``session`` (metadata only) and say what to do with it."""
    sid, t = step.session_id, step.hidden
    if sid != session.session_id:
        raise SessionError(ErrorCode.UNKNOWN_SESSION,
                           f"this stream carries session {session.short_id}, not {short_id(sid)}")
    if step.step_id in session.queued_ids:
        return StepKind.IN_FLIGHT
    if step.step_id == session.last_step_id and session.last_output is not None:
        return StepKind.REPEAT
    if session.last_step_id is not None and step.step_id < session.last_step_id:
        raise SessionError(
            ErrorCode.BAD_REQUEST,
            f"step id {step.step_id} is older than the last computed step {session.last_step_id}; "
            "step ids must increase (only the last result is kept)",
        )
    if t.dtype != session.dtype:
        raise SessionError(ErrorCode.BAD_REQUEST,
                           f"hidden states are {t.dtype} but the session was opened with dtype {session.dtype}")
    if len(t.shape) != 2:
        raise SessionError(ErrorCode.BAD_REQUEST,
                           f"hidden states must have shape [tokens, {hidden_size}], got {list(t.shape)}")
    tokens, hidden = t.shape
    if hidden != hidden_size:
        raise SessionError(ErrorCode.BAD_REQUEST,
                           f"hidden size {hidden} does not match the model's {hidden_size}")
    if tokens == 0:
        raise SessionError(ErrorCode.BAD_REQUEST, "a step must carry at least one token")
    if tokens > max_step_tokens:
        raise SessionError(ErrorCode.LIMIT_EXCEEDED,
                           f"step of {tokens} tokens exceeds this server's limit of {max_step_tokens} per step; "
                           "send the prefill in chunks")
    if step.position + tokens > session.max_length:
        raise SessionError(
            ErrorCode.LIMIT_EXCEEDED,
            f"position {step.position} + {tokens} tokens exceeds the session's max length {session.max_length}",
        )
    return StepKind.NEW
