"""Route planning: which servers, in which order, run which blocks of a model (DESIGN.md section 7).

Contract: a pure function of a swarm snapshot. Input: the servers' records (span, state, throughput),
optional per-peer round-trip estimates and a set of excluded peers. Output: a chain of hops whose spans
are consecutive and cover ``[start, end)`` exactly, minimising estimated latency per token:
``sum over hops (rtt(peer) + compute(peer) * blocks_used / blocks_served)``. A hop may use only part of a
server's span (a server can run any sub-range of the blocks it holds). This module imports neither torch
nor the network and performs no I/O, so it is tested in milliseconds.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshinfer.errors import MeshinferError
from meshinfer.types import BlockRange, PeerIdStr
from meshinfer.wire.records import ServerRecord

DEFAULT_RTT_S = 0.005
"""Round trip assumed for a peer with no measurement yet (seconds)."""

MIN_THROUGHPUT = 1e-3
"""Floor for announced throughput (tokens/s) so a zero never divides."""


class NoRouteError(MeshinferError):
    """No chain of online servers covers the requested blocks."""


@dataclass(frozen=True)
class RouteHop:
    """Run blocks ``span`` on server ``peer_id`` (a sub-range of what it serves)."""

    peer_id: PeerIdStr
    span: BlockRange
    record: ServerRecord


def _hop_cost(record: ServerRecord, blocks: int, rtt_s: float) -> float:
    served = len(record.span)
    compute_s = 1.0 / max(record.throughput, MIN_THROUGHPUT)  # seconds per token for its whole span
    return rtt_s + compute_s * blocks / served


def plan_route(
    servers: Iterable[ServerRecord],
    blocks: BlockRange,
    *,
    rtt_s: Mapping[PeerIdStr, float] | None = None,
    exclude: Iterable[PeerIdStr] = (),
) -> list[RouteHop]:
    """The cheapest chain of online servers covering ``blocks``; raise NoRouteError if none exists.

    Shortest path over block boundaries: from boundary ``i`` a server whose span contains block ``i``
    can take the route to its span's end or to any other server's start inside its span (switching
    anywhere else is never cheaper, because a hop's compute is linear in the blocks it runs). Ties go
    to fewer hops, then to the lexicographically smaller peer id, so plans are deterministic.
    """
    rtts = rtt_s or {}
    banned = set(exclude)
    candidates = [
        s for s in servers
        if s.state == "online" and s.peer_id not in banned
        and s.span.start < blocks.end and s.span.end > blocks.start
    ]
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
                    step = _hop_cost(s, j - i, rtts.get(s.peer_id, DEFAULT_RTT_S))
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


def _coverage_holes(servers: list[ServerRecord], blocks: BlockRange) -> str:
    """Human-readable list of the blocks in ``blocks`` that no candidate covers, e.g. ``"4:6, 9"``."""
    holes: list[str] = []
    start: int | None = None
    for b in [*blocks.blocks(), blocks.end]:
        hole = b < blocks.end and not any(b in s.span for s in servers)
        if hole and start is None:
            start = b
        elif not hole and start is not None:
            holes.append(str(start) if b - start == 1 else f"{start}:{b}")
            start = None
    return ", ".join(holes) if holes else "(none: coverage exists but no chain was found)"
