"""A span of transformer blocks [start, end): what a server runs on the hidden states it receives.

Contract: owns the blocks of one ``BlockRange`` and a cached rotary table; ``forward`` takes hidden
states [B, T, H] and a ``KVCache`` of this span, runs prefill (T > 1) or decode (T == 1), writes the
new keys/values in place and advances the cache. ``forward_batch`` runs many sequences at once, each
with its own batch-1 cache at its own length (a ragged batch: decode steps and prefill chunks mixed),
with the same results as one ``forward`` per sequence. It never needs embeddings, the LM head, files,
sessions or the network. Bad inputs (wrong hidden size, a cache of another span, overflow) raise
``MeshinferError``s before any cache is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from meshinfer.errors import ConfigError, ContextOverflowError, UsageError
from meshinfer.models.block import AttentionPlan, TransformerBlock
from meshinfer.models.kv_cache import KVCache, torch_dtype
from meshinfer.models.rope import RotaryTable
from meshinfer.models.spec import ModelSpec
from meshinfer.types import BlockRange

if TYPE_CHECKING:
    from meshinfer.models.compiled import CompiledDecode
    from meshinfer.models.cuda_graphs import GraphedDecode

_FAST_DECODE = [True]
"""Whether one-token, one-sequence steps take ``TransformerBlock.decode`` (switchable for comparisons)."""


def set_fast_decode(enabled: bool) -> bool:
    """Turn the one-token decode path on or off; returns the previous setting (for A/B comparisons)."""
    previous = _FAST_DECODE[0]
    _FAST_DECODE[0] = bool(enabled)
    return previous


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
        self.compiled: CompiledDecode | GraphedDecode | None = None
        """Set by ``compile_decode``: one-token steps run as compiled graphs (``models.compiled``) on the CPU,
        as replayed CUDA graphs (``models.cuda_graphs``) on a CUDA device."""

    def compile_decode(self, fuse: bool = False, tune: bool = False) -> None:
        """Run one-token steps through ``models.compiled.CompiledDecode`` (CPU and other devices: compiled on first
        use per cache capacity) or, on a CUDA device, ``models.cuda_graphs.GraphedDecode`` (captured on first use
        per cache; ``fuse``: of the torch.compiled step; ``tune``: compiled with coordinate descent tuning) from now
        on; allocate caches with
        ``models.compiled.capacity``."""
        if self.device.type == "cuda":
            from meshinfer.models.cuda_graphs import GraphedDecode

            self.compiled = GraphedDecode(self, fuse=fuse or tune, tune=tune)
            return
        from meshinfer.models.compiled import CompiledDecode

        self.compiled = CompiledDecode(self)

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

    def sub(self, blocks: BlockRange) -> BlockSpan:
        """Blocks ``blocks`` (inside this span) as a ``BlockSpan`` sharing their weights (nothing is copied)."""
        served = self.range
        if not (served.start <= blocks.start and blocks.end <= served.end):
            raise ConfigError(f"blocks {blocks} are not inside the served span {served}")
        layers = self._layers[blocks.start - served.start:blocks.end - served.start]
        return BlockSpan(self.spec, blocks, layers, self.dtype, self.device)

    def new_cache(self, max_length: int, batch: int = 1) -> KVCache:
        """A fresh, empty KV cache for this span."""
        return KVCache(self.spec, len(self), max_length, batch=batch, dtype=self.dtype, device=self.device,
                       zeroed=self.compiled is not None)

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
        x = hidden.to(self.dtype)
        if b == 1 and t == 1 and positions is None and collect is None and _FAST_DECODE[0]:
            cos1, sin1 = cos.view(-1), sin.view(-1)  # [D]
            if self.compiled is not None and (y := self.compiled(x, cache, cos1, sin1)) is not None:
                cache.advance(1)
                return y
            for slot, layer in enumerate(self._layers):
                x = layer.decode(x, cache, slot, cos1, sin1, AttentionPlan.first_slot(start, layer.window))
            cache.advance(1)
            return x
        plans = {w: AttentionPlan.make(start, t, w, self.device) for w in self._windows}
        for slot, layer in enumerate(self._layers):
            x = layer(x, cache, slot, cos, sin, plans[layer.window])
            if collect is not None:
                collect.append(x)
        cache.advance(t)
        return x

    @torch.inference_mode()
    def forward_batch(self, items: Sequence[tuple[torch.Tensor, KVCache]]) -> list[torch.Tensor]:
        """Run many sequences through the span together; one output [T_i, H] per item, in order.

        Each item is (hidden [T_i, H], cache_i), cache_i a batch-1 cache of this span (``new_cache``),
        each at its own length; item i runs at positions cache_i.length + arange(T_i) and its cache
        advances by T_i, exactly as ``self.forward(hidden_i[None], cache_i)[0]`` would (up to float
        rounding of the larger matmuls). Every weight is read once per block for all N = sum T_i tokens;
        only attention runs per item. Outputs may be views of one [N, H] tensor. All checks (shapes,
        caches, room for every item) pass before any cache is written.
        """
        self._check_batch(items)
        live = [i for i, (hidden, _) in enumerate(items) if hidden.shape[0] > 0]
        outputs = [hidden for hidden, _ in items]  # T_i == 0: nothing to run, like forward
        if len(live) == 1:  # one sequence: the single path, bit-equal to forward
            hidden, cache = items[live[0]]
            outputs[live[0]] = self.forward(hidden.to(self.device)[None], cache)[0]
            return outputs
        if not live:
            return outputs
        caches = [items[i][1] for i in live]
        starts = [cache.length for cache in caches]  # each item's first slot (and position)
        bounds: list[tuple[int, int]] = []  # per live item: (offset in the concatenation, T_i)
        offset = 0
        for i in live:
            bounds.append((offset, items[i][0].shape[0]))
            offset += bounds[-1][1]
        positions = torch.cat([torch.arange(s, s + t) for s, (_, t) in zip(starts, bounds, strict=True)])  # [N]
        cos, sin = self.rope.gather(positions[None])  # [1, N, 1, D]
        plans = {
            w: [AttentionPlan.make(s, t, w, self.device) for s, (_, t) in zip(starts, bounds, strict=True)]
            for w in self._windows
        }
        x = torch.cat([items[i][0].to(self.device, self.dtype) for i in live])[None]  # [1, N, H]
        for slot, layer in enumerate(self._layers):
            x = layer.forward_batch(x, caches, bounds, slot, cos, sin, plans[layer.window])
        for i, cache, (o, t) in zip(live, caches, bounds, strict=True):
            cache.advance(t)
            outputs[i] = x[0, o : o + t]  # [T_i, H]
        return outputs

    def _check_batch(self, items: Sequence[tuple[torch.Tensor, KVCache]]) -> None:
        """Raise ConfigError / UsageError / ContextOverflowError for the first bad item; touches no cache."""
        h = self.spec.hidden_size
        kv_shape = (self.spec.num_kv_heads, self.spec.head_dim)
        seen: set[int] = set()
        for n, (hidden, cache) in enumerate(items):
            if hidden.dim() != 2 or hidden.shape[-1] != h:
                raise ConfigError(
                    f"batch item {n}: hidden states must have shape [tokens, {h}], got {tuple(hidden.shape)}"
                )
            keys = cache.keys(0)  # [B, kvh, M, D]
            if cache.num_blocks != len(self) or cache.batch != 1 or (keys.shape[1], keys.shape[3]) != kv_shape:
                raise ConfigError(
                    f"batch item {n}: a cache of {cache.num_blocks} blocks x batch {cache.batch} x "
                    f"{keys.shape[1]} kv heads x {keys.shape[3]} dims does not fit span {self.range} "
                    f"(needs {len(self)} blocks x batch 1 x {kv_shape[0]} kv heads x {kv_shape[1]} dims)"
                )
            if keys.dtype != self.dtype or keys.device.type != self.device.type:
                raise ConfigError(
                    f"batch item {n}: cache is {keys.dtype} on {keys.device}, the span {self.dtype} on {self.device}"
                )
            if id(cache) in seen:
                raise UsageError(f"batch item {n}: the same cache appears twice in one batch")
            seen.add(id(cache))
        for n, (hidden, cache) in enumerate(items):
            try:
                cache.check_room(hidden.shape[0])
            except ContextOverflowError as err:
                raise ContextOverflowError(f"batch item {n}: {err}") from None
