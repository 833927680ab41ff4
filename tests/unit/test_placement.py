"""Block selection and rebalancing as pure functions: table-driven snapshots plus a small join/leave simulation."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from meshinfer.errors import ConfigError, UsageError
from meshinfer.server.placement import (
    MIN_THROUGHPUT,
    block_throughputs,
    choose_span,
    should_move,
    span_length_for_memory,
)
from meshinfer.types import BlockRange
from meshinfer.wire.records import ServerRecord


def server(peer: str, start: int, end: int, throughput: float = 100.0, state: str = "online") -> ServerRecord:
    return ServerRecord(
        peer_id=peer, model_id="m", span=BlockRange(start, end), state=state,  # type: ignore[arg-type]
        throughput=throughput, cache_tokens_left=1000, addresses=[], software_version="test",
    )


def moved(record: ServerRecord, span: BlockRange) -> ServerRecord:
    return server(record.peer_id, span.start, span.end, record.throughput, record.state)


# ---------------------------------------------------------------------------------------------- block_throughputs


@pytest.mark.parametrize(
    ("servers", "num_blocks", "kwargs", "expected"),
    [
        ([], 4, {}, [0.0, 0.0, 0.0, 0.0]),
        ([server("A", 0, 2, 10), server("B", 1, 4, 5)], 4, {}, [10.0, 15.0, 5.0, 5.0]),
        # draining servers do not count, joining ones do
        ([server("A", 0, 4, 10, "draining"), server("B", 2, 4, 5, "joining")], 4, {}, [0.0, 0.0, 5.0, 5.0]),
        # excluded peers do not count
        ([server("A", 0, 4, 10), server("B", 0, 4, 5)], 4, {"exclude": ["A"]}, [5.0] * 4),
        # a server that has not measured yet counts as `unmeasured`, or at least MIN_THROUGHPUT
        ([server("J", 0, 2, 0.0, "joining")], 3, {"unmeasured": 7.0}, [7.0, 7.0, 0.0]),
        ([server("J", 0, 2, 0.0, "joining")], 3, {}, [MIN_THROUGHPUT, MIN_THROUGHPUT, 0.0]),
        # spans past the model are clipped; a peer listed twice counts once (its first record)
        ([server("A", 2, 6, 1)], 4, {}, [0.0, 0.0, 1.0, 1.0]),
        ([server("A", 0, 2, 3), server("A", 0, 4, 9)], 4, {}, [3.0, 3.0, 0.0, 0.0]),
    ],
)
def test_block_throughputs(servers: list[ServerRecord], num_blocks: int, kwargs: dict, expected: list[float]) -> None:
    assert block_throughputs(servers, num_blocks, **kwargs) == pytest.approx(expected)


def test_block_throughputs_do_not_depend_on_snapshot_order() -> None:
    servers = [server(f"p{i}", i % 5, i % 5 + 3, 0.1 * (i + 1)) for i in range(12)]
    reference = block_throughputs(servers, 8)
    for seed in range(5):
        shuffled = servers[:]
        random.Random(seed).shuffle(shuffled)
        assert block_throughputs(shuffled, 8) == reference  # bit-identical, not just close


@pytest.mark.parametrize("num_blocks", [0, -3])
def test_block_throughputs_reject_empty_model(num_blocks: int) -> None:
    with pytest.raises(ConfigError, match="at least one block"):
        block_throughputs([], num_blocks)


# ---------------------------------------------------------------------------------------------- choose_span


@pytest.mark.parametrize(
    ("servers", "num_blocks", "length", "expected"),
    [
        # empty swarm: with no tie-break, start at 0; the length is clamped to [1, num_blocks]
        ([], 12, 4, "0:4"),
        ([], 12, 0, "0:1"),
        ([], 12, 20, "0:12"),
        ([], 1, 1, "0:1"),
        # a hole at the end / in the middle is chosen
        ([server("A", 0, 8)], 12, 4, "8:12"),
        ([server("A", 0, 4), server("B", 8, 12)], 12, 4, "4:8"),
        # a hole longer than the span: fill it from its edge, never split it
        ([server("A", 0, 4)], 12, 4, "4:8"),
        ([server("A", 0, 8)], 12, 2, "8:10"),
        # a hole wins over a very weak block, even where covering it means covering weak blocks too
        ([server("A", 0, 10, 0.01)], 12, 4, "8:12"),
        ([server("A", 0, 5, 1000), server("B", 6, 12, 0.01)], 12, 3, "5:8"),
        # uneven coverage: the weaker half, from its edge
        ([server("A", 0, 6, 100), server("B", 6, 12, 50)], 12, 4, "6:10"),
        # the window with the weakest block wins over a window with a smaller sum: [1, 100, 100] vs [2, 2, 2]
        ([server("A", 0, 12, 1), server("B", 1, 3, 99), server("C", 3, 12, 1)], 12, 3, "0:3"),
        # same weakest block: the smaller sum wins (avoid the blocks that C strengthens)
        ([server("A", 0, 12, 10), server("C", 0, 3, 50)], 12, 4, "3:7"),
        # one strong server and several weak ones: the blocks only the strong one covers are the weakest
        ([server("S", 0, 12, 1000), server("W1", 0, 4, 10), server("W2", 4, 8, 10)], 12, 4, "8:12"),
        # several weak servers stacked: the block with the fewest of them
        ([server("W1", 0, 12, 10), server("W2", 0, 9, 10), server("W3", 3, 12, 10)], 12, 3, "0:3"),
        # draining servers are ignored: their blocks are holes
        ([server("A", 0, 4, 100, "draining"), server("B", 4, 12)], 12, 4, "0:4"),
        # a joining server that has not measured yet still counts (as fast as the chooser), so no pile-up
        ([server("J", 0, 4, 0.0, "joining")], 12, 4, "4:8"),
        ([server("J", 0, 4, 0.0, "joining"), server("K", 4, 8, 0.0, "joining")], 12, 4, "8:12"),
    ],
)
def test_choose_span(servers: list[ServerRecord], num_blocks: int, length: int, expected: str) -> None:
    assert choose_span(servers, num_blocks, length, own_throughput=100.0) == BlockRange.parse(expected)


def test_choose_span_exclude_reopens_the_hole() -> None:
    servers = [server("A", 0, 4), server("B", 4, 12)]
    assert choose_span(servers, 12, 4, own_throughput=100.0) == BlockRange(0, 4)  # all equal: the first edge
    servers = [server("A", 0, 4, 500), server("B", 4, 12)]
    assert choose_span(servers, 12, 4, own_throughput=100.0) == BlockRange(4, 8)
    assert choose_span(servers, 12, 4, own_throughput=100.0, exclude=["A"]) == BlockRange(0, 4)


@pytest.mark.parametrize("own", [-1.0, float("nan"), float("inf")])
def test_choose_span_rejects_bad_own_throughput(own: float) -> None:
    with pytest.raises(ConfigError, match="own_throughput"):
        choose_span([], 12, 4, own_throughput=own)


SYMMETRIC = [
    # empty swarm: both ends of the model are equally good
    ([], 12, 4, {"0:4", "8:12"}),
    # three equal holes of two blocks
    ([server("A", 2, 4), server("B", 6, 8), server("C", 10, 12)], 12, 2, {"0:2", "4:6", "8:10"}),
    # four equal holes of two blocks between single covered blocks
    ([server(p, b, b + 1) for p, b in zip("ABCD", (2, 5, 8, 11), strict=True)], 12, 2,
     {"0:2", "3:5", "6:8", "9:11"}),
    # evenly covered: only the two edge-aligned windows tie (a window in the middle would split nothing)
    ([server(f"S{i}", 3 * i, 3 * i + 3, 50) for i in range(4)], 12, 3, {"0:3", "9:12"}),
]


@pytest.mark.parametrize(("servers", "num_blocks", "length", "tied"), SYMMETRIC)
def test_tie_break_spreads_peers_over_equal_choices(
    servers: list[ServerRecord], num_blocks: int, length: int, tied: set[str]
) -> None:
    picks = {
        peer: str(choose_span(servers, num_blocks, length, own_throughput=100.0, tie_break=peer))
        for peer in (f"12D3KooWpeer{i}" for i in range(40))
    }
    assert set(picks.values()) == tied  # every pick is one of the tied spans, and all of them get used
    pairs_differing = sum(a != b for a in picks.values() for b in picks.values())
    assert pairs_differing > len(picks) ** 2 // 3


@pytest.mark.parametrize(("servers", "num_blocks", "length", "tied"), SYMMETRIC)
def test_tie_break_is_stable_for_one_peer(
    servers: list[ServerRecord], num_blocks: int, length: int, tied: set[str]
) -> None:
    for peer in ("a", "12D3KooWxyz", "peer-7"):
        first = choose_span(servers, num_blocks, length, own_throughput=100.0, tie_break=peer)
        assert str(first) in tied
        for seed in range(3):
            shuffled = servers[:]
            random.Random(seed).shuffle(shuffled)
            assert choose_span(shuffled, num_blocks, length, own_throughput=100.0, tie_break=peer) == first


def test_tie_break_is_the_same_in_another_process() -> None:
    """Peers are different processes: the choice must not depend on Python's salted hash()."""
    code = (
        "from meshinfer.server.placement import choose_span\n"
        "print([str(choose_span([], 40, 1, own_throughput=1.0, tie_break=f'p{i}')) for i in range(30)])\n"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(run.stdout)
    here = str([str(choose_span([], 40, 1, own_throughput=1.0, tie_break=f"p{i}")) for i in range(30)])
    assert outputs == {here + "\n"}


# ---------------------------------------------------------------------------------------------- should_move


@pytest.mark.parametrize(
    ("servers", "me", "quality", "expected"),
    [
        # balanced halves: stay
        ([server("A", 0, 6), server("B", 6, 12)], "A", 0.75, None),
        # a redundant copy cannot raise the minimum anywhere: stay
        ([server("A", 0, 4), server("B", 4, 8), server("C", 8, 12), server("D", 0, 4)], "D", 0.75, None),
        # a hole appeared (C left): a redundant server moves into it
        ([server("A", 0, 4), server("B", 4, 8), server("D", 0, 4)], "D", 0.75, "8:12"),
        ([server("A", 0, 4), server("B", 4, 8), server("D", 0, 4)], "A", 0.75, "8:12"),
        # the only server of a span never leaves it for a bigger hole it cannot fully close
        ([server("A", 0, 4), server("B", 4, 8)], "A", 0.75, None),
        # R on the strong half: min 60 now; moving gives min(100, 60 + R). Move only past the margin.
        ([server("P", 0, 6, 100), server("Q", 6, 12, 60), server("R", 0, 6, 10)], "R", 0.75, None),
        ([server("P", 0, 6, 100), server("Q", 6, 12, 60), server("R", 0, 6, 10)], "R", 1.0, "6:12"),
        ([server("P", 0, 6, 100), server("Q", 6, 12, 60), server("R", 0, 6, 30)], "R", 0.75, "6:12"),
        # one strong server everywhere, a weak one doubling up where another weak one already is
        ([server("S", 0, 12, 100), server("W1", 0, 6, 100), server("W2", 0, 6, 100)], "W2", 0.75, "6:12"),
        # a server that is not online does not move
        ([server("A", 0, 4), server("B", 4, 8), server("D", 0, 4, 100, "joining")], "D", 0.75, None),
        ([server("A", 0, 4), server("B", 4, 8), server("D", 0, 4, 100, "draining")], "D", 0.75, None),
    ],
)
def test_should_move(servers: list[ServerRecord], me: str, quality: float, expected: str | None) -> None:
    result = should_move(servers, 12, me=me, balance_quality=quality)
    assert result == (None if expected is None else BlockRange.parse(expected))


def test_should_move_never_lowers_the_minimum() -> None:
    rng = random.Random(5)
    moves = 0
    for _ in range(300):
        num_blocks = rng.randint(1, 16)
        servers = []
        for i in range(rng.randint(1, 6)):
            start = rng.randrange(num_blocks)
            end = rng.randint(start + 1, num_blocks)
            servers.append(server(f"p{i}", start, end, rng.choice([1.0, 10.0, 55.5, 100.0])))
        before = min(block_throughputs(servers, num_blocks))
        for record in servers:
            span = should_move(servers, num_blocks, me=record.peer_id, balance_quality=rng.choice([0.5, 0.75, 1.0]))
            if span is None:
                continue
            moves += 1
            assert len(span) == len(record.span) and span != record.span
            after = [moved(r, span) if r is record else r for r in servers]
            assert min(block_throughputs(after, num_blocks)) > before
    assert moves > 10  # the property was exercised, not vacuously true


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"me": "Z"}, UsageError, "no record"),
    ({"me": "A", "balance_quality": 0.0}, ConfigError, "balance_quality"),
    ({"me": "A", "balance_quality": 1.5}, ConfigError, "balance_quality"),
])
def test_should_move_rejects_bad_input(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        should_move([server("A", 0, 4)], 12, **kwargs)


# ---------------------------------------------------------------------------------------------- simulation


@pytest.mark.parametrize("prefix", ["12D3KooW", "peer-", "x"])
@pytest.mark.parametrize("leaver", range(4))
def test_four_servers_cover_twelve_blocks_and_recover_after_one_leaves(prefix: str, leaver: int) -> None:
    num_blocks, length = 12, 4
    throughputs = [100.0, 80.0, 120.0, 90.0]
    swarm: list[ServerRecord] = []
    for i, tput in enumerate(throughputs):  # each joins with the records of those before it
        peer = f"{prefix}{i}"
        span = choose_span(swarm, num_blocks, length, own_throughput=tput, tie_break=peer)
        swarm.append(server(peer, span.start, span.end, tput))
    assert min(block_throughputs(swarm, num_blocks)) > 0, [str(r.span) for r in swarm]

    swarm = [r for i, r in enumerate(swarm) if i != leaver]
    for _ in range(4):  # rounds: each remaining server checks in turn and moves on the latest snapshot
        changed = False
        for idx in range(len(swarm)):
            span = should_move(swarm, num_blocks, me=swarm[idx].peer_id)
            if span is not None:
                swarm[idx] = moved(swarm[idx], span)
                changed = True
        if not changed:
            break
    assert not changed, "placement kept moving instead of settling"
    assert min(block_throughputs(swarm, num_blocks)) > 0, [str(r.span) for r in swarm]


# ---------------------------------------------------------------------------------------------- memory

GiB = 2**30


@pytest.mark.parametrize(
    ("free", "per_block", "num_blocks", "cache_fraction", "expected"),
    [
        (10 * GiB, GiB, 32, 0.25, 7),  # 7.5 GiB for weights
        (4000, 1000, 10, 0.0, 4),  # exact fit
        (3999, 1000, 10, 0.0, 3),
        (10**12, 1000, 12, 0.5, 12),  # more memory than the model needs: all of it
        (2000, 1000, 12, 0.5, 1),  # exactly one block after the cache share
    ],
)
def test_span_length_for_memory(free: int, per_block: int, num_blocks: int, cache_fraction: float,
                                expected: int) -> None:
    assert span_length_for_memory(free, per_block, num_blocks, cache_fraction=cache_fraction) == expected


def test_span_length_for_memory_says_why_nothing_fits() -> None:
    with pytest.raises(ConfigError, match="not even one block fits") as info:
        span_length_for_memory(1999, 1000, 12, cache_fraction=0.5)
    text = str(info.value)
    assert "(1999 bytes)" in text and "(999 bytes)" in text and "(1000 bytes)" in text and "50%" in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("free", "per_block", "num_blocks", "cache_fraction", "message"),
    [
        (0, 1000, 12, 0.0, "not even one block"),
        (10**9, 0, 12, 0.0, "bytes per block"),
        (-1, 1000, 12, 0.0, "free memory"),
        (10**9, 1000, 0, 0.0, "at least one block"),
        (10**9, 1000, 12, 1.0, "cache fraction"),
        (10**9, 1000, 12, -0.1, "cache fraction"),
    ],
)
def test_span_length_for_memory_rejects(free: int, per_block: int, num_blocks: int, cache_fraction: float,
                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        span_length_for_memory(free, per_block, num_blocks, cache_fraction=cache_fraction)
