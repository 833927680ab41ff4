"""The step loop in-process (no network): scheduling order, exact execution, sub-spans, positions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.server.runtime import StepLoop
from meshinfer.server.session import Session, SessionError, StepJob
from meshinfer.types import BlockRange
from meshinfer.wire.messages import ErrorCode
from meshinfer.wire.tensor import Tensor, decode_tensor, encode_tensor


class _NoOutbox:
    async def send(self, msg: object) -> None:
        raise AssertionError("the runtime never sends")


@pytest.fixture(scope="module")
def ckpt(meshinfer_cache_dir: Path) -> Checkpoint:
    from meshinfer.testing.checkpoints import tiny_checkpoint

    return Checkpoint(tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def served(ckpt: Checkpoint) -> BlockSpan:
    return ckpt.load_span(BlockRange(0, 4))


def _session(loop: StepLoop, span: BlockRange, sid: str = "s", max_length: int = 32, dtype: str = "float32") -> Session:
    sub = loop.sub_span(span)
    return Session(sid, span, max_length, dtype, _NoOutbox(), cache=sub.new_cache(max_length))


def _job(session: Session, step_id: int, position: int, x: torch.Tensor, arrived: float = 0.0) -> StepJob:
    return StepJob(session, step_id, position, encode_tensor(x.to(getattr(torch, session.dtype))), arrived)


def _run(loop: StepLoop, job: StepJob) -> torch.Tensor:
    ((out, err),) = loop.execute([job])
    assert err is None, err
    assert out is not None
    return decode_tensor(out)


def test_schedule_runs_decode_first_and_keeps_each_session_in_order(served: BlockSpan) -> None:
    loop = StepLoop(served, lambda *a: None)
    a, b, c = (_session(loop, BlockRange(0, 4), sid) for sid in "abc")
    x1, x5 = torch.zeros(1, 64), torch.zeros(5, 64)
    loop.submit(_job(a, 0, 0, x5, arrived=1.0))  # prefill, oldest
    loop.submit(_job(a, 1, 5, x1, arrived=2.0))  # decode, but behind a's prefill
    loop.submit(_job(b, 0, 0, x1, arrived=3.0))  # decode
    loop.submit(_job(c, 0, 0, x1, arrived=4.0))  # decode, newer
    order = []
    while jobs := loop.schedule():
        (job,) = jobs
        order.append((job.session.session_id, job.step_id))
    assert order == [("b", 0), ("c", 0), ("a", 0), ("a", 1)]


def test_execute_matches_local_span_and_rewinds(served: BlockSpan, ckpt: Checkpoint) -> None:
    loop = StepLoop(served, lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 64, generator=gen), torch.randn(1, 64, generator=gen), torch.randn(1, 64, generator=gen)]
    for blocks in (BlockRange(0, 4), BlockRange(1, 3)):
        local = ckpt.load_span(blocks)
        cache = local.new_cache(32)
        with torch.inference_mode():
            want = [local(x.unsqueeze(0), cache)[0] for x in xs]
        session = _session(loop, blocks)
        position = 0
        for i, x in enumerate(xs):
            assert torch.equal(_run(loop, _job(session, i, position, x)), want[i])
            position += x.shape[0]
        assert session.cache.length == 8 and session.cache.num_blocks == len(blocks)
        # Rewind to position 6 and redo the first decode step: same output as the first time.
        assert torch.equal(_run(loop, _job(session, 9, 6, xs[1])), want[1])
        assert session.cache.length == 7


def test_execute_refuses_a_gap_and_reports_per_step(served: BlockSpan) -> None:
    loop = StepLoop(served, lambda *a: None)
    session = _session(loop, BlockRange(0, 2))
    ok, gap = loop.execute([_job(session, 0, 0, torch.zeros(2, 64)), _job(session, 1, 5, torch.zeros(1, 64))])
    assert ok[1] is None and ok[0] is not None
    assert gap[0] is None and isinstance(gap[1], SessionError)
    assert gap[1].code == ErrorCode.BAD_REQUEST and "holds only 2 tokens" in str(gap[1])
    assert session.cache.length == 2  # the refused step changed nothing


def test_session_dtype_differs_from_compute_dtype(served: BlockSpan) -> None:
    loop = StepLoop(served, lambda *a: None)
    session = _session(loop, BlockRange(0, 4), dtype="bfloat16")
    out = _run(loop, _job(session, 0, 0, torch.randn(3, 64)))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 64)


def test_loop_delivers_in_order_and_skips_ended_sessions(served: BlockSpan) -> None:
    delivered: list[tuple[str, int, Tensor | None, SessionError | None]] = []

    async def main() -> None:
        loop = StepLoop(served, lambda job, out, err: delivered.append((job.session.session_id, job.step_id, out, err)))
        a = _session(loop, BlockRange(0, 4), "a")
        gone = _session(loop, BlockRange(0, 4), "gone")
        loop.start()
        for i in range(3):
            loop.submit(_job(a, i, 2 * i, torch.randn(2, 64)))
        loop.submit(_job(gone, 0, 0, torch.randn(2, 64)))
        gone.ended = True
        loop.drop(gone)
        for _ in range(200):
            if len(delivered) == 3:
                break
            await asyncio.sleep(0.02)
        await loop.stop()
        assert a.last_step_id == 2 and a.idle and not a.queued_ids

    asyncio.run(main())
    assert [(sid, i) for sid, i, _, _ in delivered] == [("a", 0), ("a", 1), ("a", 2)]
    assert all(out is not None and err is None for _, _, out, err in delivered)


def test_sub_span_shares_weights(served: BlockSpan) -> None:
    loop = StepLoop(served, lambda *a: None)
    sub = loop.sub_span(BlockRange(1, 3))
    assert sub.layers[0] is served.layers[1] and loop.sub_span(BlockRange(1, 3)) is sub
    with pytest.raises(Exception, match="not inside the served span"):
        loop.sub_span(BlockRange(2, 5))
