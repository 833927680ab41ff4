"""``PiecePlanner`` and ``PeerBans``: pure decisions of which piece goes to which seeder."""

from __future__ import annotations

from collections import Counter

import pytest

from meshinfer.weights.plan import PeerBans, PiecePlanner, holders_by_piece


def drain(planner: PiecePlanner[int], peer: str, now: float) -> list[int]:
    """Everything ``peer`` is given right now, each reported done."""
    out = []
    while (piece := planner.take(peer, now)) is not None:
        out.append(piece)
        planner.done(piece, peer)
    return out


@pytest.mark.parametrize(("pieces", "peers"), [(10, ["A", "B"]), (9, ["A", "B", "C"]), (7, ["A", "B", "C"]),
                                               (1, ["A", "B"])])
def test_pieces_are_spread_round_robin(pieces: int, peers: list[str]) -> None:
    planner = PiecePlanner({i: peers for i in range(pieces)}, now=0.0)
    counts = Counter({p: len(drain(planner, p, 0.0)) for p in peers})
    assert sum(counts.values()) == pieces and planner.finished
    assert max(counts.values()) - min(counts.values()) <= 1


def test_a_piece_only_goes_to_peers_holding_it() -> None:
    holders = holders_by_piece([(["a0", "a1", "a2"], ["A"]), (["b0", "b1"], ["B"]), (["x0", "x1"], ["A", "B"])])
    planner = PiecePlanner(holders, now=0.0, steal_after=0.0)
    got_b = drain(planner, "B", 0.0)
    assert not set(got_b) & {"a0", "a1", "a2"}
    got_a = drain(planner, "A", 0.0)
    assert set(got_a) | set(got_b) == set(holders) and planner.finished


def test_stealing_waits_for_steal_after_or_a_lost_peer() -> None:
    planner = PiecePlanner({i: ["A", "B"] for i in range(6)}, now=100.0, steal_after=1.0)
    assert len(drain(planner, "A", 100.1)) == 3
    assert planner.take("A", 100.5) is None  # B's share is still B's
    assert planner.queued("B") == 3
    stolen = planner.take("A", 101.0)  # time is up: take B's last piece
    assert stolen is not None and planner.queued("B") == 2
    planner.done(stolen, "A")
    assert len(drain(planner, "B", 101.0)) == 2 and planner.finished


def test_a_rejected_piece_bans_its_sender_and_goes_elsewhere() -> None:
    bans = PeerBans(ban_s=60.0)
    planner = PiecePlanner({i: ["A", "B"] for i in range(4)}, now=0.0, bans=bans)
    bad = planner.take("A", 0.0)
    assert bad is not None
    planner.reject(bad, "A", 0.0)
    assert bans.banned("A", 1.0) and not bans.banned("A", 61.0)
    assert planner.take("A", 1.0) is None
    got = drain(planner, "B", 1.0)  # B gets A's pieces at once, not after steal_after
    assert sorted(got) == [0, 1, 2, 3] and planner.finished


def test_unavailable_pieces_move_on_or_get_stuck() -> None:
    planner = PiecePlanner({"p": ["A", "B"], "q": ["A"]}, now=0.0, steal_after=0.0)
    first = [planner.take("A", 0.0), planner.take("A", 0.0)]
    assert set(first) <= {"p", "q"}
    for piece in first:
        if piece is not None:
            planner.unavailable(piece, "A", 0.0)
    assert planner.stuck(0.0) == ["q"]
    assert planner.take("B", 0.0) == "p"
    planner.done("p", "B")
    assert planner.remaining == 1 and not planner.finished


def test_a_failed_peer_backs_off_and_comes_back() -> None:
    bans = PeerBans(base_s=1.0)
    planner = PiecePlanner({i: ["A", "B"] for i in range(4)}, now=0.0, bans=bans, steal_after=10.0)
    inflight = planner.take("A", 0.0)
    wait = planner.peer_failed("A", 0.0)
    assert wait == 1.0 and planner.in_flight("A") == []
    assert planner.take("A", 0.5) is None  # backing off
    got_b = planner.take("B", 0.5)
    assert got_b is not None
    planner.peer_back("A")
    later = planner.take("A", 1.5)  # its old pieces went to B; the stranded ones it may take again
    assert later is not None and later != got_b and inflight is not None


def test_a_late_answer_for_a_piece_handed_on_still_counts() -> None:
    planner = PiecePlanner({"p": ["A", "B"]}, now=0.0, steal_after=0.0)
    assert planner.take("A", 0.0) == "p"
    planner.peer_failed("A", 0.0)  # "p" goes back to the pool
    planner.done("p", "A")  # but A's answer arrived and verified after all
    assert planner.finished and planner.take("B", 0.0) is None


def test_dropping_a_peer_leaves_its_only_pieces_stuck() -> None:
    planner = PiecePlanner({"only-a": ["A"], "both": ["A", "B"]}, now=0.0)
    planner.drop_peer("A", 0.0)
    assert planner.stuck(0.0) == ["only-a"]
    assert planner.take("B", 0.0) == "both"


@pytest.mark.parametrize(("failures", "wait"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (20, 60.0)])
def test_backoff_doubles_up_to_a_cap(failures: int, wait: float) -> None:
    bans = PeerBans(base_s=1.0, max_s=60.0)
    for _ in range(failures - 1):
        bans.fail("P", 0.0)
    assert bans.fail("P", 0.0) == wait
    assert not bans.usable("P", wait - 0.01) and bans.usable("P", wait)
    bans.succeed("P")
    assert bans.usable("P", 0.0) and bans.failures("P") == 0
