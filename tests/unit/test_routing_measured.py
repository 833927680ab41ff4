"""Routing on measured figures, not claims: the capped prior, measurements replacing announcements, announced
load, random spread over equivalent servers, and what a client measures (``PeerStats``). Pure, milliseconds."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from meshinfer.client.measured import PeerStats
from meshinfer.client.routing import PRIOR_CAP, load_factor, plan_route, prior_rates
from meshinfer.errors import ConfigError
from meshinfer.types import BlockRange
from meshinfer.wire.records import ServerRecord

WHOLE = BlockRange(0, 12)


def server(peer: str, start: int = 0, end: int = 12, throughput: float = 100.0, *, sessions: int = 0,
           queued: int = 0, batch: int = 8) -> ServerRecord:
    return ServerRecord(peer_id=peer, model_id="m", span=BlockRange(start, end), state="online", throughput=throughput,
                        cache_tokens_left=1000, addresses=[], software_version="test", sessions=sessions,
                        queued_steps=queued, batch_size=batch)


HONEST = [server("H1"), server("H2"), server("H3")]
LIAR = server("L", throughput=1e12)


def shares(servers: list[ServerRecord], plans: int = 2000, seed: int = 7, **kwargs: object) -> Counter[str]:
    rng = random.Random(seed)
    return Counter(plan_route(servers, WHOLE, rng=rng, **kwargs)[0].peer_id for _ in range(plans))  # type: ignore[arg-type]


def test_an_announced_throughput_is_believed_only_up_to_the_cap() -> None:
    rates = prior_rates([*HONEST, LIAR])
    assert rates["H1"] == pytest.approx(100 * 12)
    assert rates["L"] == pytest.approx(PRIOR_CAP * 100 * 12)  # not 1.2e13
    assert prior_rates([*HONEST, LIAR], cap=1.0)["L"] == pytest.approx(1200)
    with pytest.raises(ConfigError, match="prior_cap"):
        plan_route(HONEST, WHOLE, prior_cap=0.5)


def test_a_new_client_does_not_send_every_session_to_the_liar() -> None:
    # before: the liar got every plan; now, unmeasured, it is at most PRIOR_CAP times as attractive
    assert plan_route([*HONEST, LIAR], WHOLE, prior_cap=1e30)[0].peer_id == "L"
    got = shares([*HONEST, LIAR])
    assert 0.2 < got["L"] / 2000 < 0.45
    assert all(got[h.peer_id] > 100 for h in HONEST)


def test_once_measured_slow_the_liar_gets_at_most_its_fair_share() -> None:
    measured = {"H1": 0.001, "H2": 0.001, "H3": 0.001, "L": 0.01}  # seconds per token per block: 10x slower
    got = shares([*HONEST, LIAR], measured=measured)
    assert got["L"] / 2000 < 0.05  # its speed is 1/31 of the swarm's: odds ~ (1/10)^2 of an honest server's
    assert plan_route([*HONEST, LIAR], WHOLE, measured=measured)[0].peer_id != "L"


def test_measurements_replace_announcements() -> None:
    servers = [server("A", throughput=1000.0), server("B", throughput=10.0)]
    assert plan_route(servers, WHOLE)[0].peer_id == "A"
    assert plan_route(servers, WHOLE, measured={"A": 0.01, "B": 0.001})[0].peer_id == "B"
    # nonsense measurements are ignored: the prior is used
    assert plan_route(servers, WHOLE, measured={"A": math.nan})[0].peer_id == "A"


def test_equivalent_servers_share_the_load_evenly() -> None:
    got = shares(HONEST, plans=3000)
    assert all(800 < got[h.peer_id] < 1200 for h in HONEST), got


def test_without_rng_plans_are_deterministic() -> None:
    assert {plan_route(HONEST, WHOLE)[0].peer_id for _ in range(50)} == {"H1"}


def test_announced_load_steers_away_from_busy_servers() -> None:
    busy = [server("A", sessions=8, batch=8), server("B", sessions=0)]
    assert load_factor(busy[0]) == 2.0 and load_factor(busy[1]) == 1.0
    assert plan_route(busy, WHOLE)[0].peer_id == "B"
    got = shares(busy)
    assert got["B"] > 3 * got["A"] > 0  # odds 1 : 1/4, both still used
    assert load_factor(server("C", sessions=3, queued=1, batch=0)) == 5.0  # an unmeasured batch counts as 1


def test_spread_keeps_routes_valid_across_chains() -> None:
    servers = [server("A", 0, 6), server("B", 6, 12), server("C", 0, 12), server("D", 4, 12, 300.0)]
    rng = random.Random(1)
    for _ in range(300):
        route = plan_route(servers, WHOLE, rng=rng)
        assert route[0].span.start == 0 and route[-1].span.end == 12
        assert all(a.span.end == b.span.start for a, b in itertools.pairwise(route))


def test_peer_stats_smooth_and_report_per_block_seconds() -> None:
    stats = PeerStats()
    assert not stats.reached("A") and stats.block_seconds(0.0) == {}
    stats.record_step("A", 4, 0.04, 0.0)
    assert stats.block_seconds(1.0) == {"A": pytest.approx(0.01)} and stats.reached("A") and stats.steps("A") == 1
    stats.record_step("A", 4, 0.08, 1.0)
    assert stats.block_seconds(2.0)["A"] == pytest.approx(0.7 * 0.01 + 0.3 * 0.02)
    for bad in (-1.0, math.nan, math.inf):
        stats.record_step("A", 4, bad, 2.0)
        stats.record_rtt("B", bad)
    stats.record_step("A", 0, 1.0, 2.0)
    assert stats.steps("A") == 2 and not stats.reached("B")
    stats.record_rtt("B", 0.002)
    assert stats.reached("B") and stats.rtt() == {"B": 0.002}


def test_peer_stats_memory_is_bounded() -> None:
    stats = PeerStats(max_peers=3)
    for i in range(10):
        stats.record_step(f"P{i}", 1, 0.001, 0.0)
    assert len(stats) == 3 and set(stats.block_seconds(0.0)) == {"P7", "P8", "P9"}
    with pytest.raises(ConfigError):
        PeerStats(max_peers=0)
    with pytest.raises(ConfigError):
        PeerStats(max_age=0.0)


def test_an_old_measurement_is_dropped_and_the_next_one_starts_afresh() -> None:
    stats = PeerStats(max_age=600.0)
    stats.record_step("L", 1, 1.0, 0.0)  # slow once (a burst of load?)
    assert stats.block_seconds(600.0) == {"L": 1.0}
    assert stats.block_seconds(601.0) == {}  # judged on its prior again: it gets a session now and then
    stats.record_step("L", 1, 0.001, 700.0)
    assert stats.block_seconds(700.0) == {"L": 0.001}  # not smoothed with the stale figure


def test_one_honest_server_and_one_liar_cap_the_liar_at_the_honest_figure() -> None:
    rates = prior_rates([server("H"), server("L", throughput=1e12)])
    assert rates["L"] == pytest.approx(PRIOR_CAP * rates["H"])  # the lower median, not the mean of the two
