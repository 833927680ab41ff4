"""Size limits every receiver enforces before it allocates anything a peer asked for.

Contract: frozen value objects, pure data; no I/O, no torch. The framing layer checks frame and
message sizes against ``WireLimits`` before reading a body; the tensor codec checks dtype, rank, every
dimension, element count and byte length against it before building a tensor. ``RecordLimits`` bounds
what a DHT reader takes from the swarm: bytes per record (checked before decoding), blocks per model,
records per key and per signing peer, keys per read, models per directory read, audit tallies per model;
``MAX_RECORD_BYTES`` and ``MAX_MODEL_BLOCKS`` are also part of the record schemas (``wire.records``), so every peer
enforces them.
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

MAX_RECORD_BYTES = 32 * KIB
"""Largest encoded DHT record (any type; the largest schema-valid one, a seed record, is about 30 KiB)."""
MAX_MODEL_BLOCKS = 4096
"""Most blocks a model may have (model cards, seed records, server spans): readers size per-block state by it."""


@dataclass(frozen=True)
class RecordLimits:
    """How much one DHT read takes from the swarm; what is over a limit is skipped (and counted), never kept."""

    max_records_per_key: int = 1024
    """Records decoded under one key (subkeys in sorted order); the rest are skipped."""
    max_records_per_signer: int = 32
    """Records one signing peer may have under one key (an honest peer writes one; one per model it announces in
    the directory)."""
    max_keys_per_read: int = 2 * MAX_MODEL_BLOCKS
    """Keys one bounded DHT read may ask for (a larger read is a programming error)."""
    max_models_per_read: int = 64
    """Models a swarm read lists: of twice as many candidates (most announcing peers first), those with servers
    first."""
    max_listed_blocks: int = 4 * MAX_MODEL_BLOCKS
    """Blocks of all the models one swarm read lists together (per-block state: coverage, the swarm document);
    models announced by more peers, then smaller ones, come first."""
    max_cards_per_signer: int = 32
    """Directory entries (model cards) one signing peer may contribute to a swarm read (an honest peer announces
    the one model it serves; a test peer may fake a few dozen)."""
    max_tallies_per_model: int = 256
    """Audit tallies (``audits:<model>``, one per client) one swarm read sums for a model (newest first)."""

    def __post_init__(self) -> None:
        for name in ("max_records_per_key", "max_records_per_signer", "max_keys_per_read", "max_models_per_read",
                     "max_listed_blocks", "max_cards_per_signer", "max_tallies_per_model"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"record limit {name} must be > 0, got {getattr(self, name)}")


DEFAULT_RECORD_LIMITS = RecordLimits()


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
