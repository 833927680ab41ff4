"""The other servers an audit talks to, and the hop history it cuts: finding, opening and replaying on them.

Contract: helpers of ``client.audit.Auditor`` over one ``InferenceSession``. ``find_one`` plans one server serving
exactly a span (through the session's replanner ``find``, avoiding given peers; preferably of the audited server's
announced dtype: up to ``DTYPE_TRIES`` plans skip servers of another dtype); ``open_one`` opens a side session on it
(``InferenceSession.open_side``; None when none is found or it cannot open); ``replay`` runs hidden states through
such a session as ordinary steps, in the session's chunk size, and returns its outputs. ``truncate_parts`` /
``truncate_steps`` cut a hop's recorded inputs, outputs and step list at a position (a rewind), ``cat_rows`` takes
positions out of them. Knows nothing of shadows, verdicts, bans or tallies (``client.audit`` decides what to do with
what these return).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import torch

from meshinfer.client.hops import HopSession
from meshinfer.client.routing import NoRouteError, RouteHop
from meshinfer.errors import MeshinferError
from meshinfer.types import BlockRange
from meshinfer.wire.messages import StepResult

if TYPE_CHECKING:
    from meshinfer.client.session import InferenceSession

log = logging.getLogger(__name__)

DTYPE_TRIES = 3
"""Plans tried for a shadow or referee of the audited server's dtype before one of another dtype is taken."""

ServerFinder = Callable[[BlockRange, frozenset[str]], Awaitable[list[RouteHop]]]
"""``find(span, exclude)``: a route over ``span`` avoiding ``exclude`` (the session's replanner)."""


def truncate_parts(parts: list[torch.Tensor], position: int) -> list[torch.Tensor]:
    """The first ``position`` rows of the concatenation of ``parts`` ([T_k, H] each), still as parts."""
    out: list[torch.Tensor] = []
    left = position
    for part in parts:
        if left <= 0:
            break
        out.append(part if part.shape[0] <= left else part[:left])
        left -= part.shape[0]
    return out


def truncate_steps(steps: Sequence[tuple[int, int, int]], position: int) -> list[tuple[int, int, int]]:
    """The (step id, position, tokens) entries of ``steps`` before ``position``, a step straddling it cut to the
    tokens kept: aligned with the inputs and outputs a rewind keeps (``truncate_parts``). The hop's chain entry for a
    cut step still says the tokens it signed; ``client.evidence`` sees the difference (no evidence through it)."""
    return [(sid, at, min(tokens, position - at)) for sid, at, tokens in steps if at < position]


def cat_rows(parts: list[torch.Tensor], a: int, b: int) -> torch.Tensor:
    """Positions [a, b) of the concatenation of ``parts`` ([T_k, H] each): [b - a, H]."""
    return torch.cat(parts, dim=0)[a:b]


async def find_one(find: ServerFinder, span: BlockRange, exclude: set[str], dtype: str) -> RouteHop | None:
    """One server serving exactly ``span`` (not in ``exclude``, not banned), preferably computing in ``dtype``
    (the tightest tolerance: up to ``DTYPE_TRIES`` plans skip servers of another dtype); or None."""
    fallback: RouteHop | None = None
    skip = set(exclude)
    for _ in range(DTYPE_TRIES):
        try:
            route = await find(span, frozenset(skip))
        except (NoRouteError, MeshinferError):
            break
        if len(route) != 1 or route[0].span != span:
            break
        if route[0].record.dtype == dtype:
            return route[0]
        fallback = fallback or route[0]
        skip.add(route[0].peer_id)
    return fallback


async def open_one(session: InferenceSession, find: ServerFinder, span: BlockRange, exclude: set[str],
                   dtype: str) -> HopSession | None:
    """A side session of ``session`` on one server serving exactly ``span`` (see ``find_one``), opened; or None."""
    hop = await find_one(find, span, exclude, dtype)
    if hop is None:
        return None
    hs = HopSession(hop, secrets.token_hex(12))
    try:
        await session.open_side(hs)
    except (MeshinferError, TimeoutError) as err:
        log.info("cannot open an audit session on %s: %s", hs.where(), err)
        await hs.close(send_timeout=0.5, stream_timeout=0.5)
        return None
    return hs


async def replay(session: InferenceSession, hs: HopSession, x: torch.Tensor, position: int) -> torch.Tensor:
    """Run ``x`` ([P, H]) through ``hs`` from ``position`` in ``session``'s chunks; its outputs ([P, H])."""
    outs: list[torch.Tensor] = []
    for chunk in torch.split(x, session.chunk_tokens(x.shape[1]), dim=0):
        step_id = next(session.step_ids)
        reply = await hs.request_step(step_id, position, chunk, timeout=session.step_timeout)
        if not isinstance(reply, StepResult) or reply.step_id != step_id:
            raise MeshinferError(f"{hs.where()} answered an audit step with {type(reply).__name__}")
        outs.append(hs.output(reply, chunk, session.node.settings.stream.limits, session.dtype))
        position += chunk.shape[0]
    return torch.cat(outs, dim=0)
