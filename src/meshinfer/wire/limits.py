"""Size limits every receiver enforces before it allocates anything a peer asked for.

Contract: a frozen value object, pure data; no I/O, no torch. The framing layer checks frame and
message sizes against it before reading a body; the tensor codec checks dtype, rank, every dimension,
element count and byte length against it before building a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from meshinfer.errors import ConfigError

KIB = 1024
MIB = 1024 * KIB

CHUNK_BYTES = 1 * MIB
"""Senders split every message payload into frames of at most this many bytes."""


@dataclass(frozen=True)
class WireLimits:
    """What one peer accepts from another on a stream (defaults fit models up to hidden size 32768)."""

    max_tokens_per_step: int = 4096
    """Product of all but the last dimension of a hidden-state tensor ([tokens, hidden] -> tokens)."""
    max_hidden_size: int = 32768
    """Largest last dimension of a hidden-state tensor."""
    max_rank: int = 3
    """Most dimensions a tensor may have ([batch, tokens, hidden])."""
    max_tensor_bytes: int = 64 * MIB
    """Largest raw byte length of one tensor."""
    max_frame_bytes: int = CHUNK_BYTES
    """Largest frame body a receiver reads; a header announcing more is refused before reading."""
    max_message_bytes: int = 64 * MIB + 64 * KIB
    """Largest reassembled message (all frames of one message together)."""
    max_route_hops: int = 64
    """Most next hops an ``Open`` may carry in its route tail."""

    def __post_init__(self) -> None:
        for name in ("max_tokens_per_step", "max_hidden_size", "max_rank", "max_tensor_bytes",
                     "max_frame_bytes", "max_message_bytes", "max_route_hops"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"wire limit {name} must be > 0, got {getattr(self, name)}")
        if self.max_frame_bytes < CHUNK_BYTES:
            raise ConfigError(f"max_frame_bytes must be >= the chunk size {CHUNK_BYTES}")
        if self.max_message_bytes < self.max_frame_bytes:
            raise ConfigError("max_message_bytes must be >= max_frame_bytes")


DEFAULT_LIMITS = WireLimits()

MESSAGE_OVERHEAD_BYTES = 1 * MIB
"""Room in a message beside its hidden-state tensor (ids, route tail, burst tag, msgpack framing)."""


def limits_for_model(hidden_size: int, max_step_tokens: int, base: WireLimits = DEFAULT_LIMITS) -> WireLimits:
    """What a server of a model accepts on its session and push streams: no tensor and no message larger
    than its largest legitimate ``Step`` (``max_step_tokens`` x ``hidden_size`` in float32, the widest
    dtype on the wire, plus ``MESSAGE_OVERHEAD_BYTES``), and never more than ``base`` allows."""
    if hidden_size <= 0 or max_step_tokens <= 0:
        raise ConfigError(f"hidden size and max step tokens must be > 0, got {hidden_size}, {max_step_tokens}")
    tensor = max_step_tokens * hidden_size * 4
    message = max(base.max_frame_bytes, tensor + MESSAGE_OVERHEAD_BYTES)
    return replace(base, max_tensor_bytes=min(base.max_tensor_bytes, tensor),
                   max_message_bytes=min(base.max_message_bytes, message))
