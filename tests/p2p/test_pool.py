"""Connection reuse: the pure idle pool's bounds, and what makes a direct-plane stream reusable (on loopback)."""

from __future__ import annotations

import asyncio

import pytest

from meshinfer.errors import ConfigError
from meshinfer.p2p.direct import DirectPlane
from meshinfer.p2p.identity import Identity
from meshinfer.p2p.pool import IdlePool
from meshinfer.p2p.stream import DEFAULT_SETTINGS, MessageStream
from meshinfer.wire.messages import Ping, Pong

P = "/meshinfer/session/1"


def test_take_gives_the_newest_idle_item_of_the_key_and_counts_reuse() -> None:
    pool: IdlePool[str] = IdlePool(max_idle_s=10.0)
    assert pool.put("A", P, "a1", now=0.0) == []
    assert pool.put("A", P, "a2", now=1.0) == []
    assert pool.put("B", P, "b1", now=1.0) == []
    assert pool.take("A", "/other/1", now=2.0) == (None, [])  # another protocol: nothing
    assert pool.take("A", P, now=2.0) == ("a2", [])
    assert pool.take("A", P, now=2.0) == ("a1", [])
    assert pool.take("A", P, now=2.0) == (None, [])
    assert pool.reused == 2 and len(pool) == 1


def test_bounds_per_key_and_in_all_evict_the_oldest() -> None:
    pool: IdlePool[int] = IdlePool(max_idle_s=100.0, max_per_key=2, max_total=3)
    assert pool.put("A", P, 1, now=0.0) == []
    assert pool.put("A", P, 2, now=1.0) == []
    assert pool.put("A", P, 3, now=2.0) == [1]  # per peer
    assert pool.put("B", P, 4, now=3.0) == []
    assert pool.put("C", P, 5, now=4.0) == [2]  # in all: the oldest anywhere
    assert len(pool) == 3


def test_idle_items_expire_and_dead_ones_are_handed_back_for_closing() -> None:
    pool: IdlePool[str] = IdlePool(max_idle_s=5.0)
    pool.put("A", P, "old", now=0.0)
    pool.put("A", P, "dead", now=4.0)
    pool.put("A", P, "live", now=4.5)
    found, stale = pool.take("A", P, now=6.0, alive=lambda s: s == "live")
    assert (found, stale) == ("live", ["old"])  # "old" expired (6 s > 5 s); "live" is the newest
    found, stale = pool.take("A", P, now=6.0, alive=lambda s: s == "live")
    assert (found, stale) == (None, ["dead"])
    assert len(pool) == 0


def test_a_failed_peer_is_dropped_and_drain_empties_the_pool() -> None:
    pool: IdlePool[str] = IdlePool()
    pool.put("A", P, "a", now=0.0)
    pool.put("A", "/x/1", "ax", now=0.0)
    pool.put("B", P, "b", now=0.0)
    assert sorted(pool.drop_peer("A")) == ["a", "ax"]
    assert pool.take("A", P, now=0.0) == (None, [])
    assert pool.drain() == ["b"] and len(pool) == 0


def test_a_pool_that_keeps_nothing_hands_everything_back_and_bad_bounds_are_refused() -> None:
    assert IdlePool[str](max_per_key=0).put("A", P, "a", now=0.0) == ["a"]
    with pytest.raises(ConfigError):
        IdlePool[str](max_idle_s=0)
    with pytest.raises(ConfigError):
        IdlePool[str](max_total=-1)


async def _serve_pings(stream: MessageStream) -> None:
    async for msg in stream:
        if isinstance(msg, Ping):
            await stream.send(Pong(seq=msg.seq))


def test_a_dialled_stream_measures_its_round_trip_and_is_reusable_until_the_peer_ends_it() -> None:
    async def main() -> None:
        server, client = DirectPlane(Identity.generate()), DirectPlane(Identity.generate())
        await server.listen("127.0.0.1", 0)
        server.handle(P, _serve_pings, DEFAULT_SETTINGS)
        try:
            for address in server.addresses(["127.0.0.1"]):
                stream = await client.dial(server.identity.peer_id, address, P, settings=DEFAULT_SETTINGS,
                                           timeout=10.0)
                assert stream.dial_rtt_s is not None and 0 < stream.dial_rtt_s < 10
                reply = await stream.request(Ping(seq=1), timeout=10.0)
                assert isinstance(reply, Pong) and stream.reusable()
                await server.close()  # the peer ends every connection
                for _ in range(500):
                    if not stream.reusable():
                        break
                    await asyncio.sleep(0.01)
                assert not stream.reusable()
                await stream.close()
                break  # the listener is gone: one endpoint kind is enough here
            assert client.dials == 1
        finally:
            await server.close()
            await client.close()

    asyncio.run(main())
