"""Audit tallies (issue 19): the ``AuditTallyRecord`` schema and its bound, the validator binding a tally to its
client's subkey, reading tallies out of a DHT read (bad ones skipped and counted), summing them per server, a
client's tally of its ``AuditCounters``, and the swarm document / table / dashboard payload showing them as claims.
Pure: no process, no network."""

from __future__ import annotations

import time
from collections import Counter

import msgspec
import pytest
from hivemind.dht.validation import DHTRecord

from meshinfer.client.audit import AuditCounters
from meshinfer.client.upkeep import tally_due, tally_record, tally_state
from meshinfer.dashboard.doc import dashboard_payload, snapshot_doc
from meshinfer.errors import LimitExceededError, WireError
from meshinfer.p2p.directory import TallySum, sum_tallies, tallies_of
from meshinfer.p2p.identity import Identity
from meshinfer.p2p.node import FoundRecord
from meshinfer.p2p.signing import SignedRecordValidator, make_envelope
from meshinfer.types import BlockRange
from meshinfer.wire.limits import MAX_RECORD_BYTES, RecordLimits
from meshinfer.wire.records import (
    MAX_TALLY_PEERS,
    AuditTallyRecord,
    ModelCard,
    PeerTally,
    ServerRecord,
    audits_key,
    decode_record,
    encode_record,
)

MODEL = "ab" * 16
ALICE = Identity.generate()
MALLORY = Identity.generate()


def tally(client: str, *peers: tuple[str, int, int], model_id: str = MODEL, created: float = 1.0) -> AuditTallyRecord:
    return AuditTallyRecord(client=client, model_id=model_id, peers=[PeerTally(p, ok, bad, 16 * ok)
                                                                     for p, ok, bad in peers],
                            passed=sum(p[1] for p in peers), failed=sum(p[2] for p in peers), created=created)


def test_a_tally_round_trips_with_its_wire_form() -> None:
    rec = tally("QmClient", ("QmA", 3, 0), ("QmB", 1, 2))
    data = encode_record(rec)
    assert decode_record(data) == rec
    raw = msgspec.msgpack.decode(data)
    assert raw["type"] == "audit_tally" and raw["v"] == 1 and raw["client"] == "QmClient"
    assert raw["peers"] == [["QmA", 3, 0, 48], ["QmB", 1, 2, 16]]  # each server: [peer, passed, failed, positions]
    old = msgspec.msgpack.encode({"type": "audit_tally", "v": 1, "client": "c", "model_id": MODEL, "peers": []})
    assert decode_record(old) == AuditTallyRecord(client="c", model_id=MODEL, peers=[])  # added fields default


def test_tallies_are_bounded_and_checked() -> None:
    top = 2**53
    biggest = AuditTallyRecord(client="Q" * 256, model_id="m" * 256,
                               peers=[PeerTally(f"{i:03d}" + "P" * 253, top, top, top) for i in range(MAX_TALLY_PEERS)],
                               passed=top, failed=top, detections=top, unresolved=top, created=1e11)
    assert len(encode_record(biggest)) <= MAX_RECORD_BYTES  # every field at its max: a tally always fits
    too_many = msgspec.msgpack.encode(msgspec.structs.replace(biggest, peers=[*biggest.peers, PeerTally("x", 0, 0, 0)]))
    with pytest.raises(WireError):
        decode_record(too_many)
    with pytest.raises(WireError, match="twice"):
        decode_record(encode_record(tally("c", ("QmA", 1, 0), ("QmA", 2, 0))))
    negative = msgspec.msgpack.encode({"type": "audit_tally", "v": 1, "client": "c", "model_id": MODEL,
                                       "peers": [["QmA", -1, 0, 0]]})
    with pytest.raises(WireError):
        decode_record(negative)
    with pytest.raises(LimitExceededError):
        decode_record(b"\x00" * (MAX_RECORD_BYTES + 1))


def signed(identity: Identity, subkey: str, rec: AuditTallyRecord) -> DHTRecord:
    pack = msgspec.msgpack.encode
    plain = DHTRecord(pack(audits_key(MODEL)), pack(subkey), pack(encode_record(rec)), time.time() + 60)
    return DHTRecord(plain.key, plain.subkey, make_envelope(identity, plain), plain.expiration_time)


def test_the_validator_stores_a_tally_only_under_its_clients_own_subkey() -> None:
    v = SignedRecordValidator(None)
    alice, mallory = ALICE.peer_id, MALLORY.peer_id
    assert v.validate(signed(ALICE, alice, tally(alice, ("QmA", 1, 0))))
    assert not v.validate(signed(MALLORY, alice, tally(alice, ("QmA", 0, 9))))  # not Mallory's subkey
    assert not v.validate(signed(MALLORY, mallory, tally(alice, ("QmA", 0, 9))))  # a tally in Alice's name
    assert not v.validate(signed(ALICE, f"{alice}/x", tally(alice, ("QmA", 1, 0))))  # one tally per client: no tag


def found(subkey: str, rec: object, peer: str | None = None) -> FoundRecord:
    return FoundRecord(peer or subkey.split("/")[0], rec, time.time() + 60, subkey)  # type: ignore[arg-type]


