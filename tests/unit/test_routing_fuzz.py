"""Fuzzing the route planner with hostile snapshots: any records (claims from 0 to 1e300 tokens/s, any load, any
spans), any measurements (nan, inf, 0, negative), any exclusions and seeds: a plan is always a valid chain over
online, non-excluded servers, or a ``NoRouteError``; nothing else is raised. Also ``PeerStats`` and growing bans
under arbitrary sample streams."""

from __future__ import annotations

import itertools
import math
import random

from hypothesis import given
from hypothesis import strategies as st

from fuzzing import budget
from meshinfer.client.measured import PeerStats
from meshinfer.client.routing import NoRouteError, plan_route
from meshinfer.types import BlockRange
from meshinfer.weights.bans import PeerBans
from meshinfer.wire.records import ServerRecord

N = 8
PEERS = [f"P{i}" for i in range(6)]


@st.composite
def records(draw: st.DrawFn) -> ServerRecord:
    start = draw(st.integers(0, N - 1))
    return ServerRecord(
        peer_id=draw(st.sampled_from(PEERS)), model_id="m", span=BlockRange(start, draw(st.integers(start + 1, N))),
        state=draw(st.sampled_from(["online", "online", "joining", "draining"])),
        throughput=draw(st.floats(0, 1e300, allow_nan=False)), cache_tokens_left=0, addresses=[],
        software_version="t", sessions=draw(st.integers(0, 10**6)), queued_steps=draw(st.integers(0, 10**6)),
        batch_size=draw(st.integers(0, 4096)))


samples = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 10)


@budget(150)
@given(servers=st.lists(records(), max_size=8), measured=st.dictionaries(st.sampled_from(PEERS), samples),
       rtt=st.dictionaries(st.sampled_from(PEERS), st.floats(0, 10)), exclude=st.sets(st.sampled_from(PEERS)),
       cap=st.floats(1, 1e6), seed=st.none() | st.integers(0, 2**32), lo=st.integers(0, N - 1), width=st.integers(1, N))
def test_plans_are_valid_chains_or_no_route(servers: list[ServerRecord], measured: dict[str, float],
                                            rtt: dict[str, float], exclude: set[str], cap: float, seed: int | None,
                                            lo: int, width: int) -> None:
    blocks = BlockRange(lo, min(N, lo + width))
    rng = None if seed is None else random.Random(seed)
    try:
        route = plan_route(servers, blocks, rtt_s=rtt, exclude=exclude, measured=measured, prior_cap=cap, rng=rng)
    except NoRouteError:
        return
    assert route[0].span.start == blocks.start and route[-1].span.end == blocks.end
    for a, b in itertools.pairwise(route):
        assert a.span.end == b.span.start
    for hop in route:
        assert hop.peer_id not in exclude and hop.record.state == "online"
        assert hop.record.span.start <= hop.span.start < hop.span.end <= hop.record.span.end


@budget(100)
@given(events=st.lists(st.tuples(st.sampled_from(PEERS), st.integers(-2, 64), samples, st.booleans()), max_size=60))
def test_peer_stats_keep_finite_non_negative_figures(events: list[tuple[str, int, float, bool]]) -> None:
    stats = PeerStats(max_peers=4)
    for peer, blocks, seconds, is_rtt in events:
        if is_rtt:
            stats.record_rtt(peer, seconds)
        else:
            stats.record_step(peer, blocks, seconds, 0.0)
    assert len(stats) <= 4
    for value in [*stats.block_seconds(0.0).values(), *stats.rtt().values()]:
        assert math.isfinite(value) and value >= 0


@budget(100)
@given(times=st.lists(st.tuples(st.sampled_from(PEERS), st.floats(0, 1e5)), max_size=40))
def test_growing_bans_stay_within_their_bounds(times: list[tuple[str, float]]) -> None:
    bans = PeerBans(ban_s=60.0, ban_factor=4.0, ban_max_s=3600.0, max_peers=3)
    for peer, now in sorted(times, key=lambda t: t[1]):
        length = bans.ban(peer, now)
        assert 60.0 <= length <= 3600.0 and bans.banned(peer, now)
    assert len(bans) <= 3
