"""Out of device memory is one session's refusal: fault injection (torch.OutOfMemoryError) into a real step loop
over a real tiny span; the other sessions' outputs equal an undisturbed run exactly and the loop keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from scheduler_helpers import NoOutbox

from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.kv_cache import KVCache
from meshinfer.models.span import BlockSpan
from meshinfer.server import runtime
from meshinfer.server.runtime import StepLoop
from meshinfer.server.scheduler import Finished, Piece
from meshinfer.server.session import Session, SessionError, StepJob
from meshinfer.types import BlockRange
from meshinfer.wire.messages import ErrorCode
from meshinfer.wire.tensor import decode_tensor, encode_tensor

FULL = BlockRange(0, 4)
OOM_TEXT = "CUDA out of memory. Tried to allocate 20.00 MiB"


@pytest.fixture(scope="module")
def served(ckpt: Checkpoint) -> BlockSpan:
    return ckpt.load_span(FULL)


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """Every release_cached call of the step loop (a no-op on the CPU, so only its calls are observable)."""
    calls: list[torch.device] = []
    monkeypatch.setattr(runtime, "release_cached", calls.append)
    return calls


def _session(steps: StepLoop, sid: str, max_length: int = 32) -> Session:
    return Session(sid, FULL, max_length, "float32", NoOutbox(), cache=steps.sub_span(FULL).new_cache(max_length))


def _job(session: Session, step_id: int, position: int, x: torch.Tensor) -> StepJob:
    return StepJob(session, step_id, position, encode_tensor(x), 0.0)


def _fail_for(sub: BlockSpan, victim: Callable[[], KVCache | None]) -> None:
    """Make ``sub`` raise torch.OutOfMemoryError whenever a call includes the victim's cache (batched or alone)."""
    batch, single = sub.forward_batch, sub.forward

    def forward_batch(items: Sequence[tuple[torch.Tensor, KVCache]]) -> list[torch.Tensor]:
        if any(cache is victim() for _, cache in items):
            raise torch.OutOfMemoryError(OOM_TEXT)
        return batch(items)

    def forward(hidden: torch.Tensor, cache: KVCache, *args: Any, **kwargs: Any) -> torch.Tensor:
        if cache is victim():
            raise torch.OutOfMemoryError(OOM_TEXT)
        return single(hidden, cache, *args, **kwargs)

    sub.forward_batch = forward_batch  # type: ignore[method-assign]
    sub.forward = forward  # type: ignore[method-assign]


def _inputs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randn(n, 64, generator=gen) for n in (3, 5, 4)]  # a, victim, c
    decodes = [torch.randn(1, 64, generator=gen) for _ in range(3)]
    return prompts, decodes


def _turn(steps: StepLoop, jobs: list[StepJob]) -> list[Any]:
    results = steps.execute([Piece(job, 0, job.tokens) for job in jobs])
    return results


def test_oom_in_a_batched_step_fails_only_that_session(served: BlockSpan, ckpt: Checkpoint,
                                                       released: list[torch.device]) -> None:
    prompts, decodes = _inputs()
    # undisturbed: the same sessions' first turn run alone (what the rerun after a failed batch computes)
    calm = StepLoop(ckpt.load_span(FULL), lambda *a: None)
    want = {}
    for sid, prompt in (("a", prompts[0]), ("c", prompts[2])):
        s = _session(calm, sid)
        (r,) = _turn(calm, [_job(s, 0, 0, prompt)])
        want[sid] = decode_tensor(r.output)

    steps = StepLoop(served.sub(FULL), lambda *a: None)  # its own BlockSpan object: the fault stays in this test
    a, victim, c = (_session(steps, sid) for sid in ("a", "victim", "c"))
    failing = [True]
    _fail_for(steps.sub_span(FULL), lambda: victim.cache if failing[0] else None)
    ra, rv, rc = _turn(steps, [_job(a, 0, 0, prompts[0]), _job(victim, 0, 0, prompts[1]), _job(c, 0, 0, prompts[2])])
    assert torch.equal(decode_tensor(ra.output), want["a"]) and torch.equal(decode_tensor(rc.output), want["c"])
    assert rv.output is None and isinstance(rv.error, SessionError)
    assert rv.error.code == ErrorCode.LIMIT_EXCEEDED
    assert "out of memory on cpu" in str(rv.error) and "5 tokens at position 0" in str(rv.error)
    assert victim.cache is not None and victim.cache.length == 0  # nothing of the failed step was kept
    assert (a.cache.length, c.cache.length) == (3, 4)
    assert released and all(d.type == "cpu" for d in released)  # the allocator's cache handed back

    # the loop carries on: the victim's retry and everyone's decode run together once memory is there
    failing[0] = False
    ra, rv, rc = _turn(steps, [_job(a, 1, 3, decodes[0]), _job(victim, 0, 0, prompts[1]), _job(c, 1, 4, decodes[2])])
    assert all(r is not None and r.error is None for r in (ra, rv, rc))
    ref = ckpt.load_span(FULL)
    cache = ref.new_cache(32)
    with torch.inference_mode():
        alone = ref(prompts[1][None], cache)[0]
    assert torch.allclose(decode_tensor(rv.output), alone, atol=1e-4)  # batched with others: float rounding only


def test_oom_allocating_a_kv_cache_refuses_that_session(served: BlockSpan, released: list[torch.device]) -> None:
    async def main() -> None:
        steps = StepLoop(served.sub(FULL), lambda *a: None)
        sub = steps.sub_span(BlockRange(1, 3))
        fine = sub.new_cache

        def new_cache(max_length: int, batch: int = 1) -> KVCache:
            if max_length > 100:
                raise torch.OutOfMemoryError(OOM_TEXT)
            return fine(max_length, batch)

        sub.new_cache = new_cache  # type: ignore[method-assign]
        with pytest.raises(SessionError, match=r"out of memory on cpu allocating a KV cache of 512 tokens for "
                                               r"blocks 1:3 \(0\.2 MiB\)") as caught:
            await steps.new_cache(BlockRange(1, 3), 512)
        assert caught.value.code == ErrorCode.LIMIT_EXCEEDED and released
        cache = await steps.new_cache(BlockRange(1, 3), 64)  # the next session is served
        assert cache.max_length == 64
        await steps.stop()

    asyncio.run(main())


def test_running_loop_survives_an_oom_and_keeps_serving(served: BlockSpan, released: list[torch.device]) -> None:
    delivered: list[Finished] = []

    async def main() -> None:
        steps = StepLoop(served.sub(FULL), delivered.extend)
        a, victim = _session(steps, "a"), _session(steps, "victim")
        _fail_for(steps.sub_span(FULL), lambda: victim.cache)
        steps.start()
        steps.submit(_job(victim, 0, 0, torch.randn(2, 64)))
        steps.submit(_job(a, 0, 0, torch.randn(2, 64)))
        for _ in range(200):
            if len(delivered) == 2:
                break
            await asyncio.sleep(0.02)
        steps.submit(_job(a, 1, 2, torch.randn(1, 64)))
        for _ in range(200):
            if len(delivered) == 3:
                break
            await asyncio.sleep(0.02)
        await steps.stop()

    asyncio.run(main())
    outcome = {(f.job.session.session_id, f.job.step_id): f for f in delivered}
    assert set(outcome) == {("victim", 0), ("a", 0), ("a", 1)}
    assert outcome["victim", 0].error is not None and outcome["victim", 0].error.code == ErrorCode.LIMIT_EXCEEDED
    assert outcome["a", 0].output is not None and outcome["a", 1].output is not None
