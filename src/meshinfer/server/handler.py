"""The session service: ``meshinfer/session/1`` and ``meshinfer/push/1`` handlers over the step loop.

Contract (docs/architecture.md section 10, server side): a session stream carries sessions one after another (a
client keeps the connection for its next session): each starts with ``Open`` (checked: model id, span inside the
served span, max length within the model's context, route tail continuing at the span's end, KV budget and the
opening peer's limits via ``MemoryBudget``) answered by ``Opened`` (a refused ``Open`` is answered with its
``Error``, and so is every ``Step`` sent after it for that session: a client sends ``Open`` and its first ``Step``
back to back; an accepted ``Open`` with a next hop has the push stream to it opened at once); then ``Step``s
(checked by ``session.check_step`` and the peer's queued-steps limit, queued on the ``StepLoop``), ``Ping``
(answered ``Pong``) and ``Close``. A session belongs to the authenticated peer that opened it
(``MessageStream.peer_id``): its stream carries only that peer's steps, and a pushed step is taken only from that
peer or the previous hop it named (``Open.prev_peer``, updated by ``Retarget.prev_peer``); anyone else gets the same
``Error`` as for an unknown session and nothing changes. Session ids are logged and quoted only as short prefixes.
Results leave on the session stream in step order, pushed on to the next hop first (``server.delivery``: the
service's ``Delivery`` collaborator, which hands steps pushed to this very server back through ``take_local``).
Pushed steps arrive on push streams and are treated exactly like the client's; one for a session not opened yet is
held until its ``Open`` comes (``server.early``: bounded, at most 2 s, then refused as before). Every bad input gets
a typed ``Error`` (with the session and step id when known) and affects only its session; undecodable bytes inside a
frame are answered and skipped, a broken frame ends the stream. The session's dtype (``Open.dtype``) may differ from
the compute dtype: hidden states are converted on the way in and out, and each ``Step`` must carry the session's
dtype. A session ends on ``Close``, when its stream breaks (client vanished), on idle timeout and at shutdown (the
client is told with an ``Error``); its memory is released each time and ``on_change`` fires. Given the server's
``identity``, every session keeps a commitment chain over its results (``Session.chain``; signed commits go out with
them, ``server.delivery``). Knows nothing of the DHT or of how the span was loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from meshinfer.errors import MeshinferError, TransportError, WireError
from meshinfer.p2p.commit import CommitChain
from meshinfer.p2p.identity import Identity
from meshinfer.p2p.stream import MessageStream, StreamClosed, StreamTimeout
from meshinfer.server.delivery import Delivery
from meshinfer.server.early import EarlyPushes
from meshinfer.server.memory import MemoryBudget, Overloaded, short_peer
from meshinfer.server.push import PushPool
from meshinfer.server.runtime import StepLoop
from meshinfer.server.scheduler import Finished
from meshinfer.server.session import Session, SessionError, StepJob, StepKind, check_step, short_id
from meshinfer.tasks import stop_task
from meshinfer.types import BlockRange
from meshinfer.wire.limits import WireLimits
from meshinfer.wire.messages import (
    Close,
    Error,
    ErrorCode,
    Hop,
    Message,
    Open,
    Opened,
    Ping,
    Pong,
    Retarget,
    Step,
    StepResult,
    decode_message,
    error_message,
)

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 30.0
"""Seconds a new session stream may take to send its ``Open``."""
MAX_QUEUED_STEPS = 64
"""Most steps one session may have waiting; more is refused (bounds what a client can pile up)."""


class SessionService:
    """All sessions of one server: admission, step intake, expiry; sending through ``delivery``."""

    def __init__(self, *, model_id: str, peer_id: str, steps: StepLoop, budget: MemoryBudget,
                 limits: WireLimits, max_step_tokens: int, idle_timeout: float,
                 on_change: Callable[[], None] = lambda: None, quant: str = "none",
                 pool: PushPool | None = None, max_queued_steps_per_peer: int = 256,
                 identity: Identity | None = None) -> None:
        self.model_id = model_id
        self.quant = quant
        """How this server holds its weights; a session planned for another mode is refused at open."""
        self.peer_id = peer_id
        self.steps = steps
        """The step loop of the span being served (replaced when the server moves)."""
        self.budget = budget
        self.limits = limits
        self.max_step_tokens = max_step_tokens
        self.max_queued_steps_per_peer = max_queued_steps_per_peer
        """Most steps one peer's sessions may have waiting (``--max-queued-steps-per-peer``)."""
        self.idle_timeout = idle_timeout
        self.on_change = on_change
        self.delivery = Delivery(peer_id=peer_id, local=self.take_local, pool=pool, identity=identity)
        self.accepting = True
        self.sessions: dict[str, Session] = {}
        self._origins: dict[str, Session] = {}  # next hop's session id -> our session pushing to it
        self._early: EarlyPushes[tuple[Step, MessageStream]] = EarlyPushes()
        """Pushed steps that overtook their session's ``Open`` (``server.early``), with the stream they came on."""
        self._janitor: asyncio.Task[None] | None = None

    @property
    def spec_hidden_size(self) -> int:
        return self.steps.span.spec.hidden_size

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._janitor = asyncio.create_task(self._expire_idle(), name="session-janitor")

    async def shutdown(self, message: str = "server is shutting down; open a session elsewhere") -> None:
        """Refuse new sessions, let steps in progress finish briefly, then end every session."""
        self.accepting = False
        await stop_task(self._janitor)
        deadline = time.monotonic() + 2.0
        while any(not s.idle for s in self.sessions.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions.values()):
            await self.terminate(session, ErrorCode.OVERLOADED, message, reason="shutdown")

    # ---- admission ---------------------------------------------------------------------------

    async def open(self, msg: Open, stream: MessageStream) -> Session:
        """Admit the session ``msg`` asks for, or raise ``SessionError``."""
        served = self.steps.span.range
        spec = self.steps.span.spec
        if not self.accepting:
            raise SessionError(ErrorCode.OVERLOADED, "server is shutting down; open a session elsewhere")
        if msg.model != self.model_id:
            raise SessionError(ErrorCode.UNKNOWN_MODEL,
                               f"this server serves model {self.model_id}, not {msg.model[:80]}")
        if not (served.start <= msg.span.start and msg.span.end <= served.end):
            raise SessionError(ErrorCode.SPAN_NOT_SERVED,
                               f"this server serves blocks {served}; span {msg.span} is not inside it")
        if msg.quant is not None and msg.quant != self.quant:
            raise SessionError(ErrorCode.SPAN_NOT_SERVED,
                               f"this server holds its weights as {self.quant}, the session's route runs "
                               f"{msg.quant[:16]} (a route never mixes quant modes)")
        if msg.max_length > spec.max_position_embeddings:
            raise SessionError(ErrorCode.LIMIT_EXCEEDED,
                               f"max_length {msg.max_length} exceeds the model's context of "
                               f"{spec.max_position_embeddings} tokens")
        next_hop = self._next_hop(msg.span, msg.route_tail)
        if msg.session_id in self.sessions or self.budget.holds(msg.session_id):
            raise SessionError(ErrorCode.BAD_REQUEST, f"session id {short_id(msg.session_id)} is already in use")
        try:
            self.budget.reserve(msg.session_id, msg.max_length, stream.peer_id)
        except Overloaded as err:
            raise SessionError(ErrorCode.OVERLOADED, str(err)) from None
        try:
            cache = await self.steps.new_cache(msg.span, msg.max_length)
        except SessionError:  # out of device memory (StepLoop.new_cache says how much was asked, where)
            self.budget.release(msg.session_id)
            raise
        except Exception as err:
            self.budget.release(msg.session_id)
            log.warning("cannot allocate a KV cache for session %s: %s", short_id(msg.session_id), err)
            raise SessionError(ErrorCode.OVERLOADED, f"cannot allocate the KV cache: {err}") from None
        if not self.accepting:
            self.budget.release(msg.session_id)
            raise SessionError(ErrorCode.OVERLOADED, "server is shutting down; open a session elsewhere")
        session = Session(msg.session_id, msg.span, msg.max_length, msg.dtype, stream, next_hop=next_hop,
                          client=stream.peer_id, prev_peer=msg.prev_peer, cache=cache,
                          last_activity=time.monotonic())
        if self.delivery.identity is not None:
            session.chain = CommitChain(self.model_id, msg.span, msg.session_id, self.peer_id)
        self.sessions[session.session_id] = session
        if next_hop is not None:
            self._origins[next_hop.session_id] = session
        log.info("session %s opened by %s: blocks %s, max length %d, dtype %s%s; %d open, %d tokens left",
                 session.short_id, stream.peer_id[:12], msg.span, msg.max_length, msg.dtype,
                 f", pushes to {next_hop.peer_id[:12]}" if next_hop else "", len(self.sessions),
                 self.budget.tokens_left)
        self.on_change()
        return session

    def _next_hop(self, span: BlockRange, route_tail: list[Hop]) -> Hop | None:
        """The first hop of ``route_tail`` after checking it continues ``span`` (``SessionError`` if not)."""
        next_hop = route_tail[0] if route_tail else None
        num_blocks = self.steps.span.spec.num_blocks
        if next_hop is not None and (next_hop.span.start != span.end or next_hop.span.end > num_blocks):
            raise SessionError(ErrorCode.BAD_REQUEST,
                               f"route tail must continue at block {span.end} within the model's "
                               f"{num_blocks} blocks, got next hop span {next_hop.span}")
        return next_hop

    def retarget(self, session: Session, msg: Retarget) -> None:
        """Push ``session``'s next outputs to ``msg.route_tail[0]`` (or nowhere); ``SessionError`` if invalid."""
        if msg.session_id != session.session_id:
            raise SessionError(ErrorCode.UNKNOWN_SESSION,
                               f"this stream carries session {session.short_id}, not {short_id(msg.session_id)}")
        next_hop = self._next_hop(session.span, msg.route_tail)
        old = session.next_hop
        if old is not None and self._origins.get(old.session_id) is session:
            del self._origins[old.session_id]
        session.next_hop = next_hop
        if next_hop is not None:
            self._origins[next_hop.session_id] = session
        if msg.prev_peer is not None:
            session.prev_peer = msg.prev_peer
        log.info("session %s now pushes to %s", session.short_id,
                 f"{next_hop.peer_id[:12]} (blocks {next_hop.span})" if next_hop else "nobody")

    def end(self, session: Session, reason: str) -> None:
        """Forget ``session`` and release its memory (idempotent)."""
        if session.ended:
            return
        session.ended, session.end_reason = True, reason
        self.steps.drop(session)
        self.sessions.pop(session.session_id, None)
        if session.next_hop is not None and self._origins.get(session.next_hop.session_id) is session:
            del self._origins[session.next_hop.session_id]
        freed = self.budget.release(session.session_id)
        session.cache = None
        log.info("session %s ended (%s): %d tokens freed; %d open, %d tokens left", session.short_id,
                 reason, freed, len(self.sessions), self.budget.tokens_left)
        self.on_change()

    async def terminate(self, session: Session, code: str, message: str, *, reason: str) -> None:
        """End ``session`` from the server side: tell its client, then close its stream."""
        if session.ended:
            return
        self.end(session, reason)
        outbox = session.outbox
        with contextlib.suppress(MeshinferError, TimeoutError):
            async with asyncio.timeout(2.0):
                await outbox.send(Error(code=code, message=message, session_id=session.session_id))
        await outbox.close(timeout=0.5)

    async def _expire_idle(self) -> None:
        interval = min(1.0, self.idle_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for step, pusher in self._early.expire(now):  # their Open never came: refuse them as at once
                await self._refuse_push(pusher, step)
            for session in list(self.sessions.values()):
                if session.idle_for(now) > self.idle_timeout:
                    await self.terminate(session, ErrorCode.TIMEOUT,
                                         f"session idle for more than {self.idle_timeout:g}s; closed",
                                         reason="idle")

    # ---- steps -------------------------------------------------------------------------------

    def step(self, session: Session, msg: Step, *, pushed: bool = False) -> None:
        """Take one step for ``session`` (from its client or pushed); raises ``SessionError``."""
        kind = check_step(session, msg, hidden_size=self.spec_hidden_size, max_step_tokens=self.max_step_tokens)
        now = time.monotonic()
        session.last_activity = now
        if kind is StepKind.NEW:
            if len(session.pending) >= MAX_QUEUED_STEPS:
                raise SessionError(ErrorCode.LIMIT_EXCEEDED,
                                   f"session already has {MAX_QUEUED_STEPS} steps waiting; wait for their results")
            queued, limit = self.steps.queued_for(session.client), self.max_queued_steps_per_peer
            if queued >= limit:
                raise SessionError(ErrorCode.OVERLOADED,
                                   f"peer {short_peer(session.client)} has {queued} steps waiting here "
                                   f"(limit --max-queued-steps-per-peer {limit}); wait for their results")
            self.steps.submit(StepJob(session, msg.step_id, msg.position, msg.hidden, now, pushed, msg.burst,
                                      want_commit=msg.want_commit))
        elif kind is StepKind.REPEAT:
            assert session.last_output is not None
            self.delivery.reply(session, StepResult(session_id=session.session_id, step_id=msg.step_id,
                                           hidden=session.last_output))

    def take_local(self, step: Step) -> None:
        """Take ``step`` pushed by a session of this very server (``delivery.LocalSteps``)."""
        target = self.sessions.get(step.session_id)
        if target is None or not target.may_push(self.peer_id):
            raise TransportError(f"no session {short_id(step.session_id)} here accepts steps from this server")
        try:
            self.step(target, step, pushed=True)
        except SessionError as err:
            self.delivery.reply(target, Error(code=err.code, message=str(err), session_id=target.session_id,
                                              step_id=step.step_id))

    def on_results(self, finished: list[Finished]) -> None:
        """The step loop's deliver callback (``Delivery.on_results``)."""
        self.delivery.on_results(finished)

    def on_push_error(self, err: Error) -> None:
        """A next hop refused a step we pushed: tell the client of the session that pushed it."""
        origin = self._origins.get(err.session_id or "")
        if origin is None or origin.ended or origin.next_hop is None:
            return
        self.delivery.reply(origin, Error(
            code=ErrorCode.NEXT_HOP_FAILED, session_id=origin.session_id, step_id=err.step_id,
            message=f"next hop {origin.next_hop.peer_id} refused the pushed step: {err.code}: {err.message}"[:4096]))

    # ---- stream handlers ---------------------------------------------------------------------

    async def _next(self, stream: MessageStream, timeout: float | None,
                    session: Session | None) -> Message | None:
        """The next decodable message; None when undecodable (already answered)."""
        payload = await stream.recv_bytes(timeout)
        try:
            return decode_message(payload, self.limits)
        except WireError as err:
            sid = session.session_id if session is not None else None
            reply = error_message(err, session_id=sid)
            if session is not None:
                self.delivery.reply(session, reply)
            else:
                await stream.send(reply)
            return None

    async def handle_session(self, stream: MessageStream) -> None:
        """Serve one ``meshinfer/session/1`` stream: one session at a time, one after another (a client reuses
        the connection: after ``Close`` the stream waits ``OPEN_TIMEOUT`` for the next ``Open``)."""
        session: Session | None = None
        served = 0
        refused: Error | None = None  # the latest refused Open: its Steps get its error (pipelined Open + Step)
        reason = "client closed the stream"
        try:
            while True:
                try:
                    msg = await self._next(stream, OPEN_TIMEOUT if session is None else None, session)
                except StreamClosed:
                    return
                except StreamTimeout:
                    if session is None and served:
                        return  # an idle kept connection: end it quietly
                    reason = "stream failed: read timeout"
                    raise
                except MeshinferError as err:  # broken frames, a reset stream, a read timeout
                    reason = f"stream failed: {err}"
                    raise
                if msg is None:
                    continue
                if session is not None and session.ended:
                    return
                if isinstance(msg, Open):
                    if session is not None:
                        self.delivery.reply(session, Error(code=ErrorCode.BAD_REQUEST, session_id=session.session_id,
                                                  message="this stream already carries a session; open another stream"))
                        continue
                    try:
                        session = await self.open(msg, stream)
                    except SessionError as err:
                        refused = Error(code=err.code, message=str(err), session_id=msg.session_id)
                        await stream.send(refused)
                        for step, pusher in self._early.take(msg.session_id):
                            await self._refuse_push(pusher, step)
                        continue
                    served += 1
                    refused = None
                    pool, hop = self.delivery.pool, session.next_hop
                    if pool is not None and hop is not None and hop.peer_id != self.peer_id:
                        pool.warm(hop)  # dial the next hop now: the first push must not wait for it
                    await stream.send(Opened(session_id=msg.session_id, span=msg.span, max_length=msg.max_length))
                    for step, pusher in self._early.take(msg.session_id):  # pushes that overtook this Open
                        await self._take_push(session, step, pusher)
                elif isinstance(msg, Step):
                    if session is None:
                        if refused is not None and refused.session_id == msg.session_id:
                            await stream.send(Error(code=refused.code, message=refused.message,
                                                    session_id=msg.session_id, step_id=msg.step_id))
                            continue
                        await stream.send(Error(code=ErrorCode.UNKNOWN_SESSION, session_id=msg.session_id,
                                                step_id=msg.step_id, message="send Open before the first Step"))
                        continue
                    try:
                        self.step(session, msg)
                    except SessionError as err:
                        self.delivery.reply(session, Error(code=err.code, message=str(err), session_id=msg.session_id,
                                                  step_id=msg.step_id))
                elif isinstance(msg, Retarget):
                    if session is None:
                        await stream.send(Error(code=ErrorCode.UNKNOWN_SESSION, session_id=msg.session_id,
                                                message="send Open before Retarget"))
                        continue
                    try:
                        self.retarget(session, msg)
                    except SessionError as err:
                        self.delivery.reply(session, Error(code=err.code, message=str(err), session_id=msg.session_id))
                elif isinstance(msg, Close):
                    if session is None or msg.session_id != session.session_id:
                        continue  # nothing open here (e.g. its Open was refused): the stream stays for another
                    if session.delivery is not None:
                        await asyncio.wait([session.delivery], timeout=5.0)  # let queued replies leave
                    self.end(session, "closed by client")
                    if session.delivery is not None:
                        await asyncio.wait([session.delivery], timeout=5.0)
                    session = None
                elif isinstance(msg, Ping):
                    await stream.send(Pong(seq=msg.seq, payload=msg.payload))
                else:
                    error = Error(code=ErrorCode.BAD_REQUEST, message=f"unexpected {type(msg).__name__} message",
                                  session_id=session.session_id if session else None)
                    await stream.send(error)
        finally:
            if session is not None:
                self.end(session, reason)

    async def handle_push(self, stream: MessageStream) -> None:
        """Serve one ``meshinfer/push/1`` stream from a previous hop: steps for our sessions."""
        while True:
            try:
                msg = await self._next(stream, None, None)
            except StreamClosed:
                return
            if msg is None:
                continue
            if not isinstance(msg, Step):
                await stream.send(Error(code=ErrorCode.BAD_REQUEST, message="push streams carry only Step messages"))
                continue
            session = self.sessions.get(msg.session_id)
            if session is not None and not session.ended and session.may_push(stream.peer_id):
                await self._take_push(session, msg, stream)
            elif not self._early.hold(msg.session_id, stream.peer_id, (msg, stream), len(msg.hidden.data),
                                      time.monotonic()):
                await self._refuse_push(stream, msg)
            # else held: its Open may still be on its way (the client does not wait for Opened); a push no session
            # will take is refused when it expires, whether its id is unknown or not its pusher's (no oracle for ids)

    async def _take_push(self, session: Session | None, msg: Step, stream: MessageStream) -> None:
        """Queue ``msg``, pushed on ``stream``, for ``session`` if its pusher may push into it; else refuse it."""
        if session is None or session.ended or not session.may_push(stream.peer_id):
            await self._refuse_push(stream, msg)
            return
        try:
            self.step(session, msg, pushed=True)
        except SessionError as err:
            self.delivery.reply(session, Error(code=err.code, message=str(err), session_id=msg.session_id,
                                               step_id=msg.step_id))

    async def _refuse_push(self, stream: MessageStream, msg: Step) -> None:
        """The one answer to a push no session here takes (the same for every reason: no oracle for ids)."""
        with contextlib.suppress(MeshinferError):
            await stream.send(Error(code=ErrorCode.UNKNOWN_SESSION, session_id=msg.session_id, step_id=msg.step_id,
                                    message=f"no open session {short_id(msg.session_id)} here accepts steps "
                                            f"from peer {short_peer(stream.peer_id)}"))
