"""Start-up throughput measurement: how many decode tokens per second the served span sustains.

Contract: ``measure_throughput(span)`` runs on the caller's thread (the server runs it on its compute
thread before serving): it builds a scratch KV cache, warms up with a short prefill and a few decode
steps, then times up to ``steps`` single-token decode steps of the whole span (stopping early past
``max_seconds``) and returns tokens/s for one session (compute only; the network adds per-hop
latency that clients measure themselves). Inputs are seeded random hidden states, so nothing
depends on a checkpoint's contents. Pure torch.
"""

from __future__ import annotations

import time

import torch

from meshinfer.models.span import BlockSpan

WARMUP_PREFILL = 8
WARMUP_STEPS = 2
MEASURED_STEPS = 8
MAX_SECONDS = 1.0


def measure_throughput(span: BlockSpan, *, steps: int = MEASURED_STEPS, max_seconds: float = MAX_SECONDS) -> float:
    """Decode tokens per second of ``span`` for one session: up to ``steps`` timed steps after warm-up,
    fewer (at least 2) when they take longer than ``max_seconds`` in total."""
    hidden_size = span.spec.hidden_size
    cache = span.new_cache(WARMUP_PREFILL + WARMUP_STEPS + steps)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        prefill = torch.randn(1, WARMUP_PREFILL, hidden_size, generator=gen).to(span.dtype)  # [1, T, H]
        span(prefill, cache)
        token = torch.randn(1, 1, hidden_size, generator=gen).to(span.dtype)  # [1, 1, H]
        for _ in range(WARMUP_STEPS):
            span(token, cache)
        done = 0
        start = time.perf_counter()
        while done < steps:
            span(token, cache)
            done += 1
            if done >= 2 and time.perf_counter() - start > max_seconds:
                break
        elapsed = time.perf_counter() - start
    return done / max(elapsed, 1e-9)
