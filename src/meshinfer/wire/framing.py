"""Frames: how message payloads travel over a raw byte stream (sans-I/O).

Contract: a message payload is sent as one or more frames, each a 6-byte header followed by at most
``CHUNK_BYTES`` of body::

    header = MAGIC (1 byte, 0xE7) | flags (1 byte, bit 0 = last frame of the message)
             | body length (4 bytes, big-endian, 1 .. max_frame_bytes)

``frames_of(payload)`` yields the frames of one payload; ``parse_header`` validates a header against
``WireLimits`` before the caller reads (and so allocates) any body; ``Reassembler`` joins bodies and
refuses a message whose total would exceed ``max_message_bytes`` before the body is read; it holds a
message in progress in one buffer, so a message cut into many tiny frames costs no more memory than its
bytes (no per-frame object). Errors are
``WireError`` / ``LimitExceededError``. No I/O here: ``meshinfer.p2p.stream`` drives it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from meshinfer.errors import LimitExceededError, WireError
from meshinfer.wire.limits import CHUNK_BYTES, DEFAULT_LIMITS, WireLimits

MAGIC: Final = 0xE7
FLAG_LAST: Final = 0x01
HEADER = struct.Struct(">BBI")
HEADER_BYTES: Final = HEADER.size  # 6


def frames_of(payload: bytes | memoryview, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The frames (header + body, as one bytes object each) that carry ``payload``."""
    if len(payload) == 0:
        raise WireError("cannot send an empty message")
    view = memoryview(payload)
    n = len(view)
    for start in range(0, n, chunk):
        body = view[start:start + chunk]
        last = start + chunk >= n
        yield HEADER.pack(MAGIC, FLAG_LAST if last else 0, len(body)) + body


def check_magic(first: int) -> None:
    """Refuse a stream whose next byte cannot start a frame (checked before reading more)."""
    if first != MAGIC:
        raise WireError(f"bad frame magic 0x{first:02x} (not a meshinfer stream, or out of sync)")


def parse_header(header: bytes, limits: WireLimits = DEFAULT_LIMITS) -> tuple[int, bool]:
    """Return (body length, is last frame) or raise WireError/LimitExceededError."""
    if len(header) != HEADER_BYTES:
        raise WireError(f"truncated frame header ({len(header)} of {HEADER_BYTES} bytes)")
    magic, flags, length = HEADER.unpack(header)
    check_magic(magic)
    if flags & ~FLAG_LAST:
        raise WireError(f"unknown frame flags 0x{flags:02x}")
    if length == 0:
        raise WireError("empty frame")
    if length > limits.max_frame_bytes:
        raise LimitExceededError(f"frame of {length} bytes exceeds the limit of {limits.max_frame_bytes}")
    return length, bool(flags & FLAG_LAST)


class Reassembler:
    """Collects the frame bodies of one message; enforces ``max_message_bytes`` before each read."""

    def __init__(self, limits: WireLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._first: bytes | None = None  # a one-frame message is returned as is (no copy)
        self._buf: bytearray | None = None
        self._size = 0

    def reserve(self, length: int) -> None:
        """Call before reading a body of ``length`` bytes: refuse if the message would grow too big."""
        if self._size + length > self._limits.max_message_bytes:
            raise LimitExceededError(
                f"message of more than {self._size + length} bytes exceeds the limit of "
                f"{self._limits.max_message_bytes}"
            )

    def add(self, body: bytes) -> None:
        if self._size + len(body) > self._limits.max_message_bytes:  # reserve() was skipped
            raise LimitExceededError(
                f"message of more than {self._size + len(body)} bytes exceeds the limit of "
                f"{self._limits.max_message_bytes}"
            )
        if self._buf is not None:
            self._buf += body
        elif self._first is None:
            self._first = body
        else:
            self._buf = bytearray(self._first)
            self._buf += body
            self._first = None
        self._size += len(body)

    def take(self) -> bytes:
        """The whole payload; resets for the next message."""
        first, buf = self._first, self._buf
        self._first, self._buf, self._size = None, None, 0
        if buf is not None:
            return bytes(buf)
        return first if first is not None else b""

    @property
    def pending(self) -> int:
        return self._size


def decode_frames(data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> list[bytes]:
    """Split a complete byte string of frames into message payloads (for tests and tools)."""
    out: list[bytes] = []
    asm = Reassembler(limits)
    pos = 0
    while pos < len(data):
        length, last = parse_header(data[pos:pos + HEADER_BYTES], limits)
        pos += HEADER_BYTES
        asm.reserve(length)
        body = data[pos:pos + length]
        if len(body) != length:
            raise WireError(f"truncated frame body ({len(body)} of {length} bytes)")
        pos += length
        asm.add(body)
        if last:
            out.append(asm.take())
    if asm.pending:
        raise WireError("stream ended in the middle of a message")
    return out
