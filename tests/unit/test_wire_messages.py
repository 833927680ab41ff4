"""Wire messages: round trips, version checks, validation, and fuzzing (only WireError escapes)."""

from __future__ import annotations

import msgspec
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import budget
from meshinfer.errors import LimitExceededError, WireError
from meshinfer.types import BlockRange
from meshinfer.wire.codec import VersionMismatchError
from meshinfer.wire.limits import WireLimits
from meshinfer.wire.messages import (
    PROTOCOL_VERSION,
    Close,
    Error,
    ErrorCode,
    Hop,
    Open,
    Opened,
    Ping,
    Pong,
    Retarget,
    Step,
    StepResult,
    decode_message,
    encode_message,
    error_code_for,
    error_message,
)
from meshinfer.wire.tensor import encode_tensor

HIDDEN = encode_tensor(torch.randn(3, 16))

SAMPLES = [
    Open(session_id="s-1", model="m", span=BlockRange(0, 8), max_length=128, dtype="bfloat16",
         route_tail=[Hop(peer_id="QmPeer", span=BlockRange(8, 16), session_id="s-2",
                     maddrs=["/ip4/127.0.0.1/tcp/1"])]),
    Open(session_id="s-2", model="m", span=BlockRange(8, 16), max_length=128, dtype="float32", prev_peer="QmPrev"),
    Retarget(session_id="s-2", route_tail=[], prev_peer="QmNewPrev"),
    Opened(session_id="s-1", span=BlockRange(0, 8), max_length=128),
    Step(session_id="s-1", step_id=0, position=0, hidden=HIDDEN),
    StepResult(session_id="s-1", step_id=0, hidden=HIDDEN),
    Close(session_id="s-1"),
    Error(code=ErrorCode.OVERLOADED, message="busy", session_id="s-1", step_id=4),
    Ping(seq=1, payload=b"abc"),
    Pong(seq=1, payload=b"abc"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    data = encode_message(msg)  # type: ignore[arg-type]
    assert decode_message(data) == msg
    assert msgspec.msgpack.decode(data)["v"] == PROTOCOL_VERSION


def test_other_version_is_reported_as_such() -> None:
    future = msgspec.msgpack.encode({"type": "ping", "seq": 1, "v": PROTOCOL_VERSION + 1})
    with pytest.raises(VersionMismatchError, match=f"version {PROTOCOL_VERSION + 1}"):
        decode_message(future)
    unknown_type = msgspec.msgpack.encode({"type": "teleport", "v": PROTOCOL_VERSION + 1})
    with pytest.raises(VersionMismatchError):
        decode_message(unknown_type)
    assert error_code_for(VersionMismatchError("x")) == ErrorCode.VERSION_MISMATCH


@pytest.mark.parametrize(("fields", "error"), [
    ({"type": "open", "session_id": "s", "model": "m", "span": {"start": 4, "end": 2}, "max_length": 8,
      "dtype": "float16"}, "invalid block range"),
    ({"type": "open", "session_id": "s", "model": "m", "span": {"start": 0, "end": 2}, "max_length": 8,
      "dtype": "int8"}, "unsupported dtype"),
    ({"type": "open", "session_id": "", "model": "m", "span": {"start": 0, "end": 2}, "max_length": 8,
      "dtype": "float16"}, "session_id"),
    ({"type": "step", "session_id": "s", "step_id": -1, "position": 0,
      "hidden": {"dtype": "float32", "shape": [1], "data": b"\0" * 4}}, "step_id"),
    ({"type": "close"}, "session_id"),
    ({"type": "teleport"}, "teleport"),
])
def test_invalid_messages(fields: dict[str, object], error: str) -> None:
    with pytest.raises(WireError, match=error):
        decode_message(msgspec.msgpack.encode(fields))


def test_tensor_limits_apply_at_message_decode() -> None:
    limits = WireLimits(max_tokens_per_step=2)
    data = encode_message(Step(session_id="s", step_id=0, position=0, hidden=HIDDEN))  # 3 tokens
    with pytest.raises(LimitExceededError):
        decode_message(data, limits)
    assert error_code_for(LimitExceededError("x")) == ErrorCode.LIMIT_EXCEEDED


def test_route_tail_limit() -> None:
    hops = [Hop(peer_id=f"p{i}", span=BlockRange(i, i + 1), session_id=f"s{i}") for i in range(5)]
    msg = Open(session_id="s", model="m", span=BlockRange(0, 1), max_length=4, dtype="float32", route_tail=hops)
    with pytest.raises(LimitExceededError, match="route tail"):
        decode_message(encode_message(msg), WireLimits(max_route_hops=4))


def test_error_message_helper() -> None:
    err = error_message(WireError("x" * 10_000), session_id="s", step_id=2)
    assert err.code == ErrorCode.BAD_REQUEST and len(err.message) == 4096
    assert decode_message(encode_message(err)) == err
    assert error_message(RuntimeError()).code == ErrorCode.INTERNAL


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(WireError):
        encode_message({"type": "ping"})  # type: ignore[arg-type]


@budget(500)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_only_raise_wire_errors(data: bytes) -> None:
    try:
        decode_message(data)
    except WireError:
        pass


@budget(500)
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_mutated_messages_only_raise_wire_errors(msg: object, data: st.DataObject) -> None:
    raw = bytearray(encode_message(msg))  # type: ignore[arg-type]
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if action == "flip":
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            raw[pos] = data.draw(st.integers(0, 255))
        elif action == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=9))
        elif len(raw) > 1:
            del raw[pos]
    try:
        decode_message(bytes(raw))
    except WireError:
        pass


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@budget(200)
@given(st.sampled_from(["open", "opened", "step", "step_result", "close", "error", "ping", "pong", "retarget", "x"]),
       st.dictionaries(st.sampled_from(["session_id", "model", "span", "max_length", "dtype", "route_tail",
                                        "step_id", "position", "hidden", "code", "message", "seq", "payload",
                                        "v", "prev_peer"]), json_like, max_size=8))
def test_fuzz_structured_garbage_only_raises_wire_errors(tag: str, fields: dict[str, object]) -> None:
    try:
        data = msgspec.msgpack.encode({"type": tag, **fields})
    except (OverflowError, TypeError):
        return
    try:
        decode_message(data)
    except WireError:
        pass


def test_prev_peer_is_optional_and_bounded() -> None:
    old = msgspec.msgpack.encode({"type": "open", "session_id": "s", "model": "m", "span": {"start": 0, "end": 2},
                                  "max_length": 4, "dtype": "float32", "v": PROTOCOL_VERSION})
    msg = decode_message(old)  # a peer that never heard of prev_peer: nobody but the client may push
    assert isinstance(msg, Open) and msg.prev_peer is None
    retarget = decode_message(msgspec.msgpack.encode({"type": "retarget", "session_id": "s", "v": PROTOCOL_VERSION}))
    assert isinstance(retarget, Retarget) and retarget.prev_peer is None
    with pytest.raises(WireError):
        decode_message(encode_message(Open(session_id="s", model="m", span=BlockRange(0, 2), max_length=4,
                                           dtype="float32", prev_peer="x" * 129)))
