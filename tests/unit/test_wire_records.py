"""DHT record schemas: round trips, keys, validation, bounds (issue 17), fuzzing (only WireError escapes)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import budget
from meshinfer.errors import LimitExceededError, WireError
from meshinfer.models.fingerprint import FINGERPRINT_HEX_CHARS
from meshinfer.types import BlockRange
from meshinfer.wire.limits import MAX_MODEL_BLOCKS, MAX_RECORD_BYTES
from meshinfer.wire.records import (
    MODEL_ID_HEX_CHARS,
    MODELS_KEY,
    RECORD_VERSION,
    ModelCard,
    SeedRecord,
    ServerRecord,
    block_key,
    check_server_record,
    decode_record,
    encode_record,
    model_key,
    servers_key,
)

MID = "abc123" + "0" * 26
CARD = ModelCard(model_id=MID, name="tiny/llama", family="llama", num_blocks=4, hidden_size=64,
                 dtype="bfloat16", manifest_hash=MID)
SERVER = ServerRecord(peer_id="QmPeer", model_id=MID, span=BlockRange(0, 2), state="online",
                      throughput=123.5, cache_tokens_left=8192, addresses=["/ip4/127.0.0.1/tcp/5/p2p/QmPeer"],
                      software_version="0.1.0", public_name="alice")
SEED = SeedRecord(peer_id="QmPeer", model_id=MID, num_blocks=8, blocks=[BlockRange(0, 2), BlockRange(5, 8)],
                  client_part=True, files=True, addresses=["/ip4/127.0.0.1/tcp/5"])


def test_keys() -> None:
    assert model_key("abc") == "model:abc"
    assert block_key("abc", 7) == "block:abc:7"
    assert servers_key("abc") == "servers:abc"
    assert MODELS_KEY == "models"
    assert MODEL_ID_HEX_CHARS == FINGERPRINT_HEX_CHARS  # wire cannot import models: one constant, checked here


@pytest.mark.parametrize("record", [CARD, SERVER])
def test_round_trip(record: object) -> None:
    assert decode_record(encode_record(record)) == record  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "error"), [
    ({"state": "sleeping"}, "state"),
    ({"throughput": -1.0}, "throughput"),
    ({"cache_tokens_left": -5}, "cache_tokens_left"),
    ({"span": {"start": 3, "end": 3}}, "invalid block range"),
    ({"peer_id": ""}, "peer_id"),
    ({"v": RECORD_VERSION + 1}, "version"),
    ({"addresses": ["x"] * 17}, "addresses"),
])
def test_invalid_server_records(changes: dict[str, object], error: str) -> None:
    fields = msgspec.to_builtins(SERVER)
    fields.update(changes)
    with pytest.raises(WireError, match=error):
        decode_record(msgspec.msgpack.encode(fields))


def test_invalid_model_card() -> None:
    fields = msgspec.to_builtins(CARD)
    fields["dtype"] = "int4"
    with pytest.raises(WireError, match="dtype"):
        decode_record(msgspec.msgpack.encode(fields))
    fields = msgspec.to_builtins(CARD)
    fields["num_blocks"] = 0
    with pytest.raises(WireError, match="num_blocks"):
        decode_record(msgspec.msgpack.encode(fields))


def test_span_must_fit_the_model() -> None:
    check_server_record(SERVER, num_blocks=2)
    with pytest.raises(WireError, match="exceeds"):
        check_server_record(SERVER, num_blocks=1)


def test_encode_refuses_other_types() -> None:
    with pytest.raises(WireError):
        encode_record("nope")  # type: ignore[arg-type]


@budget(500)
@given(st.binary(max_size=1024))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        decode_record(data)
    except WireError:
        pass


@budget(300)
@given(st.sampled_from([CARD, SERVER, SEED]),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_mutated_records(record: object, edits: list[tuple[int, int]]) -> None:
    raw = bytearray(encode_record(record))  # type: ignore[arg-type]
    for pos, value in edits:
        raw[pos % len(raw)] = value
    try:
        back = decode_record(bytes(raw))
    except WireError:
        return
    _check_bounds(back)


# ---------------------------------------------------------------------------------------------------
# Load fields (issue 6): optional, so records written before they existed stay valid, and back again.


class _ServerRecordBeforeLoad(msgspec.Struct, frozen=True, tag_field="type", tag="server"):
    """``ServerRecord`` as it was before the load fields: what an older peer reads with."""

    peer_id: str
    model_id: str
    span: BlockRange
    state: str
    throughput: float
    cache_tokens_left: int
    addresses: list[str]
    software_version: str
    public_name: str | None = None
    direct_addresses: list[str] = []
    protocol_version: int = 1
    v: int = RECORD_VERSION


LOADED = msgspec.structs.replace(SERVER, sessions=9, queued_steps=3, batch_throughput=812.25, batch_size=8)


def test_load_fields_default_to_zero() -> None:
    assert (SERVER.sessions, SERVER.queued_steps, SERVER.batch_throughput, SERVER.batch_size) == (0, 0, 0.0, 0)


def test_load_fields_round_trip() -> None:
    back = decode_record(encode_record(LOADED))
    assert isinstance(back, ServerRecord) and back == LOADED
    assert (back.sessions, back.queued_steps, back.batch_throughput, back.batch_size) == (9, 3, 812.25, 8)


def test_a_record_without_load_fields_still_decodes() -> None:
    fields = msgspec.to_builtins(LOADED)
    for name in ("sessions", "queued_steps", "batch_throughput", "batch_size"):
        del fields[name]
    back = decode_record(msgspec.msgpack.encode(fields))
    assert back == SERVER


def test_an_older_reader_ignores_load_fields() -> None:
    old = msgspec.msgpack.decode(encode_record(LOADED), type=_ServerRecordBeforeLoad)
    assert old.peer_id == LOADED.peer_id and old.span == LOADED.span
    assert old.cache_tokens_left == LOADED.cache_tokens_left and old.throughput == LOADED.throughput


@pytest.mark.parametrize(("changes", "error"), [
    ({"sessions": -1}, "sessions"),
    ({"queued_steps": -2}, "queued_steps"),
    ({"batch_throughput": -0.5}, "batch_throughput"),
    ({"batch_throughput": 1e13}, "batch_throughput"),
    ({"batch_size": -1}, "batch_size"),
    ({"batch_size": 4097}, "batch_size"),
    ({"sessions": "many"}, "sessions"),
])
def test_invalid_load_fields(changes: dict[str, object], error: str) -> None:
    fields = msgspec.to_builtins(LOADED)
    fields.update(changes)
    with pytest.raises(WireError, match=error):
        decode_record(msgspec.msgpack.encode(fields))


@pytest.mark.parametrize("batch_size", [0, 1, 4096])
def test_batch_size_bounds_accepted(batch_size: int) -> None:
    record = msgspec.structs.replace(LOADED, batch_size=batch_size)
    assert decode_record(encode_record(record)) == record


# ---------------------------------------------------------------------------------------------------
# Bounds (issue 17): a total size per record, checked before decoding; a block count per model; card ids.

LONG, ADDR = "x" * 256, "a" * 512


def _raw(record: object, **changes: object) -> bytes:
    fields = msgspec.to_builtins(record)
    fields.update(changes)
    return msgspec.msgpack.encode(fields)


def test_the_largest_valid_records_fit_the_size_limit() -> None:
    big = 2**53
    server = ServerRecord(peer_id=LONG, model_id=LONG, span=BlockRange(MAX_MODEL_BLOCKS - 1, MAX_MODEL_BLOCKS),
                          state="draining", throughput=1e12, cache_tokens_left=big, addresses=[ADDR] * 16,
                          software_version=LONG, public_name=LONG, direct_addresses=[ADDR] * 8,
                          protocol_version=2**62, sessions=big, queued_steps=big, batch_throughput=1e12,
                          batch_size=4096, quant="q" * 16, weight_bytes=big)
    seed = SeedRecord(peer_id=LONG, model_id=LONG, num_blocks=MAX_MODEL_BLOCKS,
                      blocks=[BlockRange(MAX_MODEL_BLOCKS - 1, MAX_MODEL_BLOCKS)] * 1024, client_part=True,
                      files=True, addresses=[ADDR] * 16, direct_addresses=[ADDR] * 8, software_version=LONG)
    card = msgspec.structs.replace(CARD, name=LONG, family=LONG, num_blocks=MAX_MODEL_BLOCKS, hidden_size=1_000_000)
    for record in (server, seed, card):
        assert decode_record(encode_record(record)) == record


def test_oversized_payloads_are_refused_before_decoding() -> None:
    padded = _raw(CARD, padding="p" * MAX_RECORD_BYTES)  # unknown fields are ignored, but not past the limit
    with pytest.raises(LimitExceededError, match=f"limit MAX_RECORD_BYTES {MAX_RECORD_BYTES}"):
        decode_record(padded)
    with pytest.raises(LimitExceededError, match="MAX_RECORD_BYTES"):
        decode_record(b"\xc1" * (MAX_RECORD_BYTES + 1))  # not even looked at
    with pytest.raises(LimitExceededError, match="MAX_RECORD_BYTES"):
        encode_record(msgspec.structs.replace(SEED, addresses=["a" * 40_000]))  # constructors do not validate


@pytest.mark.parametrize(("record", "changes", "error"), [
    (CARD, {"num_blocks": MAX_MODEL_BLOCKS + 1}, "num_blocks"),
    (CARD, {"num_blocks": 100_000}, "num_blocks"),
    (CARD, {"model_id": "abc123"}, "not a model id"),
    (CARD, {"model_id": MID.upper()}, "not a model id"),
    (CARD, {"model_id": MID + "0"}, "not a model id"),
    (CARD, {"manifest_hash": "f" * 32}, "names manifest"),
    (CARD, {"dtype": "d" * 33}, "dtype"),
    (CARD, {"hidden_size": 10**7}, "hidden_size"),
    (SERVER, {"span": {"start": 0, "end": MAX_MODEL_BLOCKS + 1}}, "MAX_MODEL_BLOCKS"),
    (SERVER, {"span": {"start": 0, "end": 2**64 - 1}}, "MAX_MODEL_BLOCKS"),
    (SERVER, {"addresses": [ADDR + "a"]}, "addresses"),
    (SEED, {"num_blocks": MAX_MODEL_BLOCKS + 1}, "num_blocks"),
    (SEED, {"blocks": [{"start": 0, "end": 9}]}, "beyond"),
    (SEED, {"blocks": [{"start": 0, "end": 1}] * 1025}, "blocks"),
])
def test_out_of_bound_records_are_refused(record: object, changes: dict[str, object], error: str) -> None:
    with pytest.raises(WireError, match=error):
        decode_record(_raw(record, **changes))


def test_a_card_without_manifest_hash_and_a_seed_round_trip() -> None:
    for record in (msgspec.structs.replace(CARD, manifest_hash=None), SEED):
        assert decode_record(encode_record(record)) == record


def _check_bounds(record: object) -> None:
    """What every decoded record satisfies, whatever the input was."""
    assert len(encode_record(record)) <= MAX_RECORD_BYTES  # type: ignore[arg-type]
    if isinstance(record, ModelCard):
        assert 1 <= record.num_blocks <= MAX_MODEL_BLOCKS and len(record.model_id) == MODEL_ID_HEX_CHARS
    if isinstance(record, ServerRecord):
        assert record.span.end <= MAX_MODEL_BLOCKS
    if isinstance(record, SeedRecord):
        assert record.num_blocks <= MAX_MODEL_BLOCKS and all(r.end <= record.num_blocks for r in record.blocks)


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=40),
                  st.binary(max_size=40))
_nested = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                          inner, max_size=4),
                       max_leaves=20)
_huge = st.one_of(st.integers(MAX_MODEL_BLOCKS, 2**64 - 1), st.integers(-(2**63), -1),
                  st.builds(lambda n, c: c * n, st.integers(200, 40_000), st.sampled_from(["a", "0", "/"])),
                  st.builds(lambda n: [ADDR] * n, st.integers(1, 80)),
                  st.builds(lambda n: [{"start": 0, "end": 1}] * n, st.integers(1, 2000)))


@budget(100)
@given(st.sampled_from([CARD, SERVER, SEED]), st.data())
def test_fuzz_out_of_bound_and_nested_fields(record: object, data: st.DataObject) -> None:
    fields = msgspec.to_builtins(record)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from([*fields, "extra"]))
        fields[name] = data.draw(st.one_of(_huge, _nested))
    try:
        back = decode_record(msgspec.msgpack.encode(fields))
    except WireError:
        return
    _check_bounds(back)


@budget(100)
@given(st.integers(MAX_RECORD_BYTES - 64, 4 * MAX_RECORD_BYTES), st.sampled_from([CARD, SERVER, SEED]))
def test_fuzz_oversized_payloads(size: int, record: object) -> None:
    raw = _raw(record, padding=b"\x00" * size)
    try:
        back = decode_record(raw)
    except LimitExceededError:
        assert len(raw) > MAX_RECORD_BYTES
        return
    assert len(raw) <= MAX_RECORD_BYTES
    _check_bounds(back)
