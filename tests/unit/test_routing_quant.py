"""One quant mode per route: ``plan_uniform_route`` over hand-written swarm snapshots (pure, milliseconds)."""

from __future__ import annotations

import pytest

from meshinfer.client.routing import NoRouteError, RouteHop, plan_uniform_route
from meshinfer.types import BlockRange
from meshinfer.wire.records import ServerRecord, decode_record, encode_record


def server(peer: str, start: int, end: int, quant: str = "none", throughput: float = 100.0) -> ServerRecord:
    return ServerRecord(peer_id=peer, model_id="m", span=BlockRange(start, end), state="online",
                        throughput=throughput, cache_tokens_left=1000, addresses=[], software_version="test",
                        quant=quant)


def hops(route: list[RouteHop]) -> list[tuple[str, str, str]]:
    return [(h.peer_id, str(h.span), h.record.quant) for h in route]


ALL = BlockRange(0, 12)


def test_the_asked_mode_is_used_on_every_hop_even_when_another_is_faster() -> None:
    swarm = [server("A", 0, 6, "int4", 1e6), server("B", 6, 12, "int4", 1e6), server("F", 0, 12, "int8", 1.0)]
    assert hops(plan_uniform_route(swarm, ALL, quant="int8")) == [("F", "0:12", "int8")]
    assert hops(plan_uniform_route(swarm, ALL, quant="int4")) == [("A", "0:6", "int4"), ("B", "6:12", "int4")]


def test_auto_takes_the_most_precise_mode_that_covers_the_model() -> None:
    swarm = [server("A", 0, 12, "int4", 1e6), server("B", 0, 12, "int8"), server("C", 0, 6, "none")]
    assert hops(plan_uniform_route(swarm, ALL)) == [("B", "0:12", "int8")]  # none covers only 0:6
    swarm.append(server("D", 6, 12, "none", 1.0))
    assert hops(plan_uniform_route(swarm, ALL)) == [("C", "0:6", "none"), ("D", "6:12", "none")]


def test_a_mix_of_modes_that_would_cover_the_model_is_refused_with_what_covers_what() -> None:
    swarm = [server("A", 0, 5, "none"), server("B", 5, 12, "int4")]
    with pytest.raises(NoRouteError) as err:
        plan_uniform_route(swarm, ALL)
    text = str(err.value)
    assert "no single quant mode covers every block of the requested 0:12" in text
    assert "int4 covers 5:12" in text and "none covers 0:5" in text and "never mixes quant modes" in text
    with pytest.raises(NoRouteError, match=r"no servers at quant int4 cover .* choose another mode with --quant"):
        plan_uniform_route(swarm, ALL, quant="int4")


def test_holes_are_reported_as_holes() -> None:
    swarm = [server("A", 0, 5, "int4"), server("B", 7, 12, "int4")]
    with pytest.raises(NoRouteError, match=r"no online servers at quant int4 cover blocks 5:7 of the requested 0:12"):
        plan_uniform_route(swarm, ALL, quant="int4")
    with pytest.raises(NoRouteError, match=r"no online servers cover blocks 5:7 of the requested 0:12"):
        plan_uniform_route(swarm, ALL)


def test_unknown_modes_from_other_peers_are_never_routed_to() -> None:
    swarm = [server("A", 0, 12, "int3"), server("B", 0, 12, "int8", 1.0)]
    assert hops(plan_uniform_route(swarm, ALL)) == [("B", "0:12", "int8")]


def test_records_carry_quant_and_weight_bytes_and_old_records_default_to_none() -> None:
    rec = server("A", 0, 12, "int4")
    assert decode_record(encode_record(rec)).quant == "int4"  # type: ignore[union-attr]
    import msgspec

    old = msgspec.msgpack.encode({k: v for k, v in msgspec.to_builtins(rec).items()
                                  if k not in ("quant", "weight_bytes")})
    back = decode_record(old)
    assert isinstance(back, ServerRecord) and back.quant == "none" and back.weight_bytes == 0
