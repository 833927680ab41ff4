"""Helpers for the weight tests: build a cache copy of a model from a local directory, without a network."""

from __future__ import annotations

from pathlib import Path

import torch

from meshinfer.models.checkpoint import Checkpoint
from meshinfer.types import BlockRange
from meshinfer.weights.manifest import Want
from meshinfer.weights.seed import LocalPieces
from meshinfer.weights.store import ModelStore


def local_copy(src: Path, cache: Path, want: Want) -> Path:
    """Copy ``want`` of ``src`` into a cache through the same store a fetch uses (pieces from disk)."""
    local = LocalPieces(src)
    try:
        store = ModelStore(cache, local.manifest)
        store.write_manifest()
        for group in local.manifest.groups_for(want):
            partial = store.begin(group)
            for piece in partial.open():
                assert partial.write(piece, local.read_piece(piece.kind, piece.name, piece.index))
            partial.finish(durable=False)
        store.write_index()
        return store.path
    finally:
        local.close()


def span_output(directory: Path, blocks: BlockRange, seed: int = 0) -> torch.Tensor:
    """The span's output for a fixed random input of 5 tokens (prefill), fp32."""
    span = Checkpoint(directory).load_span(blocks)
    hidden = torch.randn(1, 5, span.spec.hidden_size, generator=torch.Generator().manual_seed(seed))
    return span(hidden, span.new_cache(16))
