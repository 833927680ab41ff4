"""``PeerBans``: exponential backoff, forgiveness, bans, expiry and bounded memory, with time passed in."""

from __future__ import annotations

import pytest

from meshinfer.errors import ConfigError
from meshinfer.weights.bans import DEFAULT_MAX_PEERS, PeerBans


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, [1, 2, 4, 8, 16, 32, 60, 60, 60]),
        ({"base_s": 0.5, "max_s": 5.0, "factor": 3.0}, [0.5, 1.5, 4.5, 5.0, 5.0]),
        ({"base_s": 2.0, "max_s": 2.0}, [2.0, 2.0, 2.0]),
        ({"base_s": 1.0, "max_s": 10.0, "factor": 1.0}, [1.0, 1.0, 1.0]),
    ],
)
def test_backoff_sequence_and_cap(kwargs: dict, expected: list[float]) -> None:
    bans = PeerBans(**kwargs)
    lengths = [bans.fail("A", now=0.0) for _ in expected]
    assert lengths == pytest.approx(expected)
    assert bans.failures("A") == len(expected)


def test_many_failures_stay_at_the_cap_without_overflow() -> None:
    bans = PeerBans(base_s=1.0, max_s=60.0, factor=10.0)
    for _ in range(5000):
        length = bans.fail("A", now=0.0)
    assert length == 60.0
    assert bans.until("A") == 60.0


def test_ban_window_and_expiry() -> None:
    bans = PeerBans(base_s=1.0, max_s=60.0)
    assert bans.fail("A", now=100.0) == 1.0
    assert bans.until("A") == 101.0
    assert bans.backing_off("A", 100.0) and bans.backing_off("A", 100.999)
    assert not bans.backing_off("A", 101.0)  # the ban ends at `until`
    assert bans.avoided(100.5) == {"A"}
    assert bans.avoided(101.5) == set()
    assert not bans.backing_off("B", 100.0) and bans.until("B") is None


def test_consecutive_failures_count_after_the_ban_ends_and_never_shorten_a_ban() -> None:
    bans = PeerBans(base_s=1.0, max_s=60.0)
    bans.fail("A", now=0.0)  # until 1
    assert bans.fail("A", now=5.0) == 2.0  # the ban had ended, but the peer is not forgiven yet
    assert bans.until("A") == 7.0
    bans = PeerBans(base_s=10.0, max_s=60.0, factor=1.0)
    bans.fail("A", now=0.0)  # until 10
    bans.fail("A", now=-5.0)  # a late report of an older failure must not shorten the ban
    assert bans.until("A") == 10.0


def test_succeed_forgives() -> None:
    bans = PeerBans(base_s=1.0, max_s=60.0)
    for _ in range(3):
        bans.fail("A", now=0.0)
    bans.fail("B", now=0.0)
    assert bans.backing_off("A", 1.0)
    bans.succeed("A")
    assert bans.failures("A") == 0 and bans.until("A") is None
    assert not bans.backing_off("A", 1.0)
    assert bans.avoided(0.5) == {"B"}
    assert bans.fail("A", now=2.0) == 1.0  # backoff starts again from the base
    bans.succeed("never-seen")  # harmless
    assert len(bans) == 2


def test_stale_entries_are_forgotten() -> None:
    bans = PeerBans(base_s=1.0, max_s=4.0, forget_s=10.0)
    bans.fail("A", now=0.0)  # until 1
    bans.fail("B", now=5.0)  # until 6
    assert bans.avoided(10.0) == set()
    assert len(bans) == 2  # ended, but not long ago: the counts are kept
    assert bans.avoided(12.0) == set()
    assert bans.until("A") is None and bans.until("B") == 6.0  # A ended 11 s ago, B 6 s ago
    assert bans.fail("C", now=100.0) == 1.0  # failing also drops stale entries (from the oldest end)
    assert len(bans) == 1 and bans.until("B") is None
    assert bans.fail("A", now=100.0) == 1.0  # A's count started afresh


def test_default_forget_is_ten_max_bans() -> None:
    bans = PeerBans(base_s=1.0, max_s=3.0)
    assert bans.forget_s == 30.0
    bans.fail("A", now=0.0)
    bans.avoided(30.9)
    assert bans.failures("A") == 1
    bans.avoided(31.1)
    assert bans.failures("A") == 0


def test_size_is_bounded_dropping_the_least_recently_failed() -> None:
    bans = PeerBans(max_peers=3)
    for peer in ("p0", "p1", "p2"):
        bans.fail(peer, now=0.0)
    bans.fail("p0", now=0.0)  # p0 failed again: now the most recent
    bans.fail("p3", now=0.0)
    assert len(bans) == 3
    assert bans.until("p1") is None
    assert bans.avoided(0.5) == {"p0", "p2", "p3"}
    assert bans.failures("p0") == 2


