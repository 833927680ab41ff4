"""Failover: replace a failed hop of a live inference session and rebuild its KV cache by replay.

Contract: ``Recovery`` is the collaborator an ``InferenceSession`` (``meshinfer.client.session``) holds
when it can replan. ``replace(failed, reason)`` closes ``failed``, bans its peer (``PeerBans``), plans a
replacement chain covering the same blocks with ``replan`` (retrying while the swarm has none, for at
most half the step deadline), opens sessions there without push (through the ``open_hop`` it was given),
replays the span's input history through them in chunks (each replacement's outputs are the next
one's history; the last one's are dropped: the next hop already holds them), and returns the fresh
hops and the ``Failover`` record; the session splices them into its route. A replacement that fails
too backs off and another is planned (``max_failovers`` attempts). Each planning attempt avoids the peers
avoided AT THAT MOMENT: a backoff is short (a timeout or stall starts at 1 s and doubles), so when the
only server of a span stalls and resumes within the wait, it is planned again and the generation goes on
instead of failing with "no online servers cover blocks". ``refutation(err, ...)`` says when a failed Open
proves a server's record false (it refused the span or model it announces, or it was never reached and
its addresses cannot be dialled): the session then BANS it (long, growing: ``PeerBans.ban``) rather than
letting it back off. ``fix_tails(hops)`` re-points
pushes (``Retarget``) so every hop pushes to the session of the hop after it. Everything it uses is
given to its constructor; it reads no session state. Knows nothing of tokens; all methods run on the
session's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import torch

from meshinfer.client.hops import Failover, HopFailure, HopSession, link_prev, route_tail
from meshinfer.client.routing import NoRouteError, RouteHop
from meshinfer.errors import MeshinferError, RemoteError, TransportError
from meshinfer.types import BlockRange
from meshinfer.weights.bans import PeerBans
from meshinfer.wire.limits import WireLimits
from meshinfer.wire.messages import ErrorCode, Hop, StepResult

log = logging.getLogger(__name__)

Replanner = Callable[[BlockRange, frozenset[str]], Awaitable[list[RouteHop]]]
"""``replan(blocks, exclude) -> route`` over ``blocks`` avoiding the peers in ``exclude``."""

HopOpener = Callable[[HopSession, list[Hop]], Awaitable[None]]
"""``open_hop(hs, route_tail)``: open ``hs``'s stream and server session, pushing to ``route_tail``."""

REFUTING_CODES = frozenset({ErrorCode.SPAN_NOT_SERVED, ErrorCode.UNKNOWN_MODEL})
"""Answers to ``Open`` by which a server contradicts the record it announced."""

REPLAN_PAUSE_S = 0.5
"""Pause between two planning attempts while no route exists."""


def refutation(err: BaseException, *, dialled: bool, reached_before: bool) -> str | None:
    """Why a failed ``Open`` proves the server's announced record false, or None when it may just be busy, slow,
    stalled or restarting (then it only backs off). ``dialled``: a stream to it was opened; ``reached_before``:
    it answered this client before (a known server that cannot be dialled now is more likely down than lying)."""
    if isinstance(err, RemoteError) and err.code in REFUTING_CODES:
        return f"it refused the blocks it announces ({err.code})"
    if not dialled and not reached_before and isinstance(err, TransportError):
        return "none of its announced addresses could be dialled"
    return None


