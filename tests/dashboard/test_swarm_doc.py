"""The swarm document and the dashboard payload (``meshinfer.dashboard.doc``): pure functions, no network."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from meshinfer.dashboard.doc import block_throughput, dashboard_payload, snapshot_doc, swarm_totals
from meshinfer.types import BlockRange
from meshinfer.wire.records import ModelCard, ServerRecord


def record(peer: str, span: str, state: str = "online", throughput: float = 10.0, **extra: Any) -> ServerRecord:
    return ServerRecord(peer_id=peer, model_id="m1", span=BlockRange.parse(span), state=state,  # type: ignore[arg-type]
                        throughput=throughput, cache_tokens_left=100, addresses=[f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"],
                        software_version="0.1.0", **extra)


@pytest.mark.parametrize(("servers", "num_blocks", "expected"), [
    ([], 3, [0.0, 0.0, 0.0]),
    ([("a", "0:3", "online", 5.0)], 3, [5.0, 5.0, 5.0]),
    ([("a", "0:2", "online", 5.0), ("b", "1:3", "online", 2.5)], 3, [5.0, 7.5, 2.5]),
    ([("a", "0:2", "joining", 5.0), ("b", "1:3", "draining", 2.5)], 3, [0.0, 0.0, 0.0]),  # only online counts
    ([("a", "0:4", "online", 1.0)], 2, [1.0, 1.0]),  # a span past the model's end is clipped
    ([("a", "1:2", "online", 0.1), ("b", "1:2", "online", 0.2)], 3, [0.0, 0.3, 0.0]),
])
def test_block_throughput(servers: list[tuple[str, str, str, float]], num_blocks: int,
                          expected: list[float]) -> None:
    records = [record(p, s, st, t) for p, s, st, t in servers]
    assert block_throughput(records, num_blocks) == pytest.approx(expected)


def coverage(model_id: str, num_blocks: int, records: list[ServerRecord], complete: bool = True) -> Any:
    from meshinfer.p2p.announce import Coverage

    blocks = [[r.peer_id for r in records if i in r.span] for i in range(num_blocks)]
    return Coverage(model_id, num_blocks, {r.peer_id: r for r in records}, blocks, complete)


def test_snapshot_doc_lists_models_blocks_and_servers_by_span() -> None:
    from meshinfer.p2p.announce import ModelEntry, SwarmSnapshot

    card = ModelCard(model_id="m1", name="tiny", family="llama", num_blocks=4, hidden_size=64, dtype="float32")
    records = [record("b", "2:4", throughput=4.0, sessions=2, queued_steps=1,
                      direct_addresses=["/ip4/127.0.0.1/tcp/9"], device="NVIDIA H200", dtype="bfloat16"),
               record("a", "0:2", throughput=3.0, public_name="alpha"), record("c", "1:2", state="joining")]
    snap = SwarmSnapshot([ModelEntry(card, 3)], {"m1": coverage("m1", 4, records)}, complete=True)
    doc = snapshot_doc(snap)
    (m,) = doc["models"]
    assert doc["complete"] is True
    assert m["block_servers"] == [1, 2, 1, 1] and m["missing_blocks"] == [] and m["announced_by"] == 3
    assert m["block_throughput"] == [3.0, 3.0, 4.0, 4.0]  # the joining server adds no throughput
    assert [s["peer_id"] for s in m["servers"]] == ["a", "c", "b"]  # by span start, then end
    b = m["servers"][2]
    assert (b["span"], b["sessions"], b["queued_steps"], b["direct_addresses"]) == ("2:4", 2, 1,
                                                                                   ["/ip4/127.0.0.1/tcp/9"])
    assert m["servers"][0]["public_name"] == "alpha"
    assert (b["device"], b["dtype"]) == ("NVIDIA H200", "bfloat16")  # issue 18: shown per server
    assert (m["servers"][0]["device"], m["servers"][0]["dtype"]) == ("cpu", "float32")


def test_swarm_table_shows_each_servers_device_and_dtype() -> None:
    from rich.console import Console

    from meshinfer.cli.swarm import print_tables

    card = {"model_id": "m1" * 8, "name": "tiny", "family": "llama", "num_blocks": 4, "hidden_size": 64,
            "dtype": "float32", "missing_blocks": [], "block_servers": [1, 1, 1, 1]}
    servers = [{"peer_id": "QmGpu", "span": "0:2", "state": "online", "quant": "none", "weight_bytes": 0,
                "device": "NVIDIA H200", "dtype": "bfloat16", "throughput": 500.0, "cache_tokens_left": 10,
                "software_version": "0.1", "public_name": None},
               {"peer_id": "QmOld", "span": "2:4", "state": "online", "throughput": 5.0,  # a pre-issue-18 entry
                "cache_tokens_left": 10, "software_version": "0.1", "public_name": None}]
    console = Console(record=True, width=200)
    print_tables({"models": [{**card, "servers": servers}], "complete": True}, console)
    text = console.export_text()
    assert "NVIDIA H200 · bfloat16" in text and "cpu · float32" in text


def test_swarm_json_and_the_dashboard_share_one_document_builder() -> None:
    from meshinfer.cli import swarm as cli_swarm
    from meshinfer.dashboard import doc

    assert cli_swarm.swarm_doc is doc.swarm_doc


def model_doc(model_id: str, num_blocks: int, servers: list[dict[str, Any]], missing: list[int],
              per_block: list[float]) -> dict[str, Any]:
    return {"model_id": model_id, "name": model_id, "num_blocks": num_blocks, "missing_blocks": missing,
            "block_throughput": per_block, "servers": servers}


def server(peer: str, state: str = "online", throughput: float = 1.0, sessions: int = 0) -> dict[str, Any]:
    return {"peer_id": peer, "state": state, "throughput": throughput, "sessions": sessions}


@pytest.mark.parametrize(("models", "expected"), [
    ([], {"models": 0, "servers": 0, "online": 0, "peers": 0, "blocks": 0, "missing_blocks": 0, "sessions": 0,
          "throughput": 0.0, "complete_models": 0}),
    ([model_doc("m1", 4, [server("a", throughput=2.0, sessions=1), server("b", "joining", 9.0)], [3], [2, 2, 2, 0]),
      model_doc("m2", 2, [server("a", throughput=1.5, sessions=2)], [], [1.5, 1.5])],
     {"models": 2, "servers": 3, "online": 2, "peers": 2, "blocks": 6, "missing_blocks": 1, "sessions": 3,
      "throughput": 3.5, "complete_models": 1}),
])
def test_swarm_totals(models: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    assert swarm_totals(models) == expected


def test_dashboard_payload_adds_round_trips_bottleneck_totals_and_status_without_touching_the_doc() -> None:
    doc = {"models": [model_doc("m1", 3, [server("a"), server("b")], [], [4.0, 1.5, 3.0])], "complete": True}
    before = copy.deepcopy(doc)
    p = dashboard_payload(doc, rtt_ms={"a": 0.42, "zzz": 1.0}, updated_at=10.0, checked_at=11.0, viewer="me",
                          interval=2.0)
    assert doc == before
    (m,) = p["models"]
    assert [s["rtt_ms"] for s in m["servers"]] == [0.42, None]
    assert m["bottleneck_throughput"] == 1.5
    assert p["totals"]["servers"] == 2 and p["error"] is None
    assert (p["updated_at"], p["checked_at"], p["viewer_peer_id"], p["refresh_interval"]) == (10.0, 11.0, "me", 2.0)


@pytest.mark.parametrize(("doc", "error", "models", "complete"), [
    (None, None, [], False),  # never read: empty, not complete
    (None, "no initial peer answered", [], False),
    ({"models": [], "complete": True}, None, [], True),
])
def test_dashboard_payload_states(doc: dict[str, Any] | None, error: str | None, models: list[Any],
                                  complete: bool) -> None:
    p = dashboard_payload(doc, error=error)
    assert (p["models"], p["complete"], p["error"]) == (models, complete, error)
    assert p["totals"]["models"] == 0 and p["updated_at"] is None


def test_reports_are_listed_per_accused_server_as_claims() -> None:
    from rich.console import Console

    from meshinfer.cli.swarm import print_tables
    from meshinfer.p2p.announce import ModelEntry, SwarmSnapshot
    from meshinfer.wire.records import ReportRecord

    card = ModelCard(model_id="m1", name="tiny", family="llama", num_blocks=4, hidden_size=64, dtype="float32")
    records = [record("a", "0:4"), record("b", "0:4")]
    snap = SwarmSnapshot([ModelEntry(card, 2)], {"m1": coverage("m1", 4, records)}, complete=True)

    def report(reporter: str) -> ReportRecord:
        return ReportRecord(reporter=reporter, accused="b", model_id="m1", span=BlockRange(0, 4), session_id="s",
                            quant="none", dtype="float32", commit_steps=16, commit_head=b"h" * 32,
                            commit_signature=b"s", accused_key=b"k", window_start=0, window_end=4,
                            blob_sha256=b"x" * 32, blob_size=10)

    doc = snapshot_doc(snap, {"m1": [report("r2"), report("r1"), report("r1")]})
    a, b = doc["models"][0]["servers"]
    assert (a["reports"], b["reports"], a["audits"]) == ([], ["r1", "r2"], None)
    assert snapshot_doc(snap)["models"][0]["servers"][1]["reports"] == []
    console = Console(record=True, width=250)
    print_tables(doc, console)
    assert "reports (claimed)" in console.export_text()
