"""Delivery of finished steps: the ordered reply chain of each session, pushes to the next hop, burst tags.

Contract: ``Delivery`` is the collaborator of ``SessionService`` (``server.handler``) that sends, built with
this server's peer id, its ``PushPool`` (None: cannot push) and a ``LocalSteps`` port (takes a step pushed to
a session of this very server). ``on_results`` is the step loop's deliver callback (one turn's finished
steps, never blocks); ``reply`` sends any message to a session's client after what is queued for it. For
each step: with a next hop, its output is pushed there first (``PushPool``, or through the ``LocalSteps``
port when the next hop is this very server), then ``StepResult`` goes to the session's client, then
``Error(next_hop_failed)`` if the push failed; an error goes to the client as ``Error``. Replies of one
session leave in step order (one delivery chain per session; a synchronous fast path when its streams are
idle, through ``Outbox.send_nowait``). The outputs of one turn
that go to the same next server, and the final outputs (no next hop) that go back to the same client,
carry one burst tag (``wire.burst``) so the receiver computes them as one batch again. Given this server's
``Identity``, each computed result extends its session's commitment chain (``p2p.commit.CommitChain``, created at
open as ``Session.chain``) and every ``COMMIT_EVERY``-th ``StepResult`` carries the signed ``Commit`` (RSA-PSS
signing measured at ~0.3 ms on a shared 2-core machine, once per 16 steps: done on the loop), and so does the
result of a step that asked for one (``Step.want_commit``, passed on with the push). Knows nothing of
admission, expiry or stream reading (``server.handler``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol

from meshinfer.errors import MeshinferError, TransportError
from meshinfer.p2p.commit import sign_commit
from meshinfer.p2p.identity import Identity
from meshinfer.server.push import PushPool
from meshinfer.server.scheduler import Finished
from meshinfer.server.session import Session, StepJob
from meshinfer.wire.burst import new_burst
from meshinfer.wire.messages import Burst, Commit, Error, ErrorCode, Hop, Message, Step, StepResult, encode_message
from meshinfer.wire.tensor import Tensor

log = logging.getLogger(__name__)


def _destination(session: Session) -> tuple[str, str]:
    """Where a finished step of ``session`` goes: pushed to the next server, or back to its client as the
    final output (the copy every hop also sends its client is not part of a burst)."""
    if session.next_hop is not None:
        return "push", session.next_hop.peer_id
    return "client", session.client


class LocalSteps(Protocol):
    """Where a step pushed to this very server goes (``SessionService.take_local``)."""

    def __call__(self, step: Step) -> None:
        """Take ``step`` for the session ``step.session_id`` of this server; ``TransportError`` when there is
        none (a step that session refuses is answered to its own client by the callee)."""
        ...


class Delivery:
    """Sending finished steps on, in order per session (see the module docstring)."""

    def __init__(self, *, peer_id: str, local: LocalSteps, pool: PushPool | None = None,
                 identity: Identity | None = None) -> None:
        self.peer_id = peer_id
        self.pool = pool
        self.identity = identity
        """Signs the sessions' commitments (None: results carry no commits)."""
        self._local = local

    def _commit(self, session: Session, job: StepJob, output: Tensor) -> Commit | None:
        """Chain one computed result of ``session``; the signed commit when one is due."""
        chain = session.chain
        if chain is None:
            return None
        chain.extend(job.step_id, job.position, job.tokens, job.hidden.data, output.data)
        if not (chain.due or job.want_commit) or self.identity is None:
            return None
        return sign_commit(self.identity, session.session_id, chain.seal())

    def reply(self, session: Session, msg: Message) -> None:
        """Send ``msg`` to ``session``'s client after everything queued for it before."""
        async def send() -> None:
            await self._send(session, msg)

        self._chain(session, send)

    def _chain(self, session: Session, work: Callable[[], Awaitable[None]]) -> None:
        previous = session.delivery

        async def run() -> None:
            if previous is not None and not previous.done():  # the usual case (one step at a time) skips this
                await asyncio.wait([previous])
            try:
                await work()
            except Exception:
                log.exception("delivery for session %s failed", session.short_id)

        session.delivery = asyncio.create_task(run(), name=f"deliver:{session.short_id}")

    async def _send(self, session: Session, msg: Message) -> None:
        if session.ended:
            return
        with contextlib.suppress(MeshinferError):
            await session.outbox.send(msg)

    def on_results(self, finished: list[Finished]) -> None:
        """The step loop's deliver callback: the steps one turn finished (non-blocking). The outputs that go
        to the same next server, and the final outputs that go back to the same client, leave as one burst
        (``wire.burst``), so the receiver computes them as one batch again."""
        dests = [_destination(f.job.session) if f.output is not None else None for f in finished]
        bursts = {dest: new_burst(n) for dest, n in Counter(d for d in dests if d is not None).items()}
        for done, dest in zip(finished, dests, strict=True):
            self.on_result(done, bursts.get(dest) if dest is not None else None)

    def on_result(self, done: Finished, burst: Burst | None = None) -> None:
        """Deliver one finished step (non-blocking): push it on and answer the client."""
        job, output, error = done.job, done.output, done.error
        session = job.session
        if error is not None:
            self.reply(session, Error(code=error.code, message=str(error)[:4096], session_id=session.session_id,
                                      step_id=job.step_id))
            return
        assert output is not None
        commit = self._commit(session, job, output)
        if (session.delivery is None or session.delivery.done()) and self._deliver_now(session, job, output, burst,
                                                                                        commit):
            return

        async def deliver() -> None:
            push_error: MeshinferError | None = None
            hop = session.next_hop
            if hop is not None:
                step = Step(session_id=hop.session_id, step_id=job.step_id, position=job.position, hidden=output,
                            burst=burst, want_commit=job.want_commit)
                try:
                    await self._push(hop, step)
                except MeshinferError as err:
                    push_error = err
            await self._send(session, StepResult(session_id=session.session_id, step_id=job.step_id, hidden=output,
                                                 burst=burst if hop is None else None, commit=commit))
            if push_error is not None and hop is not None:
                log.info("session %s: push of step %d to %s failed: %s", session.short_id, job.step_id,
                         hop.peer_id[:12], push_error)
                await self._send(session, Error(code=ErrorCode.NEXT_HOP_FAILED, session_id=session.session_id,
                                                step_id=job.step_id,
                                                message=f"push to next hop {hop.peer_id} failed: {push_error}"[:4096]))

        self._chain(session, deliver)

    def _deliver_now(self, session: Session, job: StepJob, output: Tensor, burst: Burst | None,
                     commit: Commit | None = None) -> bool:
        """The fast path of ``on_result``: push and answer synchronously over idle streams (no task, no
        yield). False when it did nothing, so the caller takes the ordered async path."""
        hop = session.next_hop
        if hop is not None:
            if hop.peer_id == self.peer_id or self.pool is None:
                return False
            step = Step(session_id=hop.session_id, step_id=job.step_id, position=job.position, hidden=output,
                        burst=burst, want_commit=job.want_commit)
            if not self.pool.push_nowait(hop, step):
                return False
        result = StepResult(session_id=session.session_id, step_id=job.step_id, hidden=output,
                            burst=burst if hop is None else None, commit=commit)
        try:
            sent = not session.ended and session.outbox.send_nowait(encode_message(result))
        except MeshinferError:
            sent = True  # the client's stream is broken: the session ends when its reader notices
        if not sent:
            self.reply(session, result)
        return True

    async def _push(self, hop: Hop, step: Step) -> None:
        if hop.peer_id == self.peer_id:  # the next hop is this very server: no network
            self._local(step)
            return
        if self.pool is None:
            raise TransportError("this server cannot push (no push pool)")
        await self.pool.push(hop, step)
