"""Reputation (client.reputation) and its effect on plans (client.routing's trust)."""

from __future__ import annotations

from meshinfer.client.reputation import FULL_AGE_S, FULL_STEPS, MIN_TRUST, Reputation
from meshinfer.client.routing import plan_route
from meshinfer.types import BlockRange
from meshinfer.wire.records import ServerRecord

MID = "0123456789abcdef0123456789abcdef"


def _server(peer: str) -> ServerRecord:
    return ServerRecord(peer_id=peer, model_id=MID, span=BlockRange(0, 4), state="online", throughput=10.0,
                        cache_tokens_left=1000, addresses=[], software_version="t")


def test_trust_grows_with_age_and_service() -> None:
    rep = Reputation()
    rep.observe(["old", "new"], 0.0)
    rep.observe(["new"], FULL_AGE_S)  # seen again: its age counts from the first sighting
    assert rep.trust("old", 0.0) == MIN_TRUST
    assert rep.trust("old", FULL_AGE_S / 2) == MIN_TRUST + (1 - MIN_TRUST) / 2
    assert rep.trust("old", FULL_AGE_S / 5) == MIN_TRUST  # minutes apart weigh the same (levels)
    assert rep.trust("old", 10 * FULL_AGE_S) == 1.0
    assert rep.trust("unseen", 5.0) == MIN_TRUST
    rep.served("fresh", FULL_STEPS)
    assert rep.trust("fresh", 0.0) == 1.0
    rep.set_served("fresh", 3)  # never lowers
    assert rep.trust("fresh", 0.0) == 1.0


def test_a_verified_report_zeroes_trust_once_per_reporter_and_session() -> None:
    rep = Reputation()
    rep.observe(["liar"], 0.0)
    assert rep.add_report("liar", "client-a", "s1")
    assert not rep.add_report("liar", "client-a", "s1")
    assert rep.add_report("liar", "client-b", "s1")
    assert rep.reported() == {"liar"}
    assert rep.report_count("liar") == 2
    assert rep.trust("liar", 1e9) == 0.0


def test_plans_prefer_an_established_server_but_still_use_a_new_one() -> None:
    servers = [_server("QmA"), _server("QmB")]
    rep = Reputation()
    rep.observe(["QmB"], 0.0)
    rep.observe(["QmA"], FULL_AGE_S)
    now = FULL_AGE_S
    trust = rep.trust_map(["QmA", "QmB"], now)
    assert [h.peer_id for h in plan_route(servers, BlockRange(0, 4), trust=trust)] == ["QmB"]
    assert [h.peer_id for h in plan_route(servers, BlockRange(0, 4))] == ["QmA"]  # without trust: the tie-break
    assert [h.peer_id for h in plan_route(servers[:1], BlockRange(0, 4), trust=trust)] == ["QmA"]
