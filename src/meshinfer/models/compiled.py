"""Compiled decode steps: one token of one sequence through a whole ``BlockSpan`` as one ``torch.compile`` graph.

Contract: an optional speed-up of ``BlockSpan.forward`` for decode steps (batch 1, one token) on CPU. In eager
PyTorch a decode step of a model of small blocks is mostly per-op overhead (SmolLM2-135M: about 200 us per
block outside the matrix products, 6 ms a token); compiled, inductor fuses the norms, rotations, residuals and
the SwiGLU into a few C++ loops around the matrix-product and attention kernels (which stay PyTorch's own, the
int8/int4 ones included). ``CompiledDecode(span)`` compiles, per cache CAPACITY (the KV tensors' ``max_length``),
a function of the token's hidden state, position, rotary row, attention masks and every block's K/V tensors that
runs each block's ``TransformerBlock.decode_masked`` (the decode math with the cache write as an ``index_copy_``
at the position and attention over the whole capacity under a mask, so that every shape is static). Each
capacity is its own graph, so callers allocate caches in ``capacity(n)`` buckets (powers of two from 256,
capped at the model's context): at most a handful of graphs per model. The first compile of a capacity takes
tens of seconds (about 40 s for SmolLM2 on 2 cores; inductor caches its work on disk, so later processes take
a few seconds); attention over the whole capacity costs at most twice the filled length. Results equal the eager
path up to float rounding (operations are fused and reordered). A compile that fails logs a warning once and
leaves the span on the eager path for good. Knows nothing of files, sessions or the network; needs a C++
compiler at run time (inductor's), which is why it is opt-in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from meshinfer.models.block import AttentionPlan
from meshinfer.models.kv_cache import KVCache

log = logging.getLogger(__name__)

MIN_CAPACITY = 256


def capacity(tokens: int, context: int) -> int:
    """The cache capacity a compiled model allocates for ``tokens``: the next power of two >= 256, capped at
    ``context`` (never below ``tokens``)."""
    cap = MIN_CAPACITY
    while cap < tokens:
        cap *= 2
    return max(tokens, min(cap, context))


class CompiledDecode:
    """Compiled one-token steps of one span, one graph per cache capacity (see the module doc)."""

    def __init__(self, span: Any) -> None:
        self.span = span
        self.windows: list[int | None] = list(span._windows)  # one mask per distinct sliding window
        self._graphs: dict[int, Callable[..., torch.Tensor]] = {}
        self.failed = False

    def _step(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              masks: tuple[torch.Tensor, ...], kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        by_window = dict(zip(self.windows, masks, strict=True))
        for slot, layer in enumerate(self.span._layers):
            x = layer.decode_masked(x, kv[2 * slot], kv[2 * slot + 1], pos, cos, sin, by_window[layer.window])
        return x

    def __call__(self, x: torch.Tensor, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """Run ``x`` [1, 1, H] at slot ``cache.length`` (the cache is not advanced); None: not compiled here."""
        if self.failed:
            return None
        m, start = cache.max_length, cache.length
        graph = self._graphs.get(m)
        if graph is None:
            graph = self._graphs[m] = torch.compile(self._step, dynamic=False, fullgraph=True)
        slots = torch.arange(m, device=x.device)
        masks = tuple((slots <= start) & (slots >= AttentionPlan.first_slot(start, w)) for w in self.windows)
        kv = tuple(t for slot in range(cache.num_blocks) for t in (cache.keys(slot), cache.values(slot)))
        try:
            return graph(x, torch.tensor([start], device=x.device), cos, sin,
                         tuple(mk.view(1, 1, 1, m) for mk in masks), kv)
        except Exception as err:  # inductor needs a C++ compiler; anything it cannot do keeps the eager path
            self.failed = True
            log.warning("compiled decode is off for this model (falling back to eager): %s",
                        str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__)
            return None
