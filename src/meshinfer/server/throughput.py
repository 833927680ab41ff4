"""Start-up throughput measurement: how many decode tokens per second the served span sustains.

Contract: the functions here run on the caller's thread (the server runs them on its compute thread
before serving) and time only compute (the network adds per-hop latency that clients measure
themselves). Inputs are seeded random hidden states from a private generator, so nothing depends on
a checkpoint's contents and the global RNG is left alone; every KV cache is a scratch one, dropped on
return, so the span is left exactly as it was. Pure torch: no sessions, no network.

- ``measure_throughput(span)``: decode tokens/s of ONE session (batch 1; what ``ServerRecord.throughput``
  has always meant): warm-up (a short prefill and a few decode steps), then up to ``steps`` timed
  single-token steps, stopping early past ``max_seconds``.
- ``measure_batch_throughput(span, batch)``: AGGREGATE decode tokens/s with ``batch`` sessions decoding
  together, as the server's step loop runs them: each session has its own cache at its own length
  (ragged prefill lengths) and one decode step of every session is one ``BlockSpan.forward_batch``
  call. Same warm-up and time cap.
- ``measure_throughputs(span, batch)``: both, with the time cap split between them, as a
  ``Throughput`` (what a server announces: ``throughput``, ``batch_throughput``, ``batch_size``).

Inputs are made on the CPU and placed on the span's device before the clock starts; the clock is read only
after ``models.device.synchronize`` (GPU kernels run asynchronously: without it a timer measures launches).
Each measurement times at least ``MIN_STEPS`` steps, so the cap bounds the timed part (plus at most
one step); warm-up is a handful of steps on top.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from meshinfer.errors import ConfigError
from meshinfer.models.device import synchronize
from meshinfer.models.kv_cache import KVCache
from meshinfer.models.span import BlockSpan

WARMUP_PREFILL = 8
WARMUP_STEPS = 2
MEASURED_STEPS = 8
MIN_STEPS = 2
MAX_SECONDS = 1.0
TYPICAL_BATCH = 8
"""The batch a server measures its aggregate throughput at by default (a few concurrent sessions)."""
MAX_BATCH = 4096
"""Largest batch accepted (``ServerRecord.batch_size``'s bound)."""


@dataclass(frozen=True)
class Throughput:
    """A span's measured decode throughput: one session alone, and ``batch_size`` sessions together."""

    single: float
    """Decode tokens/s of one session (batch 1)."""
    batch: float
    """Aggregate decode tokens/s of ``batch_size`` sessions decoding together."""
    batch_size: int

    @property
    def speedup(self) -> float:
        """How many times more tokens/s the batch gets than one session."""
        return self.batch / self.single if self.single > 0 else 0.0


def _check(steps: int, max_seconds: float, batch: int = 1) -> None:
    if steps < 1:
        raise ConfigError(f"throughput measurement needs steps >= 1, got {steps}")
    if not (max_seconds > 0 and math.isfinite(max_seconds)):
        raise ConfigError(f"throughput measurement needs a finite max_seconds > 0, got {max_seconds}")
    if not 1 <= batch <= MAX_BATCH:
        raise ConfigError(f"throughput batch must be 1..{MAX_BATCH} sessions, got {batch}")


def _elapsed(span: BlockSpan, start: float) -> float:
    """Seconds since ``start`` once the work queued on the span's device is done."""
    synchronize(span.device)
    return time.perf_counter() - start


def _rate(tokens: int, elapsed: float) -> float:
    return tokens / max(elapsed, 1e-9)


def measure_throughput(span: BlockSpan, *, steps: int = MEASURED_STEPS, max_seconds: float = MAX_SECONDS) -> float:
    """Decode tokens per second of ``span`` for one session: up to ``steps`` timed steps after warm-up,
    fewer (at least ``MIN_STEPS``, or ``steps`` if smaller) when they take longer than ``max_seconds``."""
    _check(steps, max_seconds)
    hidden_size = span.spec.hidden_size
    cache = span.new_cache(WARMUP_PREFILL + WARMUP_STEPS + steps)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        prefill = torch.randn(1, WARMUP_PREFILL, hidden_size, generator=gen).to(span.device, span.dtype)  # [1, T, H]
        span(prefill, cache)
        token = torch.randn(1, 1, hidden_size, generator=gen).to(span.device, span.dtype)  # [1, 1, H]
        for _ in range(WARMUP_STEPS):
            span(token, cache)
        synchronize(span.device)
        done = 0
        start = time.perf_counter()
        while done < steps:
            span(token, cache)
            done += 1
            if done >= MIN_STEPS and _elapsed(span, start) > max_seconds:
                break
        elapsed = _elapsed(span, start)
    return _rate(done, elapsed)


def _prefill_lengths(batch: int) -> list[int]:
    """Ragged prompt lengths (WARMUP_PREFILL/2 .. WARMUP_PREFILL) so attention sees different lengths,
    as in a real step loop."""
    low = WARMUP_PREFILL // 2
    return [low + i % (WARMUP_PREFILL - low + 1) for i in range(batch)]


def measure_batch_throughput(span: BlockSpan, batch: int = TYPICAL_BATCH, *, steps: int = MEASURED_STEPS,
                             max_seconds: float = MAX_SECONDS) -> float:
    """Aggregate decode tokens per second of ``span`` with ``batch`` sessions decoding together (each its
    own cache, one ``forward_batch`` per step): ``batch`` x timed steps / their time, after warm-up."""
    _check(steps, max_seconds, batch)
    hidden_size = span.spec.hidden_size
    lengths = _prefill_lengths(batch)
    caches: list[KVCache] = [span.new_cache(n + WARMUP_STEPS + steps) for n in lengths]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        prompts = [torch.randn(n, hidden_size, generator=gen).to(span.device, span.dtype) for n in lengths]  # [T_i, H]
        span.forward_batch(list(zip(prompts, caches, strict=True)))
        tokens = torch.randn(batch, 1, hidden_size, generator=gen).to(span.device, span.dtype)  # [B, 1, H]
        step = [(tokens[i], cache) for i, cache in enumerate(caches)]  # each [1, H]
        for _ in range(WARMUP_STEPS):
            span.forward_batch(step)
        synchronize(span.device)
        done = 0
        start = time.perf_counter()
        while done < steps:
            span.forward_batch(step)
            done += 1
            if done >= MIN_STEPS and _elapsed(span, start) > max_seconds:
                break
        elapsed = _elapsed(span, start)
    return _rate(done * batch, elapsed)


def measure_throughputs(span: BlockSpan, batch: int = TYPICAL_BATCH, *, steps: int = MEASURED_STEPS,
                        max_seconds: float = MAX_SECONDS) -> Throughput:
    """Both figures of ``span`` (single session, then ``batch`` together), ``max_seconds`` split evenly
    between the two timed parts."""
    _check(steps, max_seconds, batch)
    single = measure_throughput(span, steps=steps, max_seconds=max_seconds / 2)
    together = measure_batch_throughput(span, batch, steps=steps, max_seconds=max_seconds / 2)
    return Throughput(single=single, batch=together, batch_size=batch)
