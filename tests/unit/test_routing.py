"""Route planning as a pure function: table-driven cases over hand-written swarm snapshots."""

from __future__ import annotations

import itertools

import pytest

from meshinfer.client.routing import NoRouteError, RouteHop, plan_route
from meshinfer.types import BlockRange
from meshinfer.wire.records import ServerRecord


def server(peer: str, start: int, end: int, throughput: float = 100.0, state: str = "online") -> ServerRecord:
    return ServerRecord(
        peer_id=peer, model_id="m", span=BlockRange(start, end), state=state,  # type: ignore[arg-type]
        throughput=throughput, cache_tokens_left=1000, addresses=[], software_version="test",
    )


def hops(route: list[RouteHop]) -> list[tuple[str, str]]:
    return [(h.peer_id, str(h.span)) for h in route]


@pytest.mark.parametrize(
    ("servers", "expected"),
    [
        # one full node
        ([server("A", 0, 12)], [("A", "0:12")]),
        # a clean chain
        ([server("A", 0, 4), server("B", 4, 8), server("C", 8, 12)], [("A", "0:4"), ("B", "4:8"), ("C", "8:12")]),
        # overlapping spans: the route switches where the next server starts
        ([server("A", 0, 8), server("B", 4, 12)], [("A", "0:4"), ("B", "4:12")]),
        # a full node beats a chain of equally fast servers (fewer round trips)
        ([server("A", 0, 6), server("B", 6, 12), server("F", 0, 12)], [("F", "0:12")]),
        # a much faster chain beats a slow full node
        ([server("A", 0, 6, 1000), server("B", 6, 12, 1000), server("F", 0, 12, 1)], [("A", "0:6"), ("B", "6:12")]),
        # the faster of two servers on the same span
        ([server("S", 0, 12, 10), server("Q", 0, 12, 200)], [("Q", "0:12")]),
        # ties go to the smaller peer id, deterministically
        ([server("Z", 0, 12), server("Y", 0, 12)], [("Y", "0:12")]),
        # joining and draining servers are not used
        ([server("A", 0, 12, state="draining"), server("B", 0, 12, 1, state="online"), server("C", 0, 12, 1e6,
          state="joining")], [("B", "0:12")]),
    ],
)
def test_plan_route(servers: list[ServerRecord], expected: list[tuple[str, str]]) -> None:
    assert hops(plan_route(servers, BlockRange(0, 12))) == expected


def test_route_is_consecutive_and_covers_exactly() -> None:
    servers = [server(f"P{i}", s, e, t) for i, (s, e, t) in
               enumerate([(0, 3, 50), (1, 7, 80), (5, 9, 20), (6, 12, 90), (2, 12, 5), (9, 12, 300)])]
    route = plan_route(servers, BlockRange(0, 12))
    assert route[0].span.start == 0 and route[-1].span.end == 12
    for a, b in itertools.pairwise(route):
        assert a.span.end == b.span.start
    for hop in route:
        assert hop.record.span.start <= hop.span.start and hop.span.end <= hop.record.span.end


def test_rtt_measurements_change_the_choice() -> None:
    servers = [server("near", 0, 12), server("far", 0, 12, 150)]
    assert hops(plan_route(servers, BlockRange(0, 12))) == [("far", "0:12")]
    assert hops(plan_route(servers, BlockRange(0, 12), rtt_s={"far": 0.5, "near": 0.001})) == [("near", "0:12")]


def test_sub_range_of_the_model() -> None:
    route = plan_route([server("A", 0, 8), server("B", 6, 12)], BlockRange(7, 10))
    assert hops(route) == [("A", "7:8"), ("B", "8:10")] or hops(route) == [("B", "7:10")]


def test_hole_in_coverage_is_named() -> None:
    with pytest.raises(NoRouteError, match=r"blocks 4:6, 9 "):
        plan_route([server("A", 0, 4), server("B", 6, 9), server("C", 10, 12)], BlockRange(0, 12))


def test_excluded_peers_are_routed_around() -> None:
    servers = [server("A", 0, 12, 1000), server("B", 0, 6), server("C", 6, 12)]
    assert hops(plan_route(servers, BlockRange(0, 12), exclude={"A"})) == [("B", "0:6"), ("C", "6:12")]
    with pytest.raises(NoRouteError, match="excluded"):
        plan_route(servers, BlockRange(0, 12), exclude={"A", "B"})


def test_empty_swarm() -> None:
    with pytest.raises(NoRouteError, match="0:12"):
        plan_route([], BlockRange(0, 12))


def test_large_swarm_is_fast_enough_to_plan_per_request() -> None:
    # 200 servers on a 80-block model; planning must stay a pure, quick computation (no timing assert:
    # this checks it completes and is valid at scale).
    spans = [((i * 13) % 75, min(80, (i * 13) % 75 + 5 + i % 6)) for i in range(200)]
    assert all(any(s <= b < e for s, e in spans) for b in range(80))  # the snapshot covers every block
    servers = [server(f"P{i:03d}", s, e, 50 + i) for i, (s, e) in enumerate(spans)]
    route = plan_route(servers, BlockRange(0, 80))
    assert route[0].span.start == 0 and route[-1].span.end == 80


def test_mixed_cpu_gpu_swarm_prefers_the_gpu_server_by_its_throughput() -> None:
    """Issue 18: the device label is for people; routing reads throughput only. A GPU server announcing 10x the
    tokens/s of a CPU server on the same blocks is chosen (its prior is capped at PRIOR_CAP x the lower median
    until measured, which still ranks it first); once measured, its real speed decides in a larger swarm too."""
    from msgspec.structs import replace

    def gpu(start: int, end: int) -> ServerRecord:
        return replace(server("gpu", start, end, 200.0), device="NVIDIA H200", dtype="bfloat16")

    cpu = server("cpu1", 0, 12, 20.0)
    assert cpu.device == "cpu" and gpu(0, 12).device == "NVIDIA H200"
    assert hops(plan_route([cpu, gpu(0, 12)], BlockRange(0, 12))) == [("gpu", "0:12")]
    assert hops(plan_route([server("cpuA", 0, 6, 20.0), gpu(0, 6), server("cpuB", 6, 12, 20.0)],
                           BlockRange(0, 12))) == [("gpu", "0:6"), ("cpuB", "6:12")]
    swarm = [cpu, server("cpu2", 0, 6, 20.0), server("cpu3", 6, 12, 20.0), gpu(0, 12)]
    measured = {"gpu": 1 / 200 / 12, "cpu1": 1 / 20 / 12}  # seconds per token per block, as clients measure
    assert hops(plan_route(swarm, BlockRange(0, 12), measured=measured)) == [("gpu", "0:12")]