def test_default_bound() -> None:
    bans = PeerBans()
    for i in range(DEFAULT_MAX_PEERS + 50):
        bans.fail(f"peer{i}", now=float(i) * 1e-3)
    assert len(bans) == DEFAULT_MAX_PEERS == 10_000
    assert bans.until("peer0") is None and bans.until(f"peer{DEFAULT_MAX_PEERS + 49}") is not None


def test_a_ban_lasts_ban_s_and_a_success_does_not_lift_it() -> None:
    bans = PeerBans(ban_s=60.0)
    bans.ban("A", now=0.0)
    assert bans.banned("A", 59.9) and not bans.banned("A", 60.0)
    assert not bans.backing_off("A", 1.0) and bans.failures("A") == 0  # banned, not failing
    bans.succeed("A")
    assert bans.banned("A", 1.0) and not bans.usable("A", 1.0)
    bans.fail("B", now=0.0)
    assert bans.avoided(0.5) == {"A", "B"} and bans.avoided(1.0) == {"A"} and len(bans) == 2
    assert bans.avoided(60.0) == set() and len(bans) == 1  # the ended ban is dropped, B's count is kept
    assert bans.usable("A", 60.0)


def test_usable_is_neither_banned_nor_backing_off() -> None:
    bans = PeerBans(base_s=1.0, max_s=60.0)
    assert bans.fail("P", 0.0) == 1.0 and bans.fail("P", 0.0) == 2.0
    assert not bans.usable("P", 1.99) and bans.usable("P", 2.0)
    bans.succeed("P")
    assert bans.usable("P", 0.0)


def test_bans_are_bounded_dropping_ended_then_oldest() -> None:
    bans = PeerBans(max_peers=2, ban_s=10.0)
    bans.ban("old", now=0.0)
    bans.ban("a", now=5.0)
    bans.ban("b", now=11.0)  # "old" ended at 10: dropped first
    assert bans.banned("a", 12.0) and bans.banned("b", 12.0)
    bans.ban("c", now=12.0)  # none ended: the oldest ban goes
    assert not bans.banned("a", 12.0) and bans.banned("b", 12.0) and bans.banned("c", 12.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_s": 0.0}, "base_s"),
        ({"base_s": -1.0}, "base_s"),
        ({"base_s": float("nan")}, "base_s"),
        ({"max_s": float("inf")}, "max_s"),
        ({"base_s": 10.0, "max_s": 5.0}, "max_s"),
        ({"factor": 0.5}, "factor"),
        ({"factor": 0.0}, "factor"),
        ({"forget_s": -1.0}, "forget_s"),
        ({"max_peers": 0}, "max_peers"),
        ({"ban_s": 0.0}, "ban_s"),
        ({"ban_s": float("inf")}, "ban_s"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PeerBans(**kwargs)


def test_bans_grow_for_repeat_offenders_up_to_the_cap_and_are_forgotten_later() -> None:
    bans = PeerBans(ban_s=60.0, ban_factor=4.0, ban_max_s=3600.0, max_s=60.0)  # forget_s: 600 s
    now, lengths = 0.0, []
    for _ in range(5):
        lengths.append(bans.ban("L", now))
        now += lengths[-1] + 1.0  # banned again just after each ban ends
    assert lengths == [60.0, 240.0, 960.0, 3600.0, 3600.0]
    assert bans.banned("L", now - 2.0) and not bans.banned("L", now)
    bans.avoided(now + 601.0)  # long after the last ban ended: forgotten
    assert bans.ban("L", now + 601.0) == 60.0


def test_a_ban_never_shortens_a_running_one_and_the_default_does_not_grow() -> None:
    bans = PeerBans(ban_s=10.0)
    assert [bans.ban("A", t) for t in (0.0, 11.0, 22.0)] == [10.0, 10.0, 10.0]
    grow = PeerBans(ban_s=10.0, ban_factor=2.0, ban_max_s=100.0)
    grow.ban("B", 0.0)
    grow.ban("B", 1.0)  # 20 s from 1.0
    assert grow.banned("B", 20.5) and not grow.banned("B", 21.0)
    with pytest.raises(ConfigError, match="ban_max_s"):
        PeerBans(ban_s=10.0, ban_max_s=5.0)
    with pytest.raises(ConfigError, match="factors"):
        PeerBans(ban_factor=0.5)
