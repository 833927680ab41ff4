"""Leaf value types shared by every layer: block ranges and identifiers.

Contract: pure data, no I/O, no torch, no network. Anything here may travel on the wire, so every
type is a frozen msgspec Struct or a plain alias.
"""

from __future__ import annotations

import msgspec

from meshinfer.errors import ConfigError

ModelId = str
"""Content address of a model (hash of its manifest) or, before manifests exist, its human name."""

PeerIdStr = str
"""A libp2p peer id in its base58 text form."""

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""Tensor dtypes meshinfer computes in and sends on the wire."""

DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}


QUANT_MODES: tuple[str, ...] = ("none", "int8", "int4")
"""How a server (or a local model) holds its weights: as loaded (``none``), int8 per output channel, or int4 in
groups (``meshinfer.models.quant``). Listed from most to least precise: a client that lets the swarm choose
takes the first one that covers the model, and a route never mixes two."""


QUANT_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
"""Group sizes int4 weights may use (columns sharing one scale and zero)."""


def check_quant(name: str) -> str:
    """``name`` as one of ``QUANT_MODES`` (case-insensitive) or a one-line ConfigError listing them."""
    key = name.strip().lower()
    if key not in QUANT_MODES:
        raise ConfigError(f"unknown quant mode {name[:32]!r}; choose one of {', '.join(QUANT_MODES)}")
    return key


def canonical_dtype(name: str) -> str:
    """Map a user-facing dtype name ("bf16", "float16", ...) to its canonical form or raise ConfigError."""
    key = name.strip().lower()
    if key not in DTYPE_ALIASES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of fp32, fp16, bf16")
    return DTYPE_ALIASES[key]


class BlockRange(msgspec.Struct, frozen=True, order=True):
    """A span of transformer blocks: the half-open range [start, end)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise ConfigError(f"invalid block range {self.start}:{self.end} (need 0 <= start < end)")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and self.start <= block < self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    def blocks(self) -> range:
        return range(self.start, self.end)

    def check_within(self, num_blocks: int) -> None:
        """Raise ConfigError unless this range lies inside a model of ``num_blocks`` blocks."""
        if self.end > num_blocks:
            raise ConfigError(f"block range {self} exceeds the model's {num_blocks} blocks")

    @classmethod
    def parse(cls, text: str) -> BlockRange:
        """Parse ``"START:END"`` (as given to ``--blocks``)."""
        parts = text.split(":")
        if len(parts) != 2:
            raise ConfigError(f"invalid block range {text!r}; expected START:END, e.g. 0:8")
        try:
            start, end = int(parts[0]), int(parts[1])
        except ValueError:
            raise ConfigError(f"invalid block range {text!r}; START and END must be integers") from None
        return cls(start, end)
