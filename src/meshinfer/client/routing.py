"""Route planning: which servers, in which order, run which blocks of a model (DESIGN.md section 7).

Contract: a pure function of a swarm snapshot. Input: the servers' records (span, state, throughput, load),
optional per-peer round-trip estimates, the client's own MEASURED seconds per token per block of the peers it
has used (``measured``), a set of excluded peers and an optional random generator. Output: a chain of hops
whose spans are consecutive and cover ``[start, end)`` exactly, minimising estimated latency per token:
``sum over hops cost(peer, blocks_used)``, where ``cost`` is ``measured[peer] * blocks`` for a measured peer,
else ``rtt(peer) + blocks / prior_rate(peer)``: the ANNOUNCED throughput is only a prior, and a capped one
(a server's announced block-tokens per second count for at most ``prior_cap`` times the median of the
candidates' (the lower median), so a record claiming 1e12 tokens/s looks at most ``prior_cap`` times as fast as a
typical one).
An unmeasured server announced as ``relayed`` (``ServerRecord.reachability``; an unknown kind counts as relayed)
costs ``RELAYED_HOP_PENALTY_S`` more per hop (``meshinfer.p2p.natkind``): a relay adds a round trip and caps
bandwidth; a measured one already pays it in what the client measured.
Announced load (``sessions`` and ``queued_steps`` over the batch the server measured) multiplies a server's
cost by ``1 + load``. With ``rng``, each server's cost is also multiplied by ``E ** (1 / SPREAD_EXPONENT)``
(``E`` drawn from Exp(1), once per server and plan): between equivalent servers the choice is random, a server
being picked with odds proportional to ``(1 / cost) ** SPREAD_EXPONENT`` (speed and free capacity), so
clients spread over the swarm instead of piling on one server, and a server that lies gets about the share
its real (measured) speed earns. Without ``rng`` plans are deterministic. A hop may use only part of a
server's span (a server can run any sub-range of the blocks it holds). ``plan_uniform_route`` plans over the
servers of ONE quant mode (``ServerRecord.quant``: outputs of int8, int4 and unquantized weights differ, so a
route never mixes them, and failover keeps the session's mode): the mode asked for, or the most precise mode
that covers the blocks; when only a mix of modes would cover them, its ``NoRouteError`` says which mode covers
what. This module imports neither torch nor the network and performs no I/O, so it is tested in milliseconds.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from meshinfer.errors import ConfigError, MeshinferError
from meshinfer.p2p.natkind import relayed_hop_penalty_s
from meshinfer.types import QUANT_MODES, BlockRange, PeerIdStr
from meshinfer.wire.records import ServerRecord

DEFAULT_RTT_S = 0.005
"""Round trip assumed for a peer with no measurement yet (seconds)."""

MIN_THROUGHPUT = 1e-3
"""Floor for announced throughput (tokens/s) so a zero never divides."""

PRIOR_CAP = 1.5
"""Announced speed is believed up to this many times the median of the candidates' (``plan_route``'s
``prior_cap``)."""

MIN_TRUST_FACTOR = 0.05
"""Floor of a peer's trust as the planner reads it (so a cost never divides by 0; reported peers are excluded)."""

SPREAD_EXPONENT = 2.0
"""With random spreading, a server's odds of being chosen go as ``(1 / cost) ** SPREAD_EXPONENT``: 1 would be
in proportion to speed, larger favours the faster more (lower latency for each client)."""

MIN_MEASURED_S = 1e-6
"""Floor for a measured seconds per token per block (a measurement of 0 is noise, not infinite speed)."""


class NoRouteError(MeshinferError):
    """No chain of online servers covers the requested blocks."""


@dataclass(frozen=True)
class RouteHop:
    """Run blocks ``span`` on server ``peer_id`` (a sub-range of what it serves)."""

    peer_id: PeerIdStr
    span: BlockRange
    record: ServerRecord


@dataclass(frozen=True)
class _Cost:
    """How one server's hop cost grows with the blocks it runs: ``(fixed_s + block_s * blocks) * factor``."""

    fixed_s: float
    block_s: float
    factor: float

    def of(self, blocks: int) -> float:
        return (self.fixed_s + self.block_s * blocks) * self.factor


def prior_rates(servers: Iterable[ServerRecord], cap: float = PRIOR_CAP) -> dict[PeerIdStr, float]:
    """Each server's believed speed before any measurement, in block-tokens per second: its announced
    ``throughput * len(span)``, at most ``cap`` times the lower median of all of them (at least ``MIN_THROUGHPUT``;
    the lower median: one honest server and one liar make a ceiling of 1.5x the honest one, not of their mean)."""
    rates = {s.peer_id: _announced_rate(s) for s in servers}
    if not rates:
        return {}
    ceiling = cap * statistics.median_low(rates.values())  # low: with 2 servers, not the mean of honest and liar
    return {peer: min(rate, ceiling) for peer, rate in rates.items()}


