"""Which failed Opens prove a server's record false (a long ban) and which only make it back off; and failover
planning that re-reads the bans, so a stalled-then-resumed only server is used again within the wait."""

from __future__ import annotations

import asyncio
import time

import pytest

from meshinfer.client.recovery import Recovery, refutation
from meshinfer.client.routing import NoRouteError, RouteHop
from meshinfer.errors import RemoteError, TransportError, WireError
from meshinfer.types import BlockRange
from meshinfer.weights.bans import PeerBans
from meshinfer.wire.limits import DEFAULT_LIMITS
from meshinfer.wire.messages import ErrorCode
from meshinfer.wire.records import ServerRecord


@pytest.mark.parametrize(
    ("err", "dialled", "reached", "refuted"),
    [
        (RemoteError(ErrorCode.SPAN_NOT_SERVED, "no"), True, True, True),
        (RemoteError(ErrorCode.UNKNOWN_MODEL, "no"), True, False, True),
        (RemoteError(ErrorCode.OVERLOADED, "full"), True, False, False),  # busy, not lying
        (TransportError("cannot open a stream: refused"), False, False, True),  # never reachable: unreachable
        (TransportError("cannot open a stream: timed out"), False, True, False),  # known server: down or stalled
        (TransportError("cannot open a session: timed out"), True, False, False),  # dialled: stalled, not lying
        (WireError("odd reply"), True, False, False),
    ],
)
def test_refutation(err: Exception, dialled: bool, reached: bool, refuted: bool) -> None:
    assert (refutation(err, dialled=dialled, reached_before=reached) is not None) == refuted


def test_failover_planning_re_reads_the_bans_so_a_resumed_only_server_is_planned_again() -> None:
    record = ServerRecord(peer_id="S", model_id="m", span=BlockRange(0, 4), state="online", throughput=1.0,
                          cache_tokens_left=100, addresses=[], software_version="t")
    bans = PeerBans(base_s=0.3)
    calls: list[frozenset[str]] = []

    async def replan(blocks: BlockRange, exclude: frozenset[str]) -> list[RouteHop]:
        calls.append(exclude)
        if "S" in exclude:
            raise NoRouteError("no online servers cover blocks 0:4")
        return [RouteHop("S", blocks, record)]

    recovery = Recovery(replan, bans, open_hop=None, step_ids=iter(()), chunk_tokens=lambda _: 1,  # type: ignore[arg-type]
                        limits=DEFAULT_LIMITS, dtype="float32", max_failovers=1, step_timeout=10.0)
    bans.fail("S", time.monotonic())  # it stalled: a short backoff
    started = time.monotonic()
    route = asyncio.run(recovery._replan(BlockRange(0, 4), started))
    assert [h.peer_id for h in route] == ["S"] and time.monotonic() - started < 2.0
    assert calls[0] == {"S"} and calls[-1] == frozenset()
