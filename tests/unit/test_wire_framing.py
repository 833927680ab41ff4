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
