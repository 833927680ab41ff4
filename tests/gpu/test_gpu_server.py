"""The block server's device paths on a CUDA GPU (issue 18): device/dtype resolution, the KV budget sized from
the GPU's free memory, the step loop's one-copy-per-turn staging against the CPU reference, a REAL out-of-memory
while allocating a KV cache and an injected one in a batched step (each refuses only its session), and the
synchronized throughput measurement. Skipped without CUDA; the CPU side of each path is tested in tests/server."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fakes import NoOutbox
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.server.config import ServerConfig
from meshinfer.server.device import open_device, size_cache
from meshinfer.server.runtime import StepLoop
from meshinfer.server.scheduler import Piece
from meshinfer.server.session import Session, SessionError, StepJob
from meshinfer.server.throughput import measure_throughputs
from meshinfer.types import BlockRange
from meshinfer.wire.messages import ErrorCode
from meshinfer.wire.tensor import decode_tensor, encode_tensor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")]

FULL = BlockRange(0, 4)



def _session(steps: StepLoop, sid: str, max_length: int = 32) -> Session:
    return Session(sid, FULL, max_length, "float32", NoOutbox(), cache=steps.sub_span(FULL).new_cache(max_length))


def test_open_device_and_auto_kv_budget_on_cuda(ckpt: Checkpoint) -> None:
    cfg, dev = open_device(ServerConfig(model="m"))  # auto: the first GPU, bf16 where it has it
    assert cfg.device == "cuda:0" and dev.device.type == "cuda" and dev.label == torch.cuda.get_device_name(0)
    assert cfg.dtype in ("bfloat16", "float16") and cfg.cache_tokens is None  # sized after the weights
    used_free = dev.memory_used_free()
    assert used_free is not None and used_free[1] > 0
    span = ckpt.load_span(FULL, cfg.dtype, dev.device)
    sized = size_cache(cfg, span, dev)
    free = torch.cuda.mem_get_info(dev.device)[0]
    assert 0 < sized.kv_budget * span.cache_bytes(1) < free


def test_step_loop_on_cuda_matches_the_cpu_reference(ckpt: Checkpoint) -> None:
    span = ckpt.load_span(FULL, "float32", "cuda")
    steps = StepLoop(span, lambda *a: None)
    cpu = ckpt.load_span(FULL)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randn(n, 64, generator=gen) for n in (1, 4, 7)]
    sessions = [_session(steps, f"s{i}") for i in range(3)]
    jobs = [StepJob(s, 0, 0, encode_tensor(x), 0.0) for s, x in zip(sessions, prompts, strict=True)]
    results = steps.execute([Piece(j, 0, j.tokens) for j in jobs])
    for x, r in zip(prompts, results, strict=True):
        assert r is not None and r.error is None and r.output is not None
        want = cpu(x[None], cpu.new_cache(32))[0]
        torch.testing.assert_close(decode_tensor(r.output), want, atol=1e-3, rtol=1e-3)
    assert all(s.cache is not None and s.cache.keys(0).device.type == "cuda" for s in sessions)


def test_a_real_oom_allocating_a_kv_cache_refuses_only_that_session(ckpt: Checkpoint) -> None:
    """The caching allocator is capped at what it holds now and the free room inside its segments is taken by
    512-byte blocks (its smallest), so the next cache fails with the allocator's own torch.OutOfMemoryError."""
    async def main() -> None:
        steps = StepLoop(ckpt.load_span(FULL, "float32", "cuda"), lambda *a: None)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved() / total)
        hogs: list[torch.Tensor] = []
        try:
            with pytest.raises(torch.OutOfMemoryError):
                for _ in range(1_000_000):
                    hogs.append(torch.empty(512, dtype=torch.uint8, device="cuda"))
            with pytest.raises(SessionError, match=r"out of memory on .* KV cache of 256 tokens") as caught:
                await steps.new_cache(FULL, 256)
        finally:
            hogs.clear()
            torch.cuda.set_per_process_memory_fraction(1.0)
        assert caught.value.code == ErrorCode.LIMIT_EXCEEDED
        cache = await steps.new_cache(FULL, 64)  # the next session is served
        assert cache.max_length == 64
        await steps.stop()

    asyncio.run(main())


def test_an_oom_in_a_batched_step_on_cuda_fails_only_its_session(ckpt: Checkpoint) -> None:
    span: BlockSpan = ckpt.load_span(FULL, "float32", "cuda")
    steps = StepLoop(span, lambda *a: None)
    a, victim = _session(steps, "a"), _session(steps, "victim")
    sub = steps.sub_span(FULL)
    batch, single = sub.forward_batch, sub.forward

    def forward_batch(items):  # type: ignore[no-untyped-def]
        if any(c is victim.cache for _, c in items):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return batch(items)

    def forward(hidden, cache, *args, **kwargs):  # type: ignore[no-untyped-def]
        if cache is victim.cache:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return single(hidden, cache, *args, **kwargs)

    sub.forward_batch, sub.forward = forward_batch, forward  # type: ignore[method-assign]  # nn.Module calls forward
    x = torch.randn(3, 64)
    ra, rv = steps.execute([Piece(StepJob(a, 0, 0, encode_tensor(x), 0.0), 0, 3),
                            Piece(StepJob(victim, 0, 0, encode_tensor(x), 0.0), 0, 3)])
    assert ra is not None and ra.error is None and rv is not None and rv.error is not None
    assert rv.error.code == ErrorCode.LIMIT_EXCEEDED and torch.cuda.get_device_name(0) in str(rv.error)


def test_throughput_is_measured_with_synchronized_timers(ckpt: Checkpoint) -> None:
    span = ckpt.load_span(FULL, "bfloat16", "cuda")
    measured = measure_throughputs(span, 4, max_seconds=0.5)
    assert measured.single > 0 and measured.batch > 0
