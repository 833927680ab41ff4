"""The piece protocol's messages and the seed record: typed, versioned, limited, never a crash."""

from __future__ import annotations

import msgspec
import pytest

from meshinfer.errors import LimitExceededError, WireError
from meshinfer.types import BlockRange
from meshinfer.wire.codec import VersionMismatchError
from meshinfer.wire.pieces import (
    MAX_PIECE_BYTES,
    PIECE_ERROR_CODES,
    GetManifest,
    GetPiece,
    ManifestData,
    PieceData,
    PieceError,
    PieceErrorCode,
    decode_piece_message,
    encode_piece_message,
    piece_error_for,
)
from meshinfer.wire.records import ModelCard, SeedRecord, decode_record, encode_record, seed_key

MID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("msg", [
    GetManifest(model_id=MID),
    ManifestData(model_id=MID, data=b'{"format": "meshinfer-manifest"}'),
    GetPiece(model_id=MID, kind="tensor", name="model.layers.0.mlp.up_proj.weight", index=3),
    GetPiece(model_id=MID, kind="file", name="tokenizer.json", index=0),
    PieceData(model_id=MID, kind="tensor", name="lm_head.weight", index=0, data=bytes(range(256)) * 4),
    PieceError(code=PieceErrorCode.UNKNOWN_PIECE, message="no such piece"),
])
def test_round_trip(msg: object) -> None:
    assert decode_piece_message(encode_piece_message(msg)) == msg  # type: ignore[arg-type]


def _raw(**fields: object) -> bytes:
    return msgspec.msgpack.encode(fields)


@pytest.mark.parametrize(("payload", "error"), [
    (b"", WireError),
    (b"\xc1\xc1", WireError),
    (_raw(type="get_piece", model_id="short", kind="tensor", name="x", index=0), WireError),
    (_raw(type="get_piece", model_id=MID.upper(), kind="tensor", name="x", index=0), WireError),
    (_raw(type="get_piece", model_id=MID, kind="blob", name="x", index=0), WireError),
    (_raw(type="get_piece", model_id=MID, kind="tensor", name="", index=0), WireError),
    (_raw(type="get_piece", model_id=MID, kind="tensor", name="x" * 513, index=0), LimitExceededError),
    (_raw(type="get_piece", model_id=MID, kind="tensor", name="x", index=-1), WireError),
    (_raw(type="get_piece", model_id=MID, kind="tensor", name="x", index=2**40), WireError),
    (_raw(type="piece", model_id=MID, kind="file", name="x", index=0, data=b"\0" * (MAX_PIECE_BYTES + 1)),
     LimitExceededError),
    (_raw(type="launch_missiles", model_id=MID), WireError),
    (_raw(type="get_manifest", model_id=MID, v=2), VersionMismatchError),
    (_raw(type="something_new", v=7), VersionMismatchError),
])
def test_malformed_messages_raise_wire_errors(payload: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_piece_message(payload)


@pytest.mark.parametrize(("err", "code"), [
    (VersionMismatchError("v2"), PieceErrorCode.VERSION_MISMATCH),
    (LimitExceededError("big"), PieceErrorCode.LIMIT_EXCEEDED),
    (WireError("bad"), PieceErrorCode.BAD_REQUEST),
    (RuntimeError("boom"), PieceErrorCode.INTERNAL),
])
def test_error_codes(err: Exception, code: str) -> None:
    reply = piece_error_for(err)
    assert reply.code == code and reply.code in PIECE_ERROR_CODES and reply.message


def test_not_a_message() -> None:
    with pytest.raises(WireError):
        encode_piece_message("hello")  # type: ignore[arg-type]


SEED = SeedRecord(peer_id="QmPeer", model_id=MID, num_blocks=8, blocks=[BlockRange(0, 2), BlockRange(5, 8)],
                  client_part=True, files=True, addresses=["/ip4/127.0.0.1/tcp/1"],
                  direct_addresses=["/ip4/127.0.0.1/tcp/2"], software_version="0.1.0")


def test_seed_record_round_trip_and_key() -> None:
    back = decode_record(encode_record(SEED))
    assert back == SEED and isinstance(back, SeedRecord)
    assert [b for b in range(8) if back.has_block(b)] == [0, 1, 5, 6, 7]
    assert seed_key(MID) == f"seed:{MID}"
    card = ModelCard(model_id=MID, name="m", family="llama", num_blocks=8, hidden_size=64, dtype="float32")
    assert decode_record(encode_record(card)) == card  # older record types are unchanged


@pytest.mark.parametrize("changes", [
    {"blocks": [{"start": 6, "end": 9}]},
    {"blocks": [{"start": 3, "end": 3}]},
    {"num_blocks": -1},
    {"addresses": ["x"] * 17},
    {"peer_id": ""},
])
def test_invalid_seed_records(changes: dict[str, object]) -> None:
    raw = msgspec.to_builtins(SEED)
    raw.update(changes)
    with pytest.raises(WireError):
        decode_record(msgspec.msgpack.encode(raw))
