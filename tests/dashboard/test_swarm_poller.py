"""``SwarmPoller`` with a scripted reader: states, recovery, bounded pings. No network, real asyncio."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

from meshinfer.dashboard.poller import SwarmPoller
from meshinfer.errors import ConfigError, TransportError


def doc_with(peers: list[str], complete: bool = True) -> dict[str, Any]:
    servers = [{"peer_id": p, "span": "0:1", "state": "online", "throughput": 1.0, "sessions": 0} for p in peers]
    models = [{"model_id": "m", "name": "m", "num_blocks": 1, "missing_blocks": [], "block_throughput": [1.0],
               "block_servers": [len(peers)], "servers": servers}] if peers else []
    return {"models": models, "complete": complete}


class ScriptedReader:
    """Answers reads from a script (a doc, or an exception to raise); pings per peer (seconds or exception)."""

    def __init__(self, reads: list[Any], pings: Mapping[str, Any] | None = None, ping_delay: float = 0.0) -> None:
        self.reads = list(reads)
        self.pings = dict(pings or {})
        self.ping_delay = ping_delay
        self.pinged: list[str] = []
        self.active = self.max_active = 0
        self.closed = False

    @property
    def viewer(self) -> str:
        return "viewer-peer"

    async def read(self) -> dict[str, Any]:
        item = self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]
        if isinstance(item, BaseException):
            raise item
        return item

    async def ping(self, server: Mapping[str, Any]) -> float:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.ping_delay)
            self.pinged.append(server["peer_id"])
            result = self.pings.get(server["peer_id"], 0.001)
            if isinstance(result, BaseException):
                raise result
            return result
        finally:
            self.active -= 1

    async def close(self) -> None:
        self.closed = True


def make(reader: ScriptedReader, joins: list[BaseException | None] | None = None, **kw: Any) -> SwarmPoller:
    script = list(joins or [])

    async def connect() -> ScriptedReader:
        if script:
            err = script.pop(0)
            if err is not None:
                raise err
        return reader

    return SwarmPoller(connect, clock=lambda: 1000.0, **kw)


async def settle(poller: SwarmPoller) -> None:
    if poller._ping_task is not None:
        await poller._ping_task


def test_before_the_first_read_the_payload_is_loading() -> None:
    poller = make(ScriptedReader([doc_with([])]))
    p = poller.snapshot()
    assert p["models"] == [] and p["updated_at"] is None and p["error"] is None
    assert json.loads(poller.snapshot_json()) == p


def test_a_read_publishes_the_document_with_round_trips() -> None:
    reader = ScriptedReader([doc_with(["a", "b"])], pings={"a": 0.002, "b": TransportError("refused")})
    poller = make(reader, interval=2.0)

    async def go() -> None:
        await poller.refresh_once()
        assert [s["rtt_ms"] for s in poller.snapshot()["models"][0]["servers"]] == [None, None]  # not yet measured
        await settle(poller)

    asyncio.run(go())
    p = poller.snapshot()
    assert p["error"] is None and p["updated_at"] == 1000.0 and p["viewer_peer_id"] == "viewer-peer"
    assert {s["peer_id"]: s["rtt_ms"] for s in p["models"][0]["servers"]} == {"a": 2.0, "b": None}
    assert json.loads(poller.snapshot_json()) == p and p["refresh_interval"] == 2.0


def test_a_failed_join_is_the_error_and_is_retried() -> None:
    reader = ScriptedReader([doc_with(["a"])])
    poller = make(reader, joins=[TransportError("cannot join the swarm: no initial peer answered (x)"), None],
                  rtt=False)
    asyncio.run(poller.refresh_once())
    p = poller.snapshot()
    assert p["error"] == "no initial peer answered (x)" and p["models"] == [] and poller.reader is None
    asyncio.run(poller.refresh_once())
    p = poller.snapshot()
    assert p["error"] is None and len(p["models"]) == 1 and (poller.reads, poller.failures) == (1, 1)


def test_a_failed_read_keeps_the_last_good_models_with_the_error() -> None:
    poller = make(ScriptedReader([doc_with(["a"]), RuntimeError("dht broke"), doc_with(["a", "b"])]), rtt=False)

    async def go() -> None:
        await poller.refresh_once()
        poller.clock = lambda: 2000.0
        await poller.refresh_once()
        p = poller.snapshot()
        assert p["error"] == "dht broke" and len(p["models"][0]["servers"]) == 1
        assert p["updated_at"] == 1000.0 and p["checked_at"] == 2000.0
        await poller.refresh_once()

    asyncio.run(go())
    p = poller.snapshot()
    assert p["error"] is None and len(p["models"][0]["servers"]) == 2 and p["updated_at"] == 2000.0


@pytest.mark.parametrize(("doc", "error"), [
    (doc_with([], complete=False), "no peer of the swarm answered the DHT read in time"),
    (doc_with([], complete=True), None),  # answered, nothing served: the empty state, not an error
    (doc_with(["a"], complete=False), None),  # partial: shown, with the page's "incomplete" warning
])
def test_unanswered_reads_are_errors_empty_swarms_are_not(doc: dict[str, Any], error: str | None) -> None:
    poller = make(ScriptedReader([doc]), rtt=False)
    asyncio.run(poller.refresh_once())
    assert poller.snapshot()["error"] == error


def test_pings_are_bounded_per_round_and_in_concurrency_and_skip_fresh_peers() -> None:
    peers = [f"p{i:02d}" for i in range(10)]
    reader = ScriptedReader([doc_with(peers)], ping_delay=0.01)
    poller = make(reader, ping_concurrency=3, pings_per_round=4)

    async def go() -> None:
        for _ in range(3):
            await poller.refresh_once()
            await settle(poller)

    asyncio.run(go())
    assert reader.max_active == 3
    assert sorted(reader.pinged) == peers and len(reader.pinged) == 10  # 4 + 4 + 2, none twice while fresh
    assert all(s["rtt_ms"] == 1.0 for s in poller.snapshot()["models"][0]["servers"])


def test_servers_that_leave_are_forgotten() -> None:
    poller = make(ScriptedReader([doc_with(["a", "b"]), doc_with(["b"])]))

    async def go() -> None:
        await poller.refresh_once()
        await settle(poller)
        await poller.refresh_once()

    asyncio.run(go())
    assert poller.rtt.rtt_ms() == {"b": 1.0}


def test_run_refreshes_until_closed_and_closes_the_reader() -> None:
    reader = ScriptedReader([doc_with(["a"])])
    poller = make(reader, interval=0.05, rtt=False)

    async def go() -> None:
        poller.start()
        await asyncio.sleep(0.3)
        await poller.aclose()

    asyncio.run(go())
    assert poller.reads >= 3 and reader.closed and poller.reader is None


@pytest.mark.parametrize("kw", [{"interval": 0}, {"ping_concurrency": 0}, {"pings_per_round": 0}])
def test_bad_settings_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        make(ScriptedReader([doc_with([])]), **kw)
