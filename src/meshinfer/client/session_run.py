"""One session of a ``DistributedModel`` and one generation on it: the route's session opened (with failover and
audits as configured), the generation loop wired to its forward pass and the batched LM head, then the session held
for the next prompt or closed.

Contract: ``aopen_route_session(model, view, max_length, exclude)`` plans a route avoiding ``exclude`` (with
``private`` blocks, over the middle ones only) and opens an ``InferenceSession`` on it (``replan`` for failover keeps
the route's quant mode; with ``config.audit`` an ``Auditor`` whose shadow routes use it too; the model's receipts),
recorded as the model's ``last_route`` / ``last_session``; a private split's is wrapped in a ``PrivateSplitSession``.
``agenerate_on(model, session, ids, params, keep, heads=, embed=, hold=)`` runs the generation of ``ids`` on
``session``, whose servers already hold the first ``keep`` positions of ``ids`` (a held session, rewound here; 0: a
fresh one): the prompt step sends only ``ids[keep:]``. It picks the loop as ``DistributedModel`` always did:
``client.speculative.agenerate_speculative`` when speculation is worth it, else ``client.audited.agenerate_audited``
with an auditor, else ``models.engine.agenerate_scored``; with more than ``config.speculate_busy_sessions``
generations decoding at once (``heads.active``; 0: no limit) speculation drafts only from 3-token repeats; rollbacks
(audits, rejected drafts) rewind the remote session (a private split's wrapper follows it). The model's counters
(failovers, decode steps and route seconds) take the session's increments however it ends. Ending normally, with
``hold`` given and the model open, the session is handed to ``hold`` with the ids its servers hold
(``client.held_sessions``); otherwise (an error, or abandoned: a client that went away should free the servers'
memory) it is closed. Runs on the client's loop; the tensors: ``embed`` ids [T] -> [T, H] for the wire, the head's
logits [rows, V] float32.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection
from typing import TYPE_CHECKING

import torch

from meshinfer.client.audit import Auditor
from meshinfer.client.audited import agenerate_audited
from meshinfer.client.head_batch import HeadBatcher
from meshinfer.client.private_split import ClientSession, PrivateSplitSession
from meshinfer.client.routing import RouteHop
from meshinfer.client.session import InferenceSession
from meshinfer.client.speculative import agenerate_speculative, worth_speculating
from meshinfer.errors import ConfigError
from meshinfer.models.engine import agenerate_scored
from meshinfer.models.generator import GenerationParams
from meshinfer.models.sampling import ScoredToken
from meshinfer.types import BlockRange

if TYPE_CHECKING:
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel
    from meshinfer.client.swarm import SwarmView

Hold = Callable[[ClientSession, list[int]], Awaitable[None]]
"""Keep a session idle with the ids its servers hold (``HeldSessions.hold``)."""


async def aopen_route_session(model: DistributedModel, view: SwarmView, max_length: int,
                              exclude: Collection[str] = ()) -> ClientSession:
    """A fresh session of ``model`` holding up to ``max_length`` tokens (see the module docstring)."""
    middle = model.private.middle if model.private is not None else None
    config, ref = model.config, model.ref
    route = await view.plan(ref, blocks=middle, exclude=exclude, wait=config.route_wait)
    model.last_route = route
    quant = route[0].record.quant  # every hop's (plan_uniform_route); replacements keep it: same outputs

    async def replan(blocks: BlockRange, exclude: frozenset[str]) -> list[RouteHop]:
        return await view.plan(ref, blocks=blocks, exclude=exclude, wait=config.route_wait, quant=quant)

    session = await InferenceSession.open(
        view.node, route, model_id=ref.model_id, max_length=max_length, dtype=model.wire_dtype,
        on_rtt=view.record_rtt, replan=replan if config.failover else None, bans=view.bans, quant=quant,
        config=config, stats=view.stats,
    )
    if config.audit:
        async def find(blocks: BlockRange, exclude: frozenset[str]) -> list[RouteHop]:
            return await view.plan(ref, blocks=blocks, exclude=exclude, wait=0.0, quant=quant)

        session.auditor = Auditor(session, find, model.audits, report=view.report if config.audit_report else None)
    session.receipts = model.receipts
    model.last_session = session
    return session if model.private is None else PrivateSplitSession(session, model.private)


async def agenerate_on(model: DistributedModel, session: ClientSession, ids: list[int], params: GenerationParams,
                       keep: int, *, heads: HeadBatcher, embed: Callable[[list[int]], torch.Tensor],
                       hold: Hold | None) -> AsyncGenerator[ScoredToken]:
    """The generation of ``ids`` on ``session`` (see the module docstring)."""
    remote = session.remote if isinstance(session, PrivateSplitSession) else session
    history: list[int] = list(ids[:keep])  # the ids the servers hold KV for, positions [0, len)
    skip = keep
    failovers, steps, route_s = len(remote.failovers), remote.decode_steps, remote.decode_route_s
    heads.active += 1
    normal = False
    try:
        if keep:
            model.last_session = remote
            model.last_route = remote.route
            await session.rewind(keep)

        async def forward_rows(chunk: list[int], position: int, rows: int) -> torch.Tensor:  # [T] -> [rows, V]
            nonlocal skip
            if skip and position == 0 and len(chunk) > skip:  # the prompt: its first positions are held
                chunk, position = chunk[skip:], skip
            skip = 0
            if position != session.position:
                raise ConfigError(f"generation at position {position}, the session is at {session.position}")
            del history[position:]
            history.extend(chunk)
            out = await session.forward(embed(chunk))  # [T, H] on the CPU
            logits, session.burst = await heads.logits_rows(out[-rows:], session.last_burst, session.route[0].peer_id)
            return logits  # [rows, V] float32

        async def forward(chunk: list[int], position: int) -> torch.Tensor:  # ids [T] -> logits [V]
            return (await forward_rows(chunk, position, 1))[0]

        eos = model.spec.eos_token_ids
        if worth_speculating(params, model.config.speculate):
            generation = agenerate_speculative(remote, forward_rows, ids, params, eos,
                                               draft=model.config.draft_tokens, stats=model.speculation,
                                               busy=lambda: _busy(model.config, heads))
        elif remote.auditor is not None:
            generation = agenerate_audited(remote, forward, ids, params, eos)
        else:
            generation = agenerate_scored(forward, ids, params, eos)
        async for item in generation:
            yield item
        normal = True
    finally:
        heads.active -= 1
        model.failovers_total += len(remote.failovers) - failovers
        model.decode_steps_total += remote.decode_steps - steps
        model.decode_route_s_total += remote.decode_route_s - route_s
        if normal and hold is not None and not model.closed:
            await asyncio.shield(hold(session, history[:session.position]))
        else:
            await asyncio.shield(session.close())


def _busy(config: ClientConfig, heads: HeadBatcher) -> bool:
    """More than ``speculate_busy_sessions`` generations decoding at once (0: never busy)?"""
    limit = config.speculate_busy_sessions
    return limit > 0 and heads.active > limit
