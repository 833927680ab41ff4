"""Automatic placement policy (``server.rebalance``): span length, start-up choice, rebalance checks.

Everything runs on fake snapshots and a fake clock: no torch, no network, milliseconds per test.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest

from meshinfer.errors import ConfigError
from meshinfer.server.rebalance import (
    Rebalancer,
    Snapshot,
    auto_span_length,
    choose_start_span,
    jittered,
    parse_mem_available,
    swarm_minimum,
    throughput_estimate,
    with_own_record,
)
from meshinfer.types import BlockRange
from meshinfer.wire.records import ServerRecord

MiB = 2**20


def server(peer: str, start: int, end: int, throughput: float = 100.0, state: str = "online") -> ServerRecord:
    return ServerRecord(
        peer_id=peer, model_id="m", span=BlockRange(start, end), state=state,  # type: ignore[arg-type]
        throughput=throughput, cache_tokens_left=1000, addresses=[], software_version="test",
    )


class FakeClock:
    """``sleep`` that only records what was asked."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def reader(*snapshots: Snapshot) -> tuple[Callable[[], Awaitable[Snapshot]], list[int]]:
    """A reader returning ``snapshots`` in turn (the last one repeatedly) and counting calls."""
    calls = [0]

    async def read() -> Snapshot:
        calls[0] += 1
        return snapshots[min(calls[0], len(snapshots)) - 1]

    return read, calls


# ---------------------------------------------------------------------------------------------- memory and length


@pytest.mark.parametrize(("text", "expected"), [
    ("MemTotal:       16384 kB\nMemFree:  100 kB\nMemAvailable:    8192 kB\n", 8192 * 1024),
    ("MemAvailable: 3 MB\n", 3 * MiB),
    ("MemAvailable: 77\n", 77),
    ("MemTotal: 16384 kB\n", None),  # old kernels: no MemAvailable line
    ("MemAvailable: lots kB\n", None),
    ("MemAvailable: 5 parsecs\n", None),
    ("", None),
])
def test_parse_mem_available(text: str, expected: int | None) -> None:
    assert parse_mem_available(text) == expected


@pytest.mark.parametrize(("kwargs", "length", "why"), [
    # --num-blocks wins, clamped to the model
    (dict(requested=4, free_bytes=0), 4, "--num-blocks 4"),
    (dict(requested=30, free_bytes=None), 12, "only 12"),
    # memory unknown: the whole model
    (dict(requested=None, free_bytes=None), 12, "unknown"),
    # 100 MiB available, 20% headroom -> 80 MiB; 10 MiB of weights + 6 MiB of KV per block -> 5 blocks
    (dict(requested=None, free_bytes=100 * MiB, weight_bytes=10 * MiB, kv_bytes=6 * MiB), 5, "5 of 12 blocks fit"),
    # without KV and headroom every byte goes to weights: 8 blocks
    (dict(requested=None, free_bytes=80 * MiB, weight_bytes=10 * MiB, kv_bytes=0, headroom=0.0), 8, "8 of 12"),
    # plenty of memory: never more than the model
    (dict(requested=None, free_bytes=10**12, weight_bytes=10 * MiB, kv_bytes=6 * MiB), 12, "12 of 12"),
])
def test_auto_span_length(kwargs: dict, length: int, why: str) -> None:
    args = dict(weight_bytes=MiB, kv_bytes=MiB) | kwargs
    got, reason = auto_span_length(12, **args)
    assert got == length and why in reason, reason


@pytest.mark.parametrize(("kwargs", "text"), [
    (dict(requested=None, free_bytes=10 * MiB, weight_bytes=10 * MiB, kv_bytes=6 * MiB), "not even one block fits"),
    (dict(requested=None, free_bytes=10 * MiB, weight_bytes=0, kv_bytes=0), "block sizes"),
    (dict(requested=None, free_bytes=10 * MiB, weight_bytes=1, kv_bytes=0, headroom=1.0), "headroom"),
])
def test_auto_span_length_refuses(kwargs: dict, text: str) -> None:
    with pytest.raises(ConfigError, match=text) as info:
        auto_span_length(12, **kwargs)
    assert "\n" not in str(info.value)


