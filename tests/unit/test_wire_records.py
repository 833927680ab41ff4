"""DHT record schemas: round trips, keys, validation, fuzzing (only WireError escapes)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import budget
from meshinfer.errors import WireError
from meshinfer.types import BlockRange
from meshinfer.wire.records import (
    MODELS_KEY,
    RECORD_VERSION,
    ModelCard,
    ServerRecord,
    block_key,
    check_server_record,
    decode_record,
    encode_record,
    model_key,
)

CARD = ModelCard(model_id="abc123", name="tiny/llama", family="llama", num_blocks=4, hidden_size=64,
                 dtype="bfloat16", manifest_hash="abc123")
SERVER = ServerRecord(peer_id="QmPeer", model_id="abc123", span=BlockRange(0, 2), state="online",
                      throughput=123.5, cache_tokens_left=8192, addresses=["/ip4/127.0.0.1/tcp/5/p2p/QmPeer"],
                      software_version="0.1.0", public_name="alice")


def test_keys() -> None:
    assert model_key("abc") == "model:abc"
    assert block_key("abc", 7) == "block:abc:7"
    assert MODELS_KEY == "models"


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
@given(st.sampled_from([CARD, SERVER]), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                   min_size=1, max_size=6))
def test_fuzz_mutated_records(record: object, edits: list[tuple[int, int]]) -> None:
    raw = bytearray(encode_record(record))  # type: ignore[arg-type]
    for pos, value in edits:
        raw[pos % len(raw)] = value
    try:
        decode_record(bytes(raw))
    except WireError:
        pass


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