class Recovery:
    """Replaces failed hops of one session: plan, open, replay (see the module docstring)."""

    def __init__(self, replan: Replanner, bans: PeerBans, *, open_hop: HopOpener, step_ids: Iterator[int],
                 chunk_tokens: Callable[[int], int], limits: WireLimits, dtype: str, max_failovers: int,
                 step_timeout: float) -> None:
        self.replan = replan
        self.bans = bans
        self.open_hop = open_hop
        self.step_ids = step_ids
        """The session's step ids (shared: a replay's ids and the session's steps' never repeat)."""
        self.chunk_tokens = chunk_tokens
        """``chunk_tokens(hidden_size)``: the most tokens one replay step may carry."""
        self.limits = limits
        self.dtype = dtype
        self.max_failovers = max_failovers
        self.step_timeout = step_timeout

    async def replace(self, failed: HopSession, reason: str) -> tuple[list[HopSession], Failover]:
        """A fresh chain of servers covering ``failed``'s span, rebuilt from its history, and the record."""
        started = time.monotonic()
        banned_for = self.bans.fail(failed.hop.peer_id, started)
        log.warning("%s failed (%s); banned for %.0fs, replacing it", failed.where(), reason, banned_for)
        await failed.close(send_timeout=0.5, stream_timeout=0.5)
        history = list(failed.inputs)
        for _attempt in range(self.max_failovers):
            route = await self._replan(failed.hop.span, started)
            fresh = [HopSession(h, secrets.token_hex(12), prev=failed.prev) for h in route]
            link_prev(fresh)  # the first takes pushes from the failed hop's previous server, the rest from theirs
            try:
                replayed = await self._rebuild(fresh, history)
            except (MeshinferError, TimeoutError) as err:
                culprit = getattr(err, "hs", None) or fresh[0]
                self.bans.fail(culprit.hop.peer_id, time.monotonic())
                log.warning("replacement %s failed too (%s); trying another", culprit.where(), err)
                for hs in fresh:
                    await hs.close(send_timeout=0.5, stream_timeout=0.5)
                continue
            record = Failover(failed.hop.peer_id, failed.hop.span, reason, tuple(h.hop.peer_id for h in fresh),
                              time.monotonic() - started, replayed)
            log.info("replaced %s by %s in %.2fs (%d tokens replayed)", failed.where(),
                     ", ".join(h.where() for h in fresh), record.seconds, replayed)
            return fresh, record
        raise TransportError(f"could not replace {failed.where()} after {self.max_failovers} attempts")

    async def _replan(self, blocks: BlockRange, started: float) -> list[RouteHop]:
        """A route over ``blocks`` avoiding the peers avoided now (re-read each attempt: backoffs end), retried
        while none exists for at most half the step deadline since ``started``."""
        while True:
            try:
                return await self.replan(blocks, frozenset(self.bans.avoided(time.monotonic())))
            except NoRouteError:
                if time.monotonic() - started > self.step_timeout / 2:
                    raise
                await asyncio.sleep(REPLAN_PAUSE_S)

    async def _rebuild(self, fresh: list[HopSession], history: list[torch.Tensor]) -> int:
        """Open ``fresh`` (no push yet) and replay ``history`` through them in order; tokens replayed."""
        async def open_one(hs: HopSession) -> None:
            try:
                await self.open_hop(hs, [])
            except MeshinferError as err:
                raise HopFailure(hs, f"cannot open: {err}") from None

        await asyncio.gather(*(open_one(hs) for hs in fresh))
        inputs = history
        for hs in fresh:
            outputs: list[torch.Tensor] = []
            position = 0
            if inputs:
                whole = torch.cat(inputs, dim=0)  # [P, H]
                chunks = list(torch.split(whole, self.chunk_tokens(whole.shape[1]), dim=0))
                for chunk in chunks:
                    step_id, out = await self._replay_step(hs, position, chunk)
                    outputs.append(out)
                    hs.steps.append((step_id, position, chunk.shape[0]))
                    hs.work += chunk.shape[0]
                    position += chunk.shape[0]
                inputs = chunks  # the replacement's inputs step by step, as sent (aligned with its steps)
            hs.inputs, hs.outputs = list(inputs), list(outputs)
            inputs = outputs
        return sum(x.shape[0] for x in history)

    async def _replay_step(self, hs: HopSession, position: int, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        step_id = next(self.step_ids)
        try:
            reply = await hs.request_step(step_id, position, x, timeout=self.step_timeout)
        except MeshinferError as err:
            raise HopFailure(hs, f"replay failed: {err}") from None
        if not isinstance(reply, StepResult) or reply.step_id != step_id:
            raise HopFailure(hs, f"replay answered with an unexpected {type(reply).__name__}")
        return step_id, hs.output(reply, x, self.limits, self.dtype)


async def fix_tails(hops: Sequence[HopSession]) -> None:
    """Point every hop's pushes at the session of the hop after it, and have it take pushes from the server
    before it (after a replacement); from the last hop back, so a hop accepts its new previous server before
    that server is pointed at it."""
    for i in reversed(range(len(hops))):
        hs = hops[i]
        want = hops[i + 1].session_id if i + 1 < len(hops) else None
        prev = hops[i - 1].hop.peer_id if i > 0 else None
        if (hs.tail == want or want is None) and hs.prev == prev:
            continue
        await hs.retarget(route_tail(hops, i), prev)