def test_jittered_stays_within_its_spread_and_varies() -> None:
    rng = random.Random(3)
    values = [jittered(10.0, rng) for _ in range(500)]
    assert all(8.0 <= v <= 12.0 for v in values)
    assert max(values) - min(values) > 3.0  # really jittered, not a constant
    assert jittered(0.0, rng) == 0.0
    with pytest.raises(ConfigError):
        jittered(1.0, rng, spread=1.0)


@pytest.mark.parametrize(("servers", "expected"), [
    ([], 0.0),
    ([server("A", 0, 4, 0.0, "joining")], 0.0),  # nobody measured yet
    ([server("A", 0, 4, 10), server("B", 0, 4, 30), server("C", 0, 4, 0.0, "joining")], 20.0),
    ([server("A", 0, 4, 10), server("B", 0, 4, 500, "draining"), server("C", 0, 4, 40)], 25.0),  # draining ignored
])
def test_throughput_estimate(servers: list[ServerRecord], expected: float) -> None:
    assert throughput_estimate(servers) == pytest.approx(expected)


def test_own_record_replaces_what_the_dht_says() -> None:
    stale = [server("A", 0, 4, 10, "joining"), server("B", 4, 8), server("A", 0, 4, 10, "joining")]
    now = server("A", 8, 12, 55)
    merged = with_own_record(stale, now)
    assert [r for r in merged if r.peer_id == "A"] == [now] and len(merged) == 2


@pytest.mark.parametrize(("servers", "kwargs", "expected"), [
    ([server("A", 0, 4, 10), server("B", 4, 8, 20)], {}, 10.0),
    ([server("A", 0, 4, 10), server("B", 4, 8, 20)], {"exclude": ["A"]}, 0.0),
    ([server("A", 0, 4, 10), server("B", 4, 8, 20)], {"exclude": ["A"], "extra": (BlockRange(0, 4), 30.0)}, 20.0),
])
def test_swarm_minimum(servers: list[ServerRecord], kwargs: dict, expected: float) -> None:
    assert swarm_minimum(servers, 8, **kwargs) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------- start-up choice


@pytest.mark.parametrize(("first", "second", "span", "why"), [
    # a hole in the middle is filled
    ([server("A", 0, 4), server("B", 8, 12)], None, BlockRange(4, 8), "fills a hole"),
    # the re-read sees a server that announced meanwhile, and the choice follows it
    ([server("A", 4, 12)], [server("A", 4, 12), server("B", 0, 4, 300), server("C", 8, 12, 50, "joining")],
     BlockRange(4, 8), "re-read changed the choice from 0:4"),
    # a stale record of this very peer is ignored (restart with the same identity)
    ([server("ME", 0, 12), server("A", 0, 8)], None, BlockRange(8, 12), "fills a hole"),
    # no hole: the weakest blocks
    ([server("A", 0, 8, 100), server("B", 8, 12, 20)], None, BlockRange(8, 12), "weakest blocks"),
])
def test_choose_start_span(first: list[ServerRecord], second: list[ServerRecord] | None, span: BlockRange,
                           why: str) -> None:
    clock = FakeClock()
    read, calls = reader(Snapshot(first), Snapshot(second if second is not None else first))
    got, reason = asyncio.run(choose_start_span(read, num_blocks=12, length=4, peer_id="ME", rng=random.Random(0),
                                                sleep=clock.sleep))
    assert got == span and why in reason, reason
    assert calls[0] == 2  # read once, then re-read just before announcing
    assert len(clock.slept) == 2 and 0 <= clock.slept[0] <= 1.0 and 0 <= clock.slept[1] <= 0.25


def test_simultaneous_starters_on_an_empty_swarm_spread_out() -> None:
    """Same empty snapshot, different peer ids: not everybody lands on the same blocks."""
    spans = set()
    for i in range(8):
        read, _ = reader(Snapshot([]))
        span, _ = asyncio.run(choose_start_span(read, num_blocks=12, length=4, peer_id=f"peer-{i}",
                                                rng=random.Random(i), sleep=FakeClock().sleep))
        spans.add(span)
    assert len(spans) >= 2 and all(len(s) == 4 for s in spans)


# ---------------------------------------------------------------------------------------------- rebalancer