def test_reading_tallies_skips_bad_ones_and_caps_them_newest_first() -> None:
    server = ServerRecord(peer_id="s", model_id=MODEL, span=BlockRange(0, 1), state="online", throughput=1.0,
                          cache_tokens_left=1, addresses=[], software_version="0")
    entries = [found("c1", tally("c1", ("QmA", 2, 0), created=5.0)),
               found("c2", tally("c2", ("QmA", 1, 1), ("QmB", 4, 0), created=9.0)),
               found("c3/tag", tally("c3", ("QmA", 1, 0))),  # tagged subkey
               found("c4", tally("c5", ("QmA", 1, 0))),  # names another client
               found("c6", tally("c6", ("QmA", 1, 0), model_id="cd" * 16)),  # another model
               found("s", server),
               found("c7", tally("c7", ("QmA", 1, 0), created=1.0))]
    skipped: Counter[str] = Counter()
    got = tallies_of(MODEL, {audits_key(MODEL): entries}, RecordLimits(max_tallies_per_model=2), skipped)
    assert [t.client for t in got] == ["c2", "c1"]
    assert skipped == {"not an audit tally of the model": 4, "over tallies-per-model limit": 1}
    assert tallies_of(MODEL, {}, RecordLimits()) == []
    assert sum_tallies(got) == {"QmA": TallySum(3, 1, 48, 2), "QmB": TallySum(4, 0, 64, 1)}


def test_a_clients_tally_lists_the_most_audited_servers_first() -> None:
    counters = AuditCounters()
    assert tally_record(counters, client="me", model_id=MODEL, now=1.0) is None
    counters.peer("QmIdle").unaudited = 5  # never checked: not in the tally
    assert tally_record(counters, client="me", model_id=MODEL, now=1.0) is None
    for i in range(MAX_TALLY_PEERS + 6):
        counters.peer(f"Qm{i:03d}").passed = i
    counters.peer("QmLiar").failed = 30
    counters.detections = 1
    before = tally_state(counters)
    rec = tally_record(counters, client="me", model_id=MODEL, now=7.0)
    assert rec is not None and len(rec.peers) == MAX_TALLY_PEERS
    assert rec.peers[0].peer_id == f"Qm{MAX_TALLY_PEERS + 5:03d}" and "QmLiar" in [p.peer_id for p in rec.peers]
    assert rec.passed == sum(range(MAX_TALLY_PEERS + 6)) and rec.failed == 30  # totals over every server
    assert (rec.client, rec.detections, rec.created) == ("me", 1, 7.0)
    assert decode_record(encode_record(rec)) == rec
    assert tally_state(counters) == before
    assert not tally_due(before, before, 100.0, 100.0 + 299.0, 600.0)  # unchanged and fresh: nothing to publish
    assert tally_due(before, before, 100.0, 100.0 + 300.0, 600.0)  # half the TTL: re-published
    assert tally_due(before, None, 0.0, 1.0, 600.0)  # never published
    counters.peer("QmLiar").positions += 1
    assert tally_state(counters) != before and tally_due(tally_state(counters), before, 100.0, 101.0, 600.0)


def test_the_document_table_and_payload_show_tallies_as_claims() -> None:
    from rich.console import Console

    from meshinfer.cli.swarm import print_tables
    from meshinfer.p2p.announce import Coverage, ModelEntry, SwarmSnapshot

    card = ModelCard(model_id=MODEL, name="tiny", family="llama", num_blocks=2, hidden_size=64, dtype="float32")
    servers = {p: ServerRecord(peer_id=p, model_id=MODEL, span=BlockRange(0, 2), state="online", throughput=1.0,
                               cache_tokens_left=1, addresses=[], software_version="0") for p in ("QmA", "QmB", "QmC")}
    snap = SwarmSnapshot([ModelEntry(card, 3)], {MODEL: Coverage(MODEL, 2, servers, [list(servers)] * 2, True)})
    tallies = [tally("c1", ("QmA", 5, 0), ("QmB", 0, 2)), tally("c2", ("QmA", 1, 0))]
    doc = snapshot_doc(snap, {}, {MODEL: (2, sum_tallies(tallies))})
    (m,) = doc["models"]
    a, b, c = m["servers"]
    assert m["audit_clients"] == 2
    assert a["audits"] == {"passed": 6, "failed": 0, "positions": 96, "clients": 2}
    assert b["audits"] == {"passed": 0, "failed": 2, "positions": 0, "clients": 1} and c["audits"] is None
    console = Console(record=True, width=250)
    print_tables(doc, console)
    text = console.export_text()
    assert "audits ✓/✗ (claimed)" in text and "6 / 0 (2 clients)" in text and "0 / 2 (1 client)" in text
    assert "unverified claims" in text

    own = AuditCounters()
    own.peer("QmB").failed = 1
    own.peer("QmC").passed = 4
    own.detections = 1
    payload = dashboard_payload(doc, gateway_audits=own.as_dict())
    pa, pb, pc = payload["models"][0]["servers"]
    assert pa["gateway_audits"] is None and pb["gateway_audits"]["failed"] == 1 and pc["gateway_audits"]["passed"] == 4
    assert payload["gateway_audits"] == {"detections": 1, "lying_verifiers": 0, "unresolved": 0, "reports": 0,
                                         "unreportable": 0, "passed": 4, "failed": 1, "servers": 2}
    assert dashboard_payload(doc)["gateway_audits"] is None  # not inside a gateway
    assert doc["models"][0]["servers"][1].get("gateway_audits") is None  # the document itself is untouched
