"""Which servers the dashboard pings next, and what it remembers (``dashboard.rtt.RttCache``): pure, no network."""

from __future__ import annotations

import math

import pytest

from meshinfer.dashboard.rtt import RttCache
from meshinfer.errors import ConfigError


def cache_with(entries: dict[str, tuple[float | None, float]], max_age: float = 30.0,
               retry_after: float = 10.0) -> RttCache:
    cache = RttCache(max_age=max_age, retry_after=retry_after)
    for peer, (rtt, at) in entries.items():
        cache.record(peer, rtt, at)
    return cache


@pytest.mark.parametrize(("entries", "peers", "now", "limit", "expected"), [
    ({}, ["a", "b", "c"], 0.0, 10, ["a", "b", "c"]),  # never measured: in the given order
    ({}, ["a", "b", "c"], 0.0, 2, ["a", "b"]),  # at most `limit` per round
    ({}, ["a", "a", "b"], 0.0, 10, ["a", "b"]),  # duplicates once
    ({"a": (0.001, 0.0)}, ["a", "b"], 5.0, 10, ["b"]),  # a is fresh
    ({"a": (0.001, 0.0)}, ["a", "b"], 30.0, 10, ["b", "a"]),  # a is max_age old: after the new ones
    ({"a": (0.001, 0.0), "b": (0.001, 20.0)}, ["b", "a"], 60.0, 10, ["a", "b"]),  # stalest first
    ({"a": (None, 0.0)}, ["a"], 9.0, 10, []),  # a failed try waits retry_after
    ({"a": (None, 0.0)}, ["a"], 10.0, 10, ["a"]),
    ({"a": (0.001, 0.0)}, ["b"], 100.0, 10, ["b"]),  # only peers asked about
    ({}, ["a"], 0.0, 0, []),
])
def test_due(entries: dict[str, tuple[float | None, float]], peers: list[str], now: float, limit: int,
             expected: list[str]) -> None:
    assert cache_with(entries).due(peers, now, limit) == expected


@pytest.mark.parametrize(("rtt", "shown"), [
    (0.000123456, 0.123), (0.5, 500.0), (None, None), (-1.0, None), (math.nan, None), (math.inf, None),
])
def test_rtt_ms(rtt: float | None, shown: float | None) -> None:
    cache = cache_with({"a": (rtt, 0.0)})
    assert cache.rtt_ms() == {"a": shown}


def test_forget_others_drops_peers_that_left() -> None:
    cache = cache_with({"a": (0.001, 0.0), "b": (0.002, 0.0), "c": (None, 0.0)})
    cache.forget_others(["b", "zzz"])
    assert cache.rtt_ms() == {"b": 2.0} and len(cache) == 1


def test_a_new_measurement_replaces_the_old_one() -> None:
    cache = cache_with({"a": (0.001, 0.0)})
    cache.record("a", None, 40.0)
    assert cache.rtt_ms() == {"a": None} and cache.due(["a"], 45.0, 5) == []


@pytest.mark.parametrize(("max_age", "retry_after"), [(0, 1), (1, 0), (-1, 1)])
def test_bad_ages_are_refused(max_age: float, retry_after: float) -> None:
    with pytest.raises(ConfigError):
        RttCache(max_age=max_age, retry_after=retry_after)