def _announced_rate(record: ServerRecord) -> float:
    rate = record.throughput * len(record.span)
    return rate if math.isfinite(rate) and rate > MIN_THROUGHPUT else MIN_THROUGHPUT


def load_factor(record: ServerRecord) -> float:
    """``1 + (sessions + queued steps) / batch``: how much slower announced load makes a server (batch: the one it
    measured its aggregate throughput at, at least 1)."""
    return 1.0 + (record.sessions + record.queued_steps) / max(1, record.batch_size)


def _costs(candidates: list[ServerRecord], rtts: Mapping[PeerIdStr, float], measured: Mapping[PeerIdStr, float],
           prior_cap: float, rng: random.Random | None,
           trust: Mapping[PeerIdStr, float] | None = None) -> dict[PeerIdStr, _Cost]:
    priors = prior_rates(candidates, prior_cap)
    costs: dict[PeerIdStr, _Cost] = {}
    for s in sorted(candidates, key=lambda r: r.peer_id):  # one draw per server, in a fixed order (seeded plans)
        seen = measured.get(s.peer_id)
        if seen is not None and math.isfinite(seen):
            fixed, block = 0.0, max(seen, MIN_MEASURED_S)
        else:
            fixed, block = rtts.get(s.peer_id, DEFAULT_RTT_S), 1.0 / priors[s.peer_id]
            fixed += relayed_hop_penalty_s(s.reachability)
        factor = load_factor(s)
        if trust is not None:  # client.reputation: a new identity costs more than an established one
            factor /= min(1.0, max(trust.get(s.peer_id, 1.0), MIN_TRUST_FACTOR))
        if rng is not None:
            factor *= max(rng.expovariate(1.0), 1e-12) ** (1.0 / SPREAD_EXPONENT)
        costs[s.peer_id] = _Cost(fixed, block, factor)
    return costs


def plan_route(
    servers: Iterable[ServerRecord],
    blocks: BlockRange,
    *,
    rtt_s: Mapping[PeerIdStr, float] | None = None,
    exclude: Iterable[PeerIdStr] = (),
    measured: Mapping[PeerIdStr, float] | None = None,
    prior_cap: float = PRIOR_CAP,
    rng: random.Random | None = None,
    trust: Mapping[PeerIdStr, float] | None = None,
) -> list[RouteHop]:
    """The cheapest chain of online servers covering ``blocks``; raise NoRouteError if none exists. ``measured``:
    seconds per token per block this client measured on peers (they replace those peers' announced figures);
    ``prior_cap``: see ``prior_rates``; ``rng``: spread (see the module docstring); ``trust``: each peer's trust in
    (0, 1] (``client.reputation``; absent: 1): its cost factor is divided by it.

    Shortest path over block boundaries: from boundary ``i`` a server whose span contains block ``i``
    can take the route to its span's end or to any other server's start inside its span (switching
    anywhere else is never cheaper, because a hop's compute is linear in the blocks it runs). Ties go
    to fewer hops, then to the lexicographically smaller peer id, so plans are deterministic.
    """
    rtts = rtt_s or {}
    if not prior_cap >= 1:
        raise ConfigError(f"prior_cap must be >= 1, got {prior_cap}")
    banned = set(exclude)
    candidates = [
        s for s in servers
        if s.state == "online" and s.peer_id not in banned
        and s.span.start < blocks.end and s.span.end > blocks.start
    ]
    costs = _costs(candidates, rtts, measured or {}, prior_cap, rng, trust)
    cut_points = sorted({blocks.start, blocks.end} | {
        s.span.start for s in candidates if blocks.start < s.span.start < blocks.end
    })

    # Dijkstra over boundaries. Heap order (cost, hops, peer-id path) makes the first pop of a boundary
    # its best way in, ties included; the predecessor is recorded then.
    came_from: dict[int, tuple[int, ServerRecord]] = {}
    # The unique counter keeps records (which have no order) out of tuple comparison.
    heap: list[tuple[float, int, tuple[str, ...], int, int, int, ServerRecord | None]] = [
        (0.0, 0, (), blocks.start, blocks.start, 0, None)
    ]
    pushed = 0
    done: set[int] = set()
    while heap:
        cost, hops, path, i, prev, _, via = heapq.heappop(heap)
        if i in done:
            continue
        done.add(i)
        if via is not None:
            came_from[i] = (prev, via)
        if i == blocks.end:
            break
        for s in candidates:
            if not s.span.start <= i < s.span.end:
                continue
            limit = min(s.span.end, blocks.end)
            for j in [c for c in cut_points if i < c < limit] + [limit]:
                if j not in done:
                    step = costs[s.peer_id].of(j - i)
                    pushed += 1
                    heapq.heappush(heap, (cost + step, hops + 1, (*path, s.peer_id), j, i, pushed, s))

    if blocks.end not in came_from:
        covered = _coverage_holes(candidates, blocks)
        raise NoRouteError(
            f"no online servers cover blocks {covered} of the requested {blocks}"
            + (f" ({len(banned)} peer(s) excluded)" if banned else "")
        )
    route: list[RouteHop] = []
    j = blocks.end
    while j != blocks.start:
        i, s = came_from[j]
        route.append(RouteHop(peer_id=s.peer_id, span=BlockRange(i, j), record=s))
        j = i
    route.reverse()
    return route