def rebalancer(me: ServerRecord, *snapshots: Snapshot) -> tuple[Rebalancer, list[BlockRange], list[int]]:
    read, calls = reader(*snapshots)
    moves: list[BlockRange] = []

    async def move(span: BlockRange) -> None:
        moves.append(span)

    return Rebalancer(read=read, move=move, me=lambda: me, num_blocks=12, interval=2.0,
                      rng=random.Random(0), sleep=FakeClock().sleep), moves, calls


HOLE = [server("A", 0, 4), server("B", 4, 8), server("ME", 4, 8)]  # blocks 8:12 uncovered
DOUBLED = [server("A", 0, 4), server("B", 4, 8), server("C", 8, 12), server("ME", 4, 8)]


@pytest.mark.parametrize(("me", "snapshots", "expected", "reads"), [
    # a hole another server's blocks can spare: move there (confirmed on the second read)
    (server("ME", 4, 8), [Snapshot(HOLE)], BlockRange(8, 12), 2),
    # balanced enough: stay, after one read
    (server("ME", 4, 8), [Snapshot(DOUBLED)], None, 1),
    # the only server of its blocks never leaves them for a hole elsewhere
    (server("ME", 0, 4), [Snapshot([server("ME", 0, 4), server("B", 4, 8)])], None, 1),
    # the fresh snapshot shows someone else filled the hole meanwhile: stay
    (server("ME", 4, 8), [Snapshot(HOLE), Snapshot([*HOLE, server("D", 8, 12, 0.0, "joining")])], None, 2),
    # an incomplete read is never acted on
    (server("ME", 4, 8), [Snapshot(HOLE, complete=False)], None, 1),
    (server("ME", 4, 8), [Snapshot(HOLE), Snapshot(HOLE, complete=False)], None, 2),
    # only an online server considers moving
    (server("ME", 4, 8, state="joining"), [Snapshot(HOLE)], None, 0),
    # the DHT still shows this server's old record: what it serves now counts
    (server("ME", 4, 8), [Snapshot([server("A", 0, 4), server("B", 4, 8), server("ME", 8, 12, 0.0, "joining")])],
     BlockRange(8, 12), 2),
])
def test_rebalancer_check(me: ServerRecord, snapshots: list[Snapshot], expected: BlockRange | None,
                          reads: int) -> None:
    reb, _, calls = rebalancer(me, *snapshots)
    assert asyncio.run(reb.check()) == expected
    assert calls[0] == reads


def test_rebalancer_run_moves_and_keeps_checking_after_errors() -> None:
    me = server("ME", 4, 8)
    outcomes: list[Snapshot | Exception] = [RuntimeError("dht down"), Snapshot(HOLE), Snapshot(HOLE)]
    moves: list[BlockRange] = []
    clock = FakeClock()

    async def read() -> Snapshot:
        if not outcomes:
            raise asyncio.CancelledError  # end the loop
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def move(span: BlockRange) -> None:
        moves.append(span)

    reb = Rebalancer(read=read, move=move, me=lambda: me, num_blocks=12, interval=2.0, rng=random.Random(1),
                     sleep=clock.sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(reb.run())
    assert moves == [BlockRange(8, 12)] and reb.moves == 1
    assert len(clock.slept) == 3 and all(1.6 <= s <= 2.4 for s in clock.slept)  # jittered +-20%


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_rebalancer_needs_an_interval(interval: float) -> None:
    read, _ = reader(Snapshot([]))

    async def move(span: BlockRange) -> None:
        raise AssertionError("never called")

    with pytest.raises(ConfigError, match="interval > 0"):
        Rebalancer(read=read, move=move, me=lambda: server("ME", 0, 4), num_blocks=4, interval=interval)


def test_rebalancer_run_survives_a_failed_move() -> None:
    snapshots = [Snapshot(HOLE)] * 4  # two checks, each confirmed: two moves
    attempts: list[BlockRange] = []

    async def read() -> Snapshot:
        if not snapshots:
            raise asyncio.CancelledError
        return snapshots.pop(0)

    async def move(span: BlockRange) -> None:
        attempts.append(span)
        if len(attempts) == 1:
            raise RuntimeError("checkpoint vanished")

    reb = Rebalancer(read=read, move=move, me=lambda: server("ME", 4, 8), num_blocks=12, interval=2.0,
                     rng=random.Random(2), sleep=FakeClock().sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(reb.run())
    assert attempts == [BlockRange(8, 12)] * 2 and reb.moves == 2
