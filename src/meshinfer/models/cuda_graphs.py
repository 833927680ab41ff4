"""Graphed decode steps: one token of one sequence through a whole ``BlockSpan`` as one replayed CUDA graph.

Contract: the CUDA counterpart of ``models.compiled`` (same call, same place in ``BlockSpan.forward``): on a GPU a
decode step of a big model is a few hundred small kernels (per block: norms, three GEMVs, rotary, the cache
write, attention, SwiGLU), and launching them from Python costs more than running them (tens of microseconds
per block against a few for the kernels of a 4096-wide block at HBM speed). ``GraphedDecode(span)`` captures
the span's static-shape step (every block's ``TransformerBlock.decode_masked``: cache write as an ``index_copy_``
at a position held in a device tensor, attention over the whole capacity under a mask computed on the device
from that position) once per (cache object, capacity) with ``torch.cuda.CUDAGraph``, and from then on a step
is: copy the hidden state and the rotary row into the graph's static input buffers, fill the position, replay,
copy the output out. The graph holds the addresses of that cache's own K/V tensors (which ``KVCache``
allocates once and never moves), so each cache gets its own graph; graphs are kept in a ``WeakKeyDictionary``
keyed by the cache (dropped with it) and share one memory pool (``torch.cuda.graph_pool_handle``) and one
capture stream, so a graph costs its intermediates once, not per cache (safe: replays run one at a time on
the caller's stream, and each graph's static output stays alive). A capture costs one eager warm-up step plus
the capture (tens of milliseconds for 32 blocks), paid on the first decode step of each new cache.

Why a manual capture rather than ``torch.compile(mode="reduce-overhead")``: the KV tensors are inputs that
the step mutates; torch's cudagraph trees re-record or fall back to eager for mutated inputs unless each is
marked with ``torch._dynamo.mark_static_address`` (a private API), re-record on every new cache object
(new addresses), and inductor's compile of a 32-block step takes minutes. A manual capture of the eager
kernels has none of these moving parts: it records exactly what eager runs (cuBLAS GEMVs, SDPA, the int8/int4
kernels of ``models.quant`` when they are capturable), and any capture error (an op that synchronises, a kernel
that is not capturable) leaves the span on the eager path for good, with one warning, as ``models.compiled``
does.

``fuse=True`` captures each block's ``torch.compile``d step instead (inductor, default mode: no cudagraph
trees of its own; the vLLM pattern of compiled code under a manual capture): each block's ~30 small kernels
(norms in fp32, rotation, residuals, SwiGLU) become a few, which matters at HBM speed (at ~2 us each, 900 small
kernels cost over half of reading an 8B model's weights once). ``TransformerBlock.decode_masked`` is compiled
once for all blocks (dynamo lifts a block's weights as graph inputs, so blocks of equal shapes share one graph:
one block to compile, not 32); a step inductor cannot compile is captured eager.

Results equal the eager ``decode`` step up to float rounding (masked attention over the capacity rather than a
slice of the filled slots). Caches must be zeroed (``BlockSpan.new_cache`` does so once a decode accelerator is
set): masked slots are read. CUDA only; knows nothing of files, sessions or the network.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from meshinfer.models.block import TransformerBlock
from meshinfer.models.kv_cache import KVCache

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    """One captured step: its graph and every buffer it reads and writes (never a reference to the cache).

    Every tensor the graph reads that was allocated outside the capture must be held here: a replay reads it by
    address, and a freed one is reused by the next eager allocation (the first replay right after the capture
    still sees the old values, so only later steps go wrong)."""

    graph: torch.cuda.CUDAGraph
    capacity: int
    x: torch.Tensor  # [1, 1, H] input hidden state
    pos: torch.Tensor  # [1] int64: the slot (and position) of the token
    cos: torch.Tensor  # [D]
    sin: torch.Tensor  # [D]
    slots: torch.Tensor  # [M] int64 arange: the masks are computed from it in the graph, so it must outlive capture
    out: torch.Tensor  # [1, 1, H] output hidden state (overwritten by every replay)
    k0: int  # data_ptr of the cache's first K tensor at capture (a guard: caches never move their tensors)


class GraphedDecode:
    """CUDA-graphed one-token steps of one span, one graph per cache object (see the module doc)."""

    def __init__(self, span: Any, fuse: bool = False, tune: bool = False) -> None:
        """``fuse``: capture each block's ``torch.compile``d step (inductor fuses its norms, rotation, residuals and
        SwiGLU into a few kernels) instead of the eager one; a step inductor cannot compile is captured eager.
        ``tune`` (with ``fuse``): compile with inductor's ``coordinate_descent_tuning``, under which a one-row
        matmul becomes a tuned Triton reduction instead of a cuBLAS call (gpt-fast's setting; a longer compile)."""
        self.span = span
        self.windows: list[int | None] = list(span._windows)
        self.fuse = fuse
        # one block's step; compiled once for every block of the span (dynamo lifts each block's weights as inputs,
        # so equal shapes share one graph: "regional" compilation, a 32-block model compiles one block)
        self._block: Callable[..., torch.Tensor] = (
            torch.compile(TransformerBlock.decode_masked, dynamic=False, fullgraph=True,
                          options={"coordinate_descent_tuning": True} if tune else None) if fuse
            else TransformerBlock.decode_masked)
        self._graphs: weakref.WeakKeyDictionary[KVCache, _Graph] = weakref.WeakKeyDictionary()
        self._pool: Any = None  # one memory pool and one capture stream for every graph of the span
        self._stream: Any = None
        self.failed = False
        self.captures = 0  # how many graphs were captured (for tests and benches)

    @property
    def compiled_blocks(self) -> bool:
        """Whether captures run the compiled block step (``fuse`` asked for and inductor managed it so far)."""
        return self._block is not TransformerBlock.decode_masked

    def _step(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              slots: torch.Tensor, kv: tuple[torch.Tensor, ...]) -> torch.Tensor:  # [1, 1, H] -> [1, 1, H]
        m = slots.shape[0]
        masks: dict[int | None, torch.Tensor] = {}
        for w in self.windows:  # [1, 1, 1, M] additive (0 / -inf), computed on the device from pos (no host sync)
            seen = slots <= pos
            if w is not None:
                seen = seen & (slots > pos - w)
            # additive in x's dtype: SDPA would convert a bool mask in every block
            masks[w] = torch.zeros(m, dtype=x.dtype, device=x.device).masked_fill(~seen, float("-inf")).view(1, 1, 1, m)
        for slot, layer in enumerate(self.span._layers):
            x = self._block(layer, x, kv[2 * slot], kv[2 * slot + 1], pos, cos, sin, masks[layer.window])
        return x

    def _capture(self, x: torch.Tensor, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> _Graph:
        device = x.device
        m = cache.max_length
        kv = tuple(t for slot in range(cache.num_blocks) for t in (cache.keys(slot), cache.values(slot)))
        sx, scos, ssin = x.clone(), cos.clone(), sin.clone()
        pos = torch.full((1,), cache.length, dtype=torch.int64, device=device)
        slots = torch.arange(m, device=device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device)
        stream = self._stream
        # warm-up on the capture's own side stream (cuBLAS handles and workspaces are per stream, and lazy inits must
        # happen outside a capture, as the torch docs require); it writes this step's own K/V at pos, which the
        # replay below rewrites identically
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            try:
                self._step(sx, pos, scos, ssin, slots, kv)  # fused: compiles here (once per capacity)
            except Exception as err:
                if self._block is TransformerBlock.decode_masked:
                    raise
                log.warning("fused decode steps do not compile (capturing the eager step instead): %s",
                            str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__)
                self._block = TransformerBlock.decode_masked
                self._step(sx, pos, scos, ssin, slots, kv)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other threads (network copies, other sessions' work) may touch the device meanwhile
        with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
            out = self._step(sx, pos, scos, ssin, slots, kv)
        self.captures += 1
        return _Graph(graph, m, sx, pos, scos, ssin, slots, out, cache.keys(0).data_ptr())

    def __call__(self, x: torch.Tensor, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """Run ``x`` [1, 1, H] at slot ``cache.length`` (the cache is not advanced); None: not graphed here."""
        if self.failed or x.device.type != "cuda":
            return None
        entry = self._graphs.get(cache)
        try:
            if entry is None or entry.capacity != cache.max_length or entry.k0 != cache.keys(0).data_ptr():
                entry = self._graphs[cache] = self._capture(x, cache, cos, sin)
            entry.x.copy_(x)
            entry.cos.copy_(cos)
            entry.sin.copy_(sin)
            entry.pos.fill_(cache.length)
            entry.graph.replay()
            return entry.out.clone()  # the next replay overwrites entry.out
        except Exception as err:  # a capture or replay the device refuses keeps the eager path
            self.failed = True
            self._graphs = weakref.WeakKeyDictionary()
            log.warning("CUDA-graphed decode is off for this model (falling back to eager): %s",
                        str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__)
            return None
