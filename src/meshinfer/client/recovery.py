"""Failover: replace a failed hop of a live inference session and rebuild its KV cache by replay.

Contract: ``Recovery`` is the part of ``InferenceSession`` (``meshinfer.client.session``) that swaps a
failed ``HopSession`` for a fresh chain of servers covering the same blocks: ban the failed peer
(``PeerBans``), plan a replacement with the session's ``replan`` (retrying while the swarm has none, for
at most half the step deadline), open sessions there without push, replay the span's input history
through them in chunks (each replacement's outputs are the next one's history; the last one's are
dropped: the next hop already holds them), splice them into the route and record a ``Failover``. A
replacement that fails too is banned and another is planned (``max_failovers`` attempts).
``_fix_tails`` re-points pushes (``Retarget``) so every hop pushes to the session of the hop after it.
Knows nothing of tokens; all methods run on the session's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

import torch

from meshinfer.client.hops import Failover, HopFailure, HopSession
from meshinfer.client.routing import NoRouteError, RouteHop
from meshinfer.errors import MeshinferError, TransportError
from meshinfer.types import BlockRange
from meshinfer.weights.bans import PeerBans
from meshinfer.wire.messages import Close, Hop, Retarget, Step, StepResult
from meshinfer.wire.tensor import encode_tensor

log = logging.getLogger(__name__)

Replanner = Callable[[BlockRange, frozenset[str]], Awaitable[list[RouteHop]]]
"""``replan(blocks, exclude) -> route`` over ``blocks`` avoiding the peers in ``exclude``."""


class Recovery:
    """Failover methods of ``InferenceSession`` (a mixin: it declares what it uses of the session)."""

    hops: list[HopSession]
    bans: PeerBans
    replan: Replanner | None
    max_failovers: int
    step_timeout: float
    push: bool
    failovers: list[Failover]
    _next_step_id: int

    async def _open_hop(self, hs: HopSession, route_tail: list[Hop]) -> None: ...
    def _route_tail(self, i: int) -> list[Hop]: ...
    def _per_step(self, hidden_size: int) -> int: ...
    def _start_reader(self, hs: HopSession) -> None: ...
    def _check_output(self, hs: HopSession, msg: StepResult, x: torch.Tensor) -> torch.Tensor: ...

    async def _replace(self, failed: HopSession, reason: str) -> None:
        """Swap ``failed`` for a fresh chain of servers covering its span, rebuilt from its history."""
        started = time.monotonic()
        banned_for = self.bans.fail(failed.hop.peer_id, started)
        log.warning("%s failed (%s); banned for %.0fs, replacing it", failed.where(), reason, banned_for)
        await self._drop(failed)
        assert self.replan is not None
        history = list(failed.inputs)
        for _attempt in range(self.max_failovers):
            exclude = frozenset(self.bans.avoided(time.monotonic()))
            route = await self._replan(failed.hop.span, exclude, started)
            fresh = [HopSession(h, secrets.token_hex(12)) for h in route]
            try:
                replayed = await self._rebuild(fresh, history)
            except (MeshinferError, TimeoutError) as err:
                culprit = getattr(err, "hs", None) or fresh[0]
                self.bans.fail(culprit.hop.peer_id, time.monotonic())
                log.warning("replacement %s failed too (%s); trying another", culprit.where(), err)
                for hs in fresh:
                    await self._drop(hs)
                continue
            index = self.hops.index(failed)
            self.hops[index:index + 1] = fresh
            for hs in fresh:
                self._start_reader(hs)
            record = Failover(failed.hop.peer_id, failed.hop.span, reason, tuple(h.hop.peer_id for h in fresh),
                              time.monotonic() - started, replayed)
            self.failovers.append(record)
            log.info("replaced %s by %s in %.2fs (%d tokens replayed)", failed.where(),
                     ", ".join(h.where() for h in fresh), record.seconds, replayed)
            return
        raise TransportError(f"could not replace {failed.where()} after {self.max_failovers} attempts")

    async def _replan(self, blocks: BlockRange, exclude: frozenset[str], started: float) -> list[RouteHop]:
        assert self.replan is not None
        while True:
            try:
                return await self.replan(blocks, exclude)
            except NoRouteError:
                if time.monotonic() - started > self.step_timeout / 2:
                    raise
                await asyncio.sleep(0.5)

    async def _rebuild(self, fresh: list[HopSession], history: list[torch.Tensor]) -> int:
        """Open ``fresh`` (no push yet) and replay ``history`` through them in order; tokens replayed."""
        async def open_one(hs: HopSession) -> None:
            try:
                await self._open_hop(hs, [])
            except MeshinferError as err:
                raise HopFailure(hs, f"cannot open: {err}") from None

        await asyncio.gather(*(open_one(hs) for hs in fresh))
        inputs = history
        for hs in fresh:
            hs.inputs = list(inputs)
            outputs: list[torch.Tensor] = []
            position = 0
            if inputs:
                whole = torch.cat(inputs, dim=0)  # [P, H]
                for chunk in torch.split(whole, self._per_step(whole.shape[1]), dim=0):
                    outputs.append(await self._replay_step(hs, position, chunk))
                    position += chunk.shape[0]
            inputs = outputs
        return sum(x.shape[0] for x in history)

    async def _replay_step(self, hs: HopSession, position: int, x: torch.Tensor) -> torch.Tensor:
        assert hs.stream is not None
        step_id = self._next_step_id
        self._next_step_id += 1
        msg = Step(session_id=hs.session_id, step_id=step_id, position=position, hidden=encode_tensor(x))
        try:
            reply = await hs.stream.request(msg, timeout=self.step_timeout)
        except MeshinferError as err:
            raise HopFailure(hs, f"replay failed: {err}") from None
        if not isinstance(reply, StepResult) or reply.step_id != step_id:
            raise HopFailure(hs, f"replay answered with an unexpected {type(reply).__name__}")
        return self._check_output(hs, reply, x)

    async def _fix_tails(self) -> None:
        """Point every hop's pushes at the session of the hop after it (after a replacement)."""
        if not self.push:
            return
        for i, hs in enumerate(self.hops):
            want = self.hops[i + 1].session_id if i + 1 < len(self.hops) else None
            if hs.tail == want or want is None:
                continue
            assert hs.stream is not None
            try:
                await hs.stream.send(Retarget(session_id=hs.session_id, route_tail=self._route_tail(i)))
            except TransportError as err:
                raise HopFailure(hs, f"cannot retarget its pushes: {err}") from None
            hs.tail = want

    async def _drop(self, hs: HopSession) -> None:
        """Stop reading ``hs`` and close its stream, telling its server when it is still there."""
        if hs.reader is not None:
            hs.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await hs.reader
            hs.reader = None
        if hs.stream is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.5):
                    await hs.stream.send(Close(session_id=hs.session_id))
            await hs.stream.close(timeout=0.5)

