"""The client's pieces of a route: one hop's session and its stream's lifecycle, and what a failed hop is.

Contract: ``HopSession`` is the client's end of one server's session (hop, session id, stream, input
history, where its server pushes) and owns that stream's lifecycle: ``open`` (take an idle stream to the
server the node kept, or dial one, whose hello round trip is reported as the peer's RTT; send ``Open``; await
``Opened`` and report its round trip too, or with ``wait=False`` leave ``Opened`` to the reader and ``confirm``:
the first step follows ``Open`` without a round trip), ``start_reader``/``stop_reader`` (a background task
turning every message, or the error that ended the stream, into a ``HopEvent``), ``send_step`` and
``request_step``, ``retarget`` (re-point its pushes, and name who may push into it: ``prev``, set for a
push route by ``link_prev``), ``output`` (check a ``StepResult``), and ``close``
(``Close``, then the stream goes back to the node's idle pool for the next session to that server, or is closed;
idempotent, never raises). A reused stream may still bring late replies of the session it carried before: every
read skips messages of another session id (``recv``). ``route_tail`` lists the hops after one, as ``Open``
and ``Retarget`` carry them. ``HopFailure`` says a hop cannot go on (raised inside ``InferenceSession``
to start a failover, never out of it); ``Failover`` records one replacement; ``FAILOVER_CODES`` and
``replaceable`` say which errors another server could get past. Every ``StepResult`` read from a hop (by the
reader or ``request_step``) goes to its ``commits`` log (``p2p.commit.CommitLog``: output hashes and the latest
verified signed commit); ``steps`` and ``outputs`` (kept by the session and by recovery, aligned) say which step
produced which positions of ``inputs`` and what the hop claimed for them (``client.evidence``). Knows nothing of
routes' planning or of failover: hidden states in, hidden states out, one hop at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from meshinfer.client.routing import RouteHop
from meshinfer.errors import MeshinferError, RemoteError, TransportError, WireError
from meshinfer.p2p import SESSION_PROTOCOL
from meshinfer.p2p.commit import CommitLog
from meshinfer.p2p.node import PeerNode
from meshinfer.p2p.stream import MessageStream, StreamTimeout
from meshinfer.types import BlockRange
from meshinfer.wire.limits import WireLimits
from meshinfer.wire.messages import (
    Burst,
    Close,
    Error,
    ErrorCode,
    Hop,
    Message,
    Open,
    Opened,
    Pong,
    Retarget,
    Step,
    StepResult,
    encode_message,
)
from meshinfer.wire.tensor import decode_tensor, encode_tensor

FAILOVER_CODES = frozenset({
    ErrorCode.UNKNOWN_SESSION, ErrorCode.OVERLOADED, ErrorCode.INTERNAL, ErrorCode.TIMEOUT,
    ErrorCode.SPAN_NOT_SERVED, ErrorCode.UNKNOWN_MODEL, ErrorCode.VERSION_MISMATCH,
})
"""Error codes after which another server may well succeed (the others are the request's fault)."""

IDLE_READ_S = 1e6
"""Per-message read timeout of the background readers: a session may sit idle between steps; every
step has its own deadline (``step_timeout``) and stall detection."""

RttCallback = Callable[[str, float], None]
"""``on_rtt(peer_id, seconds)``: the round trip of one ``Open``."""

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
    outputs: list[torch.Tensor] = field(default_factory=list)
    """What this span's server claimed as the outputs of those inputs, step by step ([T_k, H] each; audits and
    evidence; the next hop's inputs are the same tensors, so only the last hop's cost memory)."""
    reader: asyncio.Task[None] | None = None
    tail: str | None = None
    """The session id this hop's server pushes its outputs to (None: it pushes nowhere)."""
    prev: str | None = None
    """The previous hop's server, named in ``Open``/``Retarget`` as the one peer besides this client that may
    push into this hop's session (None: only this client)."""
    closed: bool = field(default=False, init=False)
    """Whether ``close`` ran (a closed hop is never reopened)."""
    steps: list[tuple[int, int, int]] = field(default_factory=list)
    """(step id, position, tokens) of the steps whose results the session took, aligned with ``outputs``."""
    commits: CommitLog | None = None
    """The hop's results and signed commitments (created at ``open``)."""
    answered: int | None = None
    """The step id of the hop's latest result the session took (set by the session while a step runs)."""
    work: int = 0
    """Tokens this hop's server computed for the session: every step and replay, never less after a rewind (what
    the client's usage receipts for it count, ``client.receipts``)."""
    confirmed: bool = field(default=False, init=False)
    """Whether the server answered ``Opened`` (with ``open(wait=False)`` that comes through the reader)."""
    node: PeerNode | None = field(default=None, init=False, repr=False)
    _max_length: int = field(default=0, init=False, repr=False)
    _on_rtt: RttCallback | None = field(default=None, init=False, repr=False)
    _open_sent: float | None = field(default=None, init=False, repr=False)
    _open_timeout: float = field(default=0.0, init=False, repr=False)

    def where(self) -> str:
        return f"server {short_peer(self.hop.peer_id)} (blocks {self.hop.span})"

    async def open(self, node: PeerNode, *, model_id: str, max_length: int, dtype: str, quant: str | None,
                   route_tail: list[Hop], timeout: float, on_rtt: RttCallback | None = None,
                   wait: bool = True) -> None:
        """Open the stream (an idle one to the same server when the node kept one) and the server's session
        (pushing to ``route_tail[0]``, if any); raises on failure. ``wait=False`` returns once ``Open`` is sent:
        its answer then comes through the reader (``Opened``: ``confirm``; an ``Error``: the session failed to
        open), and the caller may send the first step at once (the server takes them in order)."""
        self.commits = CommitLog(model_id, self.hop.span, self.session_id, self.hop.peer_id)
        self.node = node
        self._max_length = max_length
        self._on_rtt = on_rtt
        msg = Open(session_id=self.session_id, model=model_id, span=self.hop.span, max_length=max_length,
                   dtype=dtype, route_tail=route_tail, quant=quant, prev_peer=self.prev)
        self.tail = route_tail[0].session_id if route_tail else None
        reuse = True
        while True:
            self.stream = await node.open_stream(self.hop.peer_id, SESSION_PROTOCOL, timeout=timeout, reuse=reuse,
                                                 maddrs=self.hop.record.addresses,
                                                 direct=self.hop.record.direct_addresses)
            if on_rtt is not None and self.stream.dial_rtt_s is not None and not self.stream.reused:
                on_rtt(self.hop.peer_id, self.stream.dial_rtt_s)  # the hellos' round trip: a figure before any Open
            self._open_sent = time.perf_counter()
            self._open_timeout = timeout
            try:
                await self.stream.send(msg)
                if not wait:
                    return
                reply = await self.recv(timeout)
                break
            except TransportError as err:
                await self.stream.close(timeout=0.5)
                if self.stream.reused and not isinstance(err, StreamTimeout):
                    reuse = False  # the server let the kept connection go meanwhile: dial afresh, once
                    continue
                raise TransportError(f"cannot open a session on {self.where()}: {err}") from None
        if isinstance(reply, Error):
            raise RemoteError(reply.code, f"{reply.message} ({self.where()})")
        if not isinstance(reply, Opened):
            raise WireError(f"{self.where()} answered Open with an unexpected {type(reply).__name__}")
        self.confirm(reply)

    def open_overdue(self, now: float) -> float | None:
        """For a hop whose ``Open`` is not answered yet: seconds left until it is overdue (<= 0: it is; the caller
        fails the hop, as ``open`` would have after ``timeout``); None once answered."""
        if self.confirmed or self._open_sent is None:
            return None
        return self._open_sent + self._open_timeout - now

    def confirm(self, reply: Opened) -> None:
        """Check the server's ``Opened`` (span, length) and report the ``Open`` round trip; ``WireError`` if wrong."""
        if reply.span != self.hop.span or reply.max_length < self._max_length:
            raise WireError(f"{self.where()} opened span {reply.span} for {reply.max_length} tokens; "
                            f"asked for {self.hop.span} and {self._max_length}")
        self.confirmed = True
        if self._on_rtt is not None and self._open_sent is not None:
            self._on_rtt(self.hop.peer_id, time.perf_counter() - self._open_sent)

    def _foreign(self, msg: Message) -> bool:
        """Whether ``msg`` belongs to another session than this hop's (a late reply to the session a reused
        stream carried before) or is a ``Pong``: the reader and requests skip it."""
        if isinstance(msg, Pong):
            return True
        sid = getattr(msg, "session_id", None)
        return sid is not None and sid != self.session_id

    async def recv(self, timeout: float) -> Message:
        """The next message of this hop's session on its stream (skipping ``_foreign`` ones)."""
        assert self.stream is not None
        while True:
            msg = await self.stream.recv(timeout)
            if not self._foreign(msg):
                return msg

    # ---- reading -------------------------------------------------------------------------------

    def start_reader(self, events: asyncio.Queue[HopEvent]) -> None:
        """Read this hop's stream in the background into ``events`` (once; a no-op while one runs)."""
        if self.reader is None:
            self.reader = asyncio.create_task(self._read(events), name=f"session-read:{self.session_id[:8]}")

    async def _read(self, events: asyncio.Queue[HopEvent]) -> None:
        stream = self.stream
        assert stream is not None
        while True:
            try:
                msg = await stream.recv(timeout=IDLE_READ_S)
            except MeshinferError as err:
                events.put_nowait((self, err))
                return
            if self._foreign(msg):
                continue
            if isinstance(msg, StepResult) and self.commits is not None:
                self.commits.record(msg)
            events.put_nowait((self, msg))

    async def stop_reader(self) -> None:
        """Cancel the background reader and wait for it to end (never raises)."""
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
            self.reader = None

    # ---- steps ---------------------------------------------------------------------------------

    async def send_step(self, step_id: int, position: int, x: torch.Tensor, burst: Burst | None = None,
                        want_commit: bool = False) -> None:
        """Send one step (its answer comes through the reader); a broken stream is a ``HopFailure``."""
        assert self.stream is not None
        msg = Step(session_id=self.session_id, step_id=step_id, position=position, hidden=encode_tensor(x),
                   burst=burst, want_commit=want_commit)
        try:
            payload = encode_message(msg)
            if not self.stream.send_nowait(payload):
                await self.stream.send_bytes(payload)
        except TransportError as err:
            raise HopFailure(self, f"cannot send a step: {err}") from None

    async def request_step(self, step_id: int, position: int, x: torch.Tensor, timeout: float) -> Message:
        """Send one step and return the next message (no reader may run); raises ``MeshinferError``."""
        assert self.stream is not None
        msg = Step(session_id=self.session_id, step_id=step_id, position=position, hidden=encode_tensor(x))
        await self.stream.send(msg)
        reply = await self.recv(timeout)
        if isinstance(reply, Error):
            raise RemoteError(reply.code, reply.message)
        if isinstance(reply, StepResult) and self.commits is not None:
            self.commits.record(reply)
        return reply

    def output(self, msg: StepResult, x: torch.Tensor, limits: WireLimits, dtype: str) -> torch.Tensor:
        """The hidden states of ``msg``, checked to have the shape and dtype of the input ``x``."""
        out = decode_tensor(msg.hidden, limits)
        if list(out.shape) != list(x.shape) or out.dtype != x.dtype:
            raise WireError(f"{self.where()} returned {msg.hidden.dtype} {list(out.shape)}; expected "
                            f"{dtype} {list(x.shape)}")
        return out

    async def retarget(self, route_tail: list[Hop], prev: str | None = None) -> None:
        """Point this hop's pushes at ``route_tail[0]`` and take pushes from ``prev`` when given (``Retarget``);
        a broken stream is a ``HopFailure``."""
        assert self.stream is not None
        try:
            await self.stream.send(Retarget(session_id=self.session_id, route_tail=route_tail, prev_peer=prev))
        except TransportError as err:
            raise HopFailure(self, f"cannot retarget its pushes: {err}") from None
        self.tail = route_tail[0].session_id if route_tail else None
        self.prev = prev if prev is not None else self.prev

    # ---- closing -------------------------------------------------------------------------------

    async def close(self, *, send_timeout: float = 2.0, stream_timeout: float = 1.0, reuse: bool = False) -> None:
        """Stop reading, send ``Close`` when the server may still be there, then hand the stream back to the node
        for the next session to this server (``reuse``: only for a hop known healthy, whose session opened and
        whose stream is usable) or close it (idempotent, never raises)."""
        if self.closed:
            return
        self.closed = True
        await self.stop_reader()
        if self.stream is None:
            return
        sent = False
        with contextlib.suppress(Exception):
            async with asyncio.timeout(send_timeout):
                await self.stream.send(Close(session_id=self.session_id))
                sent = True
        if reuse and sent and self.confirmed and self.node is not None:
            await self.node.release_stream(self.stream)
        else:
            await self.stream.close(timeout=stream_timeout)


HopEvent = tuple[HopSession, Message | MeshinferError]
"""What a hop's reader reports: one message from its server, or the error that ended its stream."""


def link_prev(hops: Sequence[HopSession]) -> None:
    """Name each hop's previous server as the one that may push into it (``prev``; sent in ``Open``)."""
    for before, after in itertools.pairwise(hops):
        after.prev = before.hop.peer_id


def route_tail(hops: Sequence[HopSession], i: int) -> list[Hop]:
    """The hops after ``hops[i]`` as ``Open``/``Retarget`` carry them (where hop ``i`` pushes, and beyond)."""
    return [Hop(peer_id=h.hop.peer_id, span=h.hop.span, session_id=h.session_id,
                maddrs=list(h.hop.record.addresses)[:16], direct=list(h.hop.record.direct_addresses)[:8])
            for h in hops[i + 1:]]


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
