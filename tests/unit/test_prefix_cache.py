"""``client.prefix_cache``: which held session a prompt continues, LRU eviction, TTL expiry (pure logic)."""

from __future__ import annotations

import pytest

from meshinfer.client.prefix_cache import PrefixCache, common_prefix, min_match
from meshinfer.errors import UsageError

BASE = list(range(100, 140))  # 40 tokens


def test_common_prefix_and_min_match() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert min_match(100) == 16 and min_match(10) == 5 and min_match(1) == 1


def test_take_picks_the_longest_match_with_room_and_removes_it() -> None:
    cache: PrefixCache[str] = PrefixCache(capacity=4, ttl=60.0)
    assert cache.put("short", BASE[:20], 100, now=0.0) == []
    assert cache.put("long", [*BASE[:35], 1, 2], 100, now=1.0) == []
    assert cache.put("tiny", BASE[:38], 50, now=2.0) == []  # the best match, but too short a session
    reuse = cache.take([*BASE, 7, 8], length=90, now=3.0)
    assert reuse is not None and reuse.session == "long" and reuse.keep == 35
    assert len(cache) == 2 and cache.stats.hits == 1 and cache.stats.tokens_reused == 35
    assert cache.take([*BASE, 7, 8], length=90, now=3.0) is not None  # "short" now (20 >= 16)
    assert cache.take([*BASE, 7, 8], length=90, now=3.0) is None  # "tiny" has no room
    assert cache.stats.misses == 1


def test_a_whole_prompt_match_keeps_its_last_position_to_run() -> None:
    cache: PrefixCache[str] = PrefixCache(capacity=2, ttl=60.0)
    cache.put("s", [*BASE, 1, 2, 3], 100, now=0.0)
    reuse = cache.take(BASE, length=60, now=0.0)
    assert reuse is not None and reuse.keep == len(BASE) - 1


def test_too_short_a_match_is_a_miss() -> None:
    cache: PrefixCache[str] = PrefixCache(capacity=2, ttl=60.0)
    cache.put("s", BASE[:10] + [0] * 30, 100, now=0.0)
    assert cache.take(BASE, length=60, now=0.0) is None  # 10 < 16
    assert len(cache) == 1 and cache.stats.misses == 1


def test_lru_eviction_returns_the_oldest_and_recency_follows_takes() -> None:
    cache: PrefixCache[str] = PrefixCache(capacity=2, ttl=60.0)
    cache.put("a", BASE, 100, now=0.0)
    cache.put("b", [1] * 40, 100, now=1.0)
    reuse = cache.take(BASE, length=50, now=2.0)
    assert reuse is not None and reuse.session == "a"
    cache.put("a", BASE, 100, now=3.0)  # "a" back: now the most recent
    assert cache.put("c", [2] * 40, 100, now=4.0) == ["b"]
    assert cache.stats.evictions == 1 and len(cache) == 2


def test_ttl_expiry_and_drain() -> None:
    cache: PrefixCache[str] = PrefixCache(capacity=4, ttl=10.0)
    cache.put("a", BASE, 100, now=0.0)
    cache.put("b", [1] * 40, 100, now=5.0)
    assert cache.next_expiry() == 10.0
    assert cache.take(BASE, length=50, now=11.0) is None  # "a" expired: not a candidate
    assert cache.expire(now=11.0) == ["a"] and cache.stats.expirations == 1
    assert cache.next_expiry() == 15.0
    assert cache.drain() == ["b"] and len(cache) == 0 and cache.next_expiry() is None


def test_off_or_empty_history_hands_the_session_back() -> None:
    off: PrefixCache[str] = PrefixCache(capacity=0, ttl=60.0)
    assert not off.enabled and off.put("s", BASE, 100, now=0.0) == ["s"]
    assert off.take(BASE, length=50, now=0.0) is None and off.stats.misses == 0
    on: PrefixCache[str] = PrefixCache(capacity=2, ttl=60.0)
    assert on.put("s", [], 100, now=0.0) == ["s"]
    with pytest.raises(UsageError):
        on.put("s", BASE, 10, now=0.0)


def test_held_on_lists_sessions_on_given_servers_lru_first_and_remove_takes_one_out() -> None:
    routes = {"a": {"p1", "p2"}, "b": {"p2", "p3"}, "c": {"p4"}}
    cache: PrefixCache[str] = PrefixCache(capacity=4, ttl=60.0)
    for t, name in enumerate(("b", "a", "c")):
        cache.put(name, BASE, 100 + t, now=float(t))
    assert cache.held_on({"p2"}, routes.__getitem__) == ["b", "a"]
    assert cache.held_on({"p4", "p1"}, routes.__getitem__) == ["a", "c"]
    assert cache.held_on({"p9"}, routes.__getitem__) == []
    assert cache.remove("b") and not cache.remove("b")
    assert cache.held_on({"p2"}, routes.__getitem__) == ["a"] and len(cache) == 2
