"""A span of transformer blocks [start, end): what a server runs on the hidden states it receives.

Contract: owns the blocks of one ``BlockRange`` and a cached rotary table; ``forward`` takes hidden
states [B, T, H] and a ``KVCache`` of this span, runs prefill (T > 1) or decode (T == 1), writes the
new keys/values in place and advances the cache. It never needs embeddings, the LM head, files or the
network. Bad inputs (wrong hidden size, a cache of another span, overflow) raise ``MeshinferError``s.
"""

from __future__ import annotations

import torch
from torch import nn

from meshinfer.errors import ConfigError, ContextOverflowError
from meshinfer.models.block import AttentionPlan, TransformerBlock
from meshinfer.models.kv_cache import KVCache, torch_dtype
from meshinfer.models.rope import RotaryTable
from meshinfer.models.spec import ModelSpec
from meshinfer.types import BlockRange


class BlockSpan(nn.Module):
    """Blocks [range.start, range.end) of a model, ready to run against a KV cache."""

    def __init__(
        self,
        spec: ModelSpec,
        blocks: BlockRange,
        layers: list[TransformerBlock],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        blocks.check_within(spec.num_blocks)
        if [layer.index for layer in layers] != list(blocks.blocks()):
            raise ConfigError(f"span {blocks} got blocks {[layer.index for layer in layers]}")
        self.spec = spec
        self.range = blocks
        self.dtype = dtype
        self.device = torch.device(device)
        self.layers = nn.ModuleList(layers)
        self._layers: list[TransformerBlock] = list(layers)  # plain list: no ModuleList indexing cost
        self._windows = sorted({layer.window for layer in layers}, key=lambda w: -1 if w is None else w)
        self.rope = RotaryTable(spec, dtype, self.device)

    @classmethod
    def from_hf(
        cls,
        spec: ModelSpec,
        blocks: BlockRange,
        tensors: dict[str, torch.Tensor],
        dtype: str | torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> BlockSpan:
        """Build the span from Hugging Face-named tensors (only those of its blocks are read)."""
        dt = torch_dtype(dtype)
        blocks.check_within(spec.num_blocks)
        layers = [TransformerBlock.from_hf(spec, i, tensors, dt, device) for i in blocks.blocks()]
        return cls(spec, blocks, layers, dt, device)

    def __len__(self) -> int:
        return len(self._layers)

    def new_cache(self, max_length: int, batch: int = 1) -> KVCache:
        """A fresh, empty KV cache for this span."""
        return KVCache(self.spec, len(self), max_length, batch=batch, dtype=self.dtype, device=self.device)

    def cache_bytes(self, max_length: int, batch: int = 1) -> int:
        """Bytes ``new_cache(max_length, batch)`` would allocate."""
        return KVCache.nbytes(self.spec, len(self), max_length, batch=batch, dtype=self.dtype)

    @torch.inference_mode()
    def forward(  # type: ignore[override]
        self,
        hidden: torch.Tensor,  # [B, T, H]
        cache: KVCache,
        positions: torch.Tensor | None = None,  # [B, T] or [T]; default: cache.length + arange(T)
        collect: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [B, T, H]
        """Run the span over ``hidden`` at the cache's next slots; the cache advances by T.

        ``positions`` only changes the rotary phases (slots stay consecutive); ``collect``, if given,
        receives each block's output [B, T, H] in order. Runs in inference mode whatever the caller's
        mode, so a cache allocated in either mode can be written.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.spec.hidden_size:
            raise ConfigError(
                f"hidden states must have shape [batch, tokens, {self.spec.hidden_size}], got {tuple(hidden.shape)}"
            )
        b, t, _ = hidden.shape
        if cache.num_blocks != len(self) or cache.batch != b:
            raise ConfigError(
                f"cache of {cache.num_blocks} blocks x batch {cache.batch} does not fit span {self.range} x batch {b}"
            )
        if t == 0:
            return hidden
        cache.check_room(t)
        start = cache.length
        if positions is None:
            cos, sin = self.rope.range(start, t)  # [1, T, 1, D]
        else:
            positions = positions.expand(b, t) if positions.dim() == 1 else positions
            if positions.shape != (b, t):
                raise ConfigError(f"positions must have shape [{b}, {t}], got {tuple(positions.shape)}")
            if int(positions.min()) < 0 or int(positions.max()) >= self.spec.max_position_embeddings:
                raise ContextOverflowError(
                    f"positions must lie in 0..{self.spec.max_position_embeddings - 1} (the model's context)"
                )
            cos, sin = self.rope.gather(positions)  # [B, T, 1, D]
        plans = {w: AttentionPlan.make(start, t, w, self.device) for w in self._windows}
        x = hidden.to(self.dtype)
        for slot, layer in enumerate(self._layers):
            x = layer(x, cache, slot, cos, sin, plans[layer.window])
            if collect is not None:
                collect.append(x)
        cache.advance(t)
        return x
