"""Bounded DHT reads (issue 17): quotas per signer, per key, per read, and cards that size nothing.

Pure logic on hand-made ``FoundRecord``s and a fake hivemind DHT (no network): ``p2p.directory``'s
``models_of``/``coverage_of``/``read_swarm`` and ``PeerNode.get_many``'s per-key and per-signer caps.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import budget
from meshinfer.errors import ConfigError, UsageError
from meshinfer.p2p.directory import coverage_of, models_of, read_coverage, read_swarm
from meshinfer.p2p.node import FoundRecord, NodeSettings, PeerNode
from meshinfer.types import BlockRange
from meshinfer.wire.limits import DEFAULT_RECORD_LIMITS, MAX_MODEL_BLOCKS, RecordLimits
from meshinfer.wire.records import MODELS_KEY, ModelCard, ServerRecord, encode_record, servers_key

REAL = "0" * 32


def mid(i: int) -> str:
    return f"{i:032x}"


def card(model_id: str, num_blocks: int = 4) -> ModelCard:
    return ModelCard(model_id=model_id, name="m", family="llama", num_blocks=num_blocks, hidden_size=64,
                     dtype="float32")


def server(peer: str, model_id: str, span: tuple[int, int]) -> ServerRecord:
    return ServerRecord(peer_id=peer, model_id=model_id, span=BlockRange(*span), state="online", throughput=1.0,
                        cache_tokens_left=10, addresses=[], software_version="0")


def entry(owner: str, record: Any, tag: str | None = None) -> FoundRecord:
    return FoundRecord(owner, record, time.time() + 60, owner if tag is None else f"{owner}/{tag}")


def test_one_signer_cannot_fill_the_directory() -> None:
    found = [entry("QmHonest", card(REAL), REAL)]
    found += [entry("QmEvil", card(mid(i + 1), MAX_MODEL_BLOCKS), mid(i + 1)) for i in range(300)]
    skipped: Counter[str] = Counter()
    models = models_of(found, DEFAULT_RECORD_LIMITS, skipped)
    assert REAL in {m.card.model_id for m in models}
    assert len(models) == 1 + DEFAULT_RECORD_LIMITS.max_cards_per_signer
    assert skipped["over per-signer card quota"] == 300 - DEFAULT_RECORD_LIMITS.max_cards_per_signer


def test_models_per_read_keep_the_most_announced() -> None:
    limits = RecordLimits(max_models_per_read=2, max_cards_per_signer=1)
    found = [entry(f"QmSybil{i}", card(mid(100 + i)), mid(100 + i)) for i in range(10)]
    found += [entry(f"QmServer{i}", card(REAL), REAL) for i in range(3)]
    skipped: Counter[str] = Counter()
    models = models_of(found, limits, skipped)
    assert [m.card.model_id for m in models] == sorted([REAL, mid(100)]) and skipped["over models-per-read limit"] == 9
    assert {m.card.model_id: m.announced_by for m in models}[REAL] == 3


def test_a_card_under_another_tag_is_not_a_directory_entry() -> None:
    skipped: Counter[str] = Counter()
    assert models_of([entry("QmA", card(REAL), "other")], DEFAULT_RECORD_LIMITS, skipped) == []
    assert skipped["not a directory entry"] == 1


def test_coverage_believes_only_records_that_fit_the_card() -> None:
    key = servers_key(REAL)
    found = {key: [entry("QmA", server("QmA", REAL, (0, 2))), entry("QmB", server("QmB", REAL, (2, 4))),
                   entry("QmC", server("QmC", REAL, (0, 4000))),  # beyond the card's 4 blocks
                   entry("QmD", server("QmD", mid(9), (0, 4))),  # another model
                   entry("QmE", server("QmE", REAL, (0, 4)), "tag")]}  # not its own subkey
    cov = coverage_of(REAL, 4, found)
    assert cov.complete and sorted(cov.servers) == ["QmA", "QmB"] and cov.counts() == [1, 1, 1, 1]
    assert sum(cov.skipped.values()) == 3
    assert not coverage_of(REAL, 4, {}).complete


def test_read_coverage_refuses_block_counts_beyond_the_bound() -> None:
    with pytest.raises(ConfigError, match="MAX_MODEL_BLOCKS"):
        asyncio.run(read_coverage(None, REAL, MAX_MODEL_BLOCKS + 1))  # type: ignore[arg-type]


# --- PeerNode.get_many on a fake hivemind DHT --------------------------------------------------------


class FakeDHT:
    def __init__(self, values: dict[str, dict[str, bytes]]) -> None:
        self.values = values
        self.asked: list[list[str]] = []

    async def get_many(self, keys: list[str], **_: Any) -> dict[str, asyncio.Future[object]]:
        self.asked.append(list(keys))
        out = {}
        for key in keys:
            fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            exp = time.time() + 60
            fut.set_result(SimpleNamespace(value={s: SimpleNamespace(value=v, expiration_time=exp)
                                                  for s, v in self.values.get(key, {}).items()}))
            out[key] = fut
        return out


def node_with(values: dict[str, dict[str, bytes]], limits: RecordLimits = DEFAULT_RECORD_LIMITS) -> PeerNode:
    return PeerNode(identity=None, maddrs=[], settings=NodeSettings(), _p2p=None,  # type: ignore[arg-type]
                    _dht=FakeDHT(values), record_limits=limits)  # type: ignore[arg-type]


def test_get_many_caps_records_per_signer_and_per_key() -> None:
    values = {MODELS_KEY: {f"QmEvil/{mid(i)}": encode_record(card(mid(i))) for i in range(500)}}
    values[MODELS_KEY].update({f"QmP{i:03d}/{REAL}": encode_record(card(REAL)) for i in range(20)})
    values[MODELS_KEY]["QmBad/x"] = b"\xc1" * 40_000
    node = node_with(values, RecordLimits(max_records_per_key=16, max_records_per_signer=8))
    found = asyncio.run(node.get_many([MODELS_KEY]))[MODELS_KEY]
    owners = Counter(f.peer_id for f in found)
    assert len(found) == 16 and owners["QmEvil"] == 8  # sorted subkeys: QmBad, QmEvil..., QmP000...
    assert node.skipped_records["over per-signer limit"] == 492 and node.skipped_records["invalid"] == 1
    assert node.skipped_records["over per-key limit"] == 20 - 8


def test_get_many_refuses_too_many_keys() -> None:
    node = node_with({}, RecordLimits(max_keys_per_read=10))
    with pytest.raises(UsageError, match="limit max_keys_per_read 10"):
        asyncio.run(node.get_many([f"k{i}" for i in range(11)]))


def test_read_swarm_reads_one_key_per_kept_model_whatever_the_cards_claim() -> None:
    values: dict[str, dict[str, bytes]] = {MODELS_KEY: {f"QmHonest/{REAL}": encode_record(card(REAL))}}
    values[MODELS_KEY].update({f"QmEvil/{mid(i + 1)}": encode_record(card(mid(i + 1), MAX_MODEL_BLOCKS))
                               for i in range(300)})
    values[servers_key(REAL)] = {"QmHonest": encode_record(server("QmHonest", REAL, (0, 4)))}
    node = node_with(values)
    snap = asyncio.run(read_swarm(node))
    asked = node._dht.asked  # type: ignore[attr-defined]
    assert asked[0] == [MODELS_KEY] and len(asked) == 2
    assert len(asked[1]) == 1 + DEFAULT_RECORD_LIMITS.max_cards_per_signer
    assert all(k.startswith("servers:") for k in asked[1])
    assert snap.complete and snap.coverage[REAL].counts() == [1, 1, 1, 1]
    limits = DEFAULT_RECORD_LIMITS
    assert node.skipped_records["over per-signer limit"] == 300 - limits.max_records_per_signer  # not decoded
    assert snap.skipped["over per-signer card quota"] == limits.max_records_per_signer - limits.max_cards_per_signer


def test_cards_are_believed_only_from_peers_that_serve_the_model() -> None:
    limits = RecordLimits(max_models_per_read=2)
    values: dict[str, dict[str, bytes]] = {MODELS_KEY: {f"QmSybil{i}/{mid(i + 1)}": encode_record(card(mid(i + 1)))
                                                        for i in range(3)}}
    values[MODELS_KEY][f"QmHonest/{mid(99)}"] = encode_record(card(mid(99)))
    values[MODELS_KEY][f"QmLiar/{mid(99)}"] = encode_record(card(mid(99), 4000))  # outvotes nobody: serves nothing
    values[servers_key(mid(99))] = {"QmHonest": encode_record(server("QmHonest", mid(99), (0, 4)))}
    snap = asyncio.run(read_swarm(node_with(values, limits)))
    assert [(m.card.model_id, m.card.num_blocks, m.announced_by) for m in snap.models] == [(mid(99), 4, 1)]
    assert snap.skipped["card of a peer that does not serve the model"] == 4


def test_listed_models_fit_a_block_budget_smallest_first() -> None:
    limits = RecordLimits(max_listed_blocks=MAX_MODEL_BLOCKS + 8)
    values: dict[str, dict[str, bytes]] = {MODELS_KEY: {}}
    for i, blocks in enumerate([MAX_MODEL_BLOCKS, MAX_MODEL_BLOCKS, 8]):
        values[MODELS_KEY][f"QmP{i}/{mid(i)}"] = encode_record(card(mid(i), blocks))
        values[servers_key(mid(i))] = {f"QmP{i}": encode_record(server(f"QmP{i}", mid(i), (0, 4)))}
    snap = asyncio.run(read_swarm(node_with(values, limits)))
    assert [m.card.model_id for m in snap.models] == [mid(0), mid(2)]
    assert snap.skipped["over listed-blocks limit"] == 1


# --- fuzz: what a reader takes from hostile storers, and the envelope check every storer runs -------------

_records = st.sampled_from([card(REAL), card(mid(7)), server("QmA", REAL, (0, 4))])
_payloads = st.one_of(st.binary(max_size=200), st.builds(encode_record, _records),
                      st.builds(lambda n: b"\x00" * n, st.integers(30_000, 70_000)))


@budget(60)
@given(st.dictionaries(st.builds(lambda o, t: o if t is None else f"{o}/{t}", st.sampled_from(["QmA", "QmB", ""]),
                                 st.none() | st.text(max_size=6)), _payloads, max_size=40))
def test_fuzz_get_many_decoding_stays_within_the_quotas(values: dict[str, bytes]) -> None:
    limits = RecordLimits(max_records_per_key=5, max_records_per_signer=3)
    node = node_with({"k": values}, limits)
    found = asyncio.run(node.get_many(["k"]))["k"]
    assert len(found) <= 5 and max(Counter(f.peer_id for f in found).values(), default=0) <= 3
    assert sum(node.skipped_records.values()) + len(found) <= len(values) + 1


@budget(60)
@given(st.binary(max_size=300) | st.builds(lambda n: b"\x93" + b"\x00" * n, st.integers(36_000, 80_000)),
       st.binary(max_size=40))
def test_fuzz_the_envelope_check_never_raises(value: bytes, subkey: bytes) -> None:
    from hivemind.dht.validation import DHTRecord

    from meshinfer.p2p.signing import MAX_ENVELOPE_BYTES, SignedRecordValidator

    ok = SignedRecordValidator(None).validate(DHTRecord(b"key", subkey, value, time.time() + 60))
    assert ok is False or len(value) <= MAX_ENVELOPE_BYTES
