"""Frames and chunks (sans-I/O): splitting, reassembly, limits checked before any body is read."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import budget
from meshinfer.errors import LimitExceededError, WireError
from meshinfer.wire.framing import (
    FLAG_LAST,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    Reassembler,
    decode_frames,
    frames_of,
    parse_header,
)
from meshinfer.wire.limits import CHUNK_BYTES, MIB, WireLimits


def test_small_payload_is_one_final_frame() -> None:
    (frame,) = frames_of(b"hello")
    assert frame == HEADER.pack(MAGIC, FLAG_LAST, 5) + b"hello"
    assert parse_header(frame[:HEADER_BYTES]) == (5, True)


def test_large_payload_is_chunked_at_1_mib_and_reassembled() -> None:
    payload = bytes(range(256)) * (5 * MIB // 256) + b"tail"  # a bit over 5 MiB
    frames = list(frames_of(payload))
    assert len(frames) == 6
    assert all(len(f) - HEADER_BYTES <= CHUNK_BYTES for f in frames)
    assert [parse_header(f[:HEADER_BYTES])[1] for f in frames] == [False] * 5 + [True]
    assert decode_frames(b"".join(frames)) == [payload]


def test_exact_multiple_of_the_chunk_size() -> None:
    frames = list(frames_of(b"x" * (2 * CHUNK_BYTES)))
    assert len(frames) == 2 and parse_header(frames[-1][:HEADER_BYTES]) == (CHUNK_BYTES, True)


def test_empty_payload_is_refused() -> None:
    with pytest.raises(WireError):
        list(frames_of(b""))


@pytest.mark.parametrize(("header", "error", "kind"), [
    (HEADER.pack(MAGIC, FLAG_LAST, 2**31), "exceeds the limit", LimitExceededError),
    (HEADER.pack(MAGIC, 0, 2**32 - 1), "exceeds the limit", LimitExceededError),
    (HEADER.pack(0x00, FLAG_LAST, 5), "bad frame magic", WireError),
    (HEADER.pack(MAGIC, 0x80, 5), "unknown frame flags", WireError),
    (HEADER.pack(MAGIC, FLAG_LAST, 0), "empty frame", WireError),
    (b"\xe7\x01", "truncated", WireError),
])
def test_bad_headers(header: bytes, error: str, kind: type[Exception]) -> None:
    with pytest.raises(kind, match=error):
        parse_header(header)


def test_2_gib_header_is_refused_before_any_body_exists() -> None:
    # Only the 6 header bytes exist: the refusal cannot have come from reading or allocating a body.
    with pytest.raises(LimitExceededError):
        decode_frames(HEADER.pack(MAGIC, FLAG_LAST, 2 * 1024 * MIB))


def test_message_size_limit_is_checked_before_each_body() -> None:
    limits = WireLimits(max_message_bytes=2 * MIB)
    asm = Reassembler(limits)
    asm.reserve(MIB)
    asm.add(b"x" * MIB)
    asm.reserve(MIB)
    asm.add(b"x" * MIB)
    with pytest.raises(LimitExceededError, match="message of more than"):
        asm.reserve(1)
    data = b"".join(frames_of(b"y" * (3 * MIB)))
    with pytest.raises(LimitExceededError):
        decode_frames(data, limits)


def test_truncated_stream_is_an_error() -> None:
    data = b"".join(frames_of(b"z" * (CHUNK_BYTES + 10)))
    with pytest.raises(WireError, match="truncated frame body"):
        decode_frames(data[:-1])
    with pytest.raises(WireError, match="middle of a message"):
        decode_frames(data[: HEADER_BYTES + CHUNK_BYTES])


def test_limits_validate_themselves() -> None:
    with pytest.raises(Exception, match="max_frame_bytes"):
        WireLimits(max_frame_bytes=1024)


@budget(300)
@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=5), st.integers(1, 64))
def test_round_trip_any_chunk_size(payloads: list[bytes], chunk: int) -> None:
    data = b"".join(f for p in payloads for f in frames_of(p, chunk))
    assert decode_frames(data) == payloads


@budget(500)
@given(st.binary(max_size=600))
def test_fuzz_decode_frames_only_raises_wire_errors(data: bytes) -> None:
    small = WireLimits(max_frame_bytes=CHUNK_BYTES, max_message_bytes=CHUNK_BYTES)
    try:
        decode_frames(data, small)
    except WireError:
        pass


def test_many_tiny_frames_reassemble_exactly_into_one_buffer() -> None:
    payload = bytes(range(256)) * 40
    data = b"".join(frames_of(payload, 1))  # 10,240 one-byte frames
    assert decode_frames(data) == [payload]
    asm = Reassembler()
    asm.add(b"ab")
    assert asm.take() == b"ab" and asm.pending == 0  # a one-frame message is returned as is
    asm.add(b"a")
    asm.add(b"b")
    assert asm.take() == b"ab" and asm.take() == b""


def test_add_without_reserve_still_enforces_the_message_limit() -> None:
    asm = Reassembler(WireLimits(max_message_bytes=MIB))
    asm.add(b"x" * MIB)
    with pytest.raises(LimitExceededError):
        asm.add(b"x")


def test_limits_for_model_bound_messages_by_the_largest_step() -> None:
    from meshinfer.wire.limits import DEFAULT_LIMITS, MESSAGE_OVERHEAD_BYTES, limits_for_model

    tiny = limits_for_model(128, 2048)  # the demo model: 1 MiB of float32 hidden states at most
    assert tiny.max_tensor_bytes == 2048 * 128 * 4
    assert tiny.max_message_bytes == 2048 * 128 * 4 + MESSAGE_OVERHEAD_BYTES
    assert limits_for_model(8, 8).max_message_bytes >= CHUNK_BYTES  # never below one frame
    big = limits_for_model(16384, 4096)  # never above the base limits
    assert big.max_message_bytes == DEFAULT_LIMITS.max_message_bytes
    assert big.max_tensor_bytes == DEFAULT_LIMITS.max_tensor_bytes
    with pytest.raises(Exception, match="must be > 0"):
        limits_for_model(0, 8)


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    """Headers declaring any length (oversized ones included), bodies cut short, flags and magic bent."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 6))):
        declared = draw(st.one_of(st.integers(0, 64), st.integers(CHUNK_BYTES - 2, CHUNK_BYTES + 2),
                                  st.integers(0, 2**32 - 1)))
        magic = draw(st.sampled_from([MAGIC, MAGIC, MAGIC, 0x00, 0xE6]))
        flags = draw(st.sampled_from([0, FLAG_LAST, FLAG_LAST, 0x02, 0xFF]))
        out += HEADER.pack(magic, flags, declared)
        body = min(declared, draw(st.integers(0, 80)))  # usually fewer bytes than declared: truncated
        out += draw(st.binary(min_size=body, max_size=body))
    cut = draw(st.integers(0, len(out)))
    return bytes(out[:cut] if draw(st.booleans()) else out)


@budget(500)
@given(hostile_frames())
def test_fuzz_hostile_headers_and_truncated_frames(data: bytes) -> None:
    small = WireLimits(max_frame_bytes=CHUNK_BYTES, max_message_bytes=CHUNK_BYTES + 64)
    try:
        out = decode_frames(data, small)
    except WireError:
        return
    assert sum(len(p) for p in out) <= len(data)  # nothing was invented, nothing allocated beyond the input