def plan_uniform_route(
    servers: Iterable[ServerRecord],
    blocks: BlockRange,
    *,
    quant: str | None = None,
    rtt_s: Mapping[PeerIdStr, float] | None = None,
    exclude: Iterable[PeerIdStr] = (),
    measured: Mapping[PeerIdStr, float] | None = None,
    prior_cap: float = PRIOR_CAP,
    rng: random.Random | None = None,
    trust: Mapping[PeerIdStr, float] | None = None,
) -> list[RouteHop]:
    """``plan_route`` over the servers whose weights are in quant mode ``quant``; None: the first mode of
    ``QUANT_MODES`` (most precise first) that has a route. Every hop of the result has the same mode."""
    pool = list(servers)
    excluded = set(exclude)
    modes = [quant] if quant is not None else list(QUANT_MODES)
    first: NoRouteError | None = None
    for mode in modes:
        try:
            return plan_route([s for s in pool if s.quant == mode], blocks, rtt_s=rtt_s, exclude=excluded,
                              measured=measured, prior_cap=prior_cap, rng=rng, trust=trust)
        except NoRouteError as err:
            first = first or err
    assert first is not None
    raise NoRouteError(_no_uniform_route(pool, blocks, quant, excluded, first))


def _no_uniform_route(servers: list[ServerRecord], blocks: BlockRange, quant: str | None, excluded: set[PeerIdStr],
                      first: NoRouteError) -> str:
    """Why no single-mode route exists: the plain holes, or which mode covers which blocks."""
    usable = [s for s in servers if s.state == "online" and s.peer_id not in excluded]
    if not _runs(blocks, lambda b: not any(b in s.span for s in usable)):  # together the modes cover every block
        by_mode = [f"{m} covers {_covered(usable, blocks, m)}" for m in sorted({s.quant for s in usable})]
        asked = f"no servers at quant {quant} cover" if quant is not None else "no single quant mode covers"
        return (f"{asked} every block of the requested {blocks} ({'; '.join(by_mode)}); a route never mixes quant "
                "modes, whose outputs differ: start servers so that one mode covers every block"
                + ("" if quant is None else ", or choose another mode with --quant"))
    if quant is None:  # the blocks no server of any mode covers
        holes = _coverage_holes(usable, blocks)
        return f"no online servers cover blocks {holes} of the requested {blocks}" + (
            f" ({len(excluded)} peer(s) excluded)" if excluded else "")
    text = str(first)
    if quant != "none":
        text = text.replace("no online servers cover", f"no online servers at quant {quant} cover", 1)
    return text


def _covered(servers: list[ServerRecord], blocks: BlockRange, mode: str) -> str:
    """Blocks of ``blocks`` that servers of ``mode`` cover, e.g. ``"0:10, 12"`` (or ``"nothing"``)."""
    mine = [s for s in servers if s.quant == mode]
    return ", ".join(_runs(blocks, lambda b: any(b in s.span for s in mine))) or "nothing"


def _coverage_holes(servers: list[ServerRecord], blocks: BlockRange) -> str:
    """Human-readable list of the blocks in ``blocks`` that no candidate covers, e.g. ``"4:6, 9"``."""
    holes = _runs(blocks, lambda b: not any(b in s.span for s in servers))
    return ", ".join(holes) if holes else "(none: coverage exists but no chain was found)"


def _runs(blocks: BlockRange, chosen: Callable[[int], bool]) -> list[str]:
    """The maximal runs of blocks in ``blocks`` for which ``chosen`` holds, as ``"a:b"`` or ``"a"``."""
    runs: list[str] = []
    start: int | None = None
    for b in [*blocks.blocks(), blocks.end]:
        hit = b < blocks.end and chosen(b)
        if hit and start is None:
            start = b
        elif not hit and start is not None:
            runs.append(str(start) if b - start == 1 else f"{start}:{b}")
            start = None
    return runs
