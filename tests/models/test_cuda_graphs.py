"""What of ``models.cuda_graphs`` runs without a GPU: the captured step's math (masks computed on the device from
the position, sliding windows included) equals the eager decode step on the CPU, and a CPU span is never graphed.
The capture and replay themselves are tested on CUDA (tests/gpu/test_gpu_parity.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from meshinfer.models.cuda_graphs import GraphedDecode
from meshinfer.models.engine import LocalModel
from meshinfer.models.kv_cache import KVCache
from meshinfer.testing.checkpoints import tiny_checkpoint

PROMPT = [5, 17, 42, 7, 99, 3, 11, 64]


@pytest.fixture(scope="module")
def windowed(sliding_window_checkpoint: Callable[[int], Path]) -> Path:
    """The tiny mistral with a sliding window of 6 tokens (generations cross it)."""
    return sliding_window_checkpoint(6)


@pytest.mark.parametrize("family", ["qwen3", "mistral-window"])
def test_the_graphed_step_equals_eager_decode(family: str, windowed: Path) -> None:
    model = LocalModel.from_pretrained(windowed if family == "mistral-window" else tiny_checkpoint(family))
    span = model.span
    graphed = GraphedDecode(span)
    with torch.inference_mode():
        eager, static = span.new_cache(32), KVCache(span.spec, len(span), 32, zeroed=True)
        x = model.head.embed(torch.tensor([PROMPT]))
        span(x, eager)
        span(x, static)
        for token in (9, 23, 4, 77, 31, 8, 2, 15):  # crosses the window of 6
            h = model.head.embed(torch.tensor([[token]]))  # [1, 1, H]
            start = static.length
            cos, sin = span.rope.range(start, 1)
            kv = tuple(t for s in range(static.num_blocks) for t in (static.keys(s), static.values(s)))
            got = graphed._step(h, torch.tensor([start]), cos.view(-1), sin.view(-1), torch.arange(32), kv)
            static.advance(1)
            want = span(h, eager)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(static.keys(0)[:, :, : static.length], eager.keys(0)[:, :, : eager.length])


def test_a_cpu_span_is_not_graphed() -> None:
    model = LocalModel.from_pretrained(tiny_checkpoint("llama"))
    graphed = GraphedDecode(model.span)
    cache = model.span.new_cache(16)
    cos, sin = model.span.rope.range(0, 1)
    assert graphed(torch.zeros(1, 1, model.spec.hidden_size), cache, cos.view(-1), sin.view(-1)) is None
    assert graphed.captures == 0 and not graphed.failed


@pytest.mark.slow
def test_the_fused_step_compiles_one_block_for_all_and_equals_eager(windowed: Path) -> None:
    """``fuse=True``: the compiled block step (inductor, here on the CPU) gives the eager step's results, and the
    blocks share one compiled graph."""
    from torch._dynamo.utils import counters

    model = LocalModel.from_pretrained(windowed)
    span = model.span
    fused = GraphedDecode(span, fuse=True)
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        eager, static = span.new_cache(32), KVCache(span.spec, len(span), 32, zeroed=True)
        x = model.head.embed(torch.tensor([PROMPT]))
        span(x, eager)
        span(x, static)
        for token in (9, 23, 4):
            h = model.head.embed(torch.tensor([[token]]))
            start = static.length
            cos, sin = span.rope.range(start, 1)
            kv = tuple(t for s in range(static.num_blocks) for t in (static.keys(s), static.values(s)))
            got = fused._step(h, torch.tensor([start]), cos.view(-1), sin.view(-1), torch.arange(32), kv)
            static.advance(1)
            torch.testing.assert_close(got, span(h, eager), atol=1e-4, rtol=1e-4)
    assert fused.compiled_blocks and counters["stats"]["unique_graphs"] == 1
