"""The step loop in-process (no network): batching policy, exact execution, chunked prefill, sub-spans."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from fakes import NoOutbox
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.server.runtime import StepLoop
from meshinfer.server.scheduler import Piece
from meshinfer.server.session import Session, SessionError, StepJob
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Burst, ErrorCode
from meshinfer.wire.tensor import Tensor, decode_tensor, encode_tensor


@pytest.fixture(scope="module")
def served(ckpt: Checkpoint) -> BlockSpan:
    return ckpt.load_span(BlockRange(0, 4))


def _session(steps: StepLoop, span: BlockRange, sid: str = "s", max_length: int = 32,
             dtype: str = "float32") -> Session:
    sub = steps.sub_span(span)
    return Session(sid, span, max_length, dtype, NoOutbox(), cache=sub.new_cache(max_length))


def _job(session: Session, step_id: int, position: int, x: torch.Tensor, arrived: float = 0.0,
         burst: Burst | None = None) -> StepJob:
    return StepJob(session, step_id, position, encode_tensor(x.to(getattr(torch, session.dtype))), arrived,
                   burst=burst)


def _run(steps: StepLoop, job: StepJob) -> torch.Tensor:
    (result,) = steps.execute([Piece(job, 0, job.tokens)])
    assert result is not None
    assert result.error is None, result.error
    assert result.output is not None
    return decode_tensor(result.output)


def _turns(steps: StepLoop) -> list[list[tuple[str, int, int]]]:
    """Run turns until nothing is waiting; each turn as (session, step id, tokens computed)."""
    turns = []
    while pieces := steps.schedule():
        turns.append([(p.job.session.session_id, p.job.step_id, p.count) for p in pieces])
        steps.deliver(pieces, steps.execute(pieces))
    return turns


def test_schedule_batches_decode_first_and_keeps_each_session_in_order(served: BlockSpan) -> None:
    steps = StepLoop(served, lambda *a: None)
    a, b, c = (_session(steps, BlockRange(0, 4), sid) for sid in "abc")
    x1, x5 = torch.zeros(1, 64), torch.zeros(5, 64)
    steps.submit(_job(a, 0, 0, x5, arrived=1.0))  # prefill, oldest
    steps.submit(_job(a, 1, 5, x1, arrived=2.0))  # decode, but behind a's prefill
    steps.submit(_job(b, 0, 0, x1, arrived=3.0))  # decode
    steps.submit(_job(c, 0, 0, x1, arrived=4.0))  # decode, newer
    assert _turns(steps) == [[("b", 0, 1), ("c", 0, 1), ("a", 0, 5)], [("a", 1, 1)]]
    assert [s.cache.length for s in (a, b, c)] == [6, 1, 1] and not steps.queued_steps


def test_long_prefill_is_chunked_and_never_stalls_decode(served: BlockSpan, ckpt: Checkpoint) -> None:
    steps = StepLoop(served, lambda *a: None, max_batch_tokens=4)
    gen = torch.Generator().manual_seed(1)
    long_prompt, short = torch.randn(10, 64, generator=gen), torch.randn(3, 64, generator=gen)
    a, b = _session(steps, BlockRange(0, 4), "a"), _session(steps, BlockRange(0, 4), "b")
    assert torch.allclose(_run(steps, _job(b, 0, 0, short)), _reference(ckpt, [short])[0], atol=1e-5)
    steps.submit(_job(a, 0, 0, long_prompt, arrived=1.0))
    xs = [torch.randn(1, 64, generator=gen) for _ in range(3)]
    steps.submit(_job(b, 1, 3, xs[0], arrived=2.0))
    turn = steps.schedule()  # b's decode and the first 3-token chunk of a's prefill
    assert [(p.job.session.session_id, p.start, p.count) for p in turn] == [("b", 0, 1), ("a", 0, 3)]
    results = steps.execute(turn)
    assert results[1] is None  # a's step is not finished: nothing delivered for it yet
    steps.deliver(turn, results)
    for i, x in enumerate(xs[1:], start=2):  # b keeps decoding while a's chunks go through
        steps.submit(_job(b, i, 2 + i, x, arrived=2.0 + i))
        turn = steps.schedule()
        assert turn[0].job.session is b and turn[0].count == 1
        assert turn[1].job.session is a and turn[1].count == 3
        steps.deliver(turn, steps.execute(turn))
    assert _turns(steps) == [[("a", 0, 1)]]  # the last chunk
    assert a.last_output is not None and a.cache.length == 10
    chunked = decode_tensor(a.last_output)
    assert torch.allclose(chunked, _reference(ckpt, [long_prompt])[0], atol=1e-4)
    assert b.cache.length == 6


def _reference(ckpt: Checkpoint, xs: list[torch.Tensor], blocks: BlockRange = BlockRange(0, 4)) -> list[torch.Tensor]:
    local = ckpt.load_span(blocks)
    cache = local.new_cache(32)
    with torch.inference_mode():
        return [local(x.unsqueeze(0), cache)[0] for x in xs]


def test_batched_turn_equals_each_session_alone(served: BlockSpan, ckpt: Checkpoint) -> None:
    steps = StepLoop(served, lambda *a: None)
    gen = torch.Generator().manual_seed(2)
    sessions = [_session(steps, BlockRange(0, 4), f"s{i}") for i in range(5)]
    prompts = [torch.randn(n, 64, generator=gen) for n in (1, 3, 4, 7, 2)]
    decodes = [[torch.randn(1, 64, generator=gen) for _ in range(4)] for _ in sessions]
    want = [_reference(ckpt, [p, *st]) for p, st in zip(prompts, decodes, strict=True)]
    for i, (session, prompt) in enumerate(zip(sessions, prompts, strict=True)):
        steps.submit(_job(session, 0, 0, prompt, arrived=float(i)))
    turns = _turns(steps)
    assert len(turns) == 1 and len(turns[0]) == 5  # all prefills in one turn
    for k in range(4):
        for i, session in enumerate(sessions):
            steps.submit(_job(session, k + 1, prompts[i].shape[0] + k, decodes[i][k], arrived=10.0 + k))
        (turn,) = _turns(steps)
        assert len(turn) == 5  # every session's decode step in one batched turn
        for i, session in enumerate(sessions):
            assert session.last_output is not None
            assert torch.allclose(decode_tensor(session.last_output), want[i][k + 1], atol=1e-4)


def test_execute_matches_local_span_and_rewinds(served: BlockSpan, ckpt: Checkpoint) -> None:
    steps = StepLoop(served, lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 64, generator=gen), torch.randn(1, 64, generator=gen), torch.randn(1, 64, generator=gen)]
    for blocks in (BlockRange(0, 4), BlockRange(1, 3)):
        local = ckpt.load_span(blocks)
        cache = local.new_cache(32)
        with torch.inference_mode():
            want = [local(x.unsqueeze(0), cache)[0] for x in xs]
        session = _session(steps, blocks)
        position = 0
        for i, x in enumerate(xs):
            assert torch.equal(_run(steps, _job(session, i, position, x)), want[i])
            position += x.shape[0]
        assert session.cache.length == 8 and session.cache.num_blocks == len(blocks)
        # Rewind to position 6 and redo the first decode step: same output as the first time.
        assert torch.equal(_run(steps, _job(session, 9, 6, xs[1])), want[1])
        assert session.cache.length == 7


def test_execute_refuses_a_gap_and_reports_per_step(served: BlockSpan) -> None:
    steps = StepLoop(served, lambda *a: None)
    session = _session(steps, BlockRange(0, 2))
    other = _session(steps, BlockRange(0, 4), "other")
    _run(steps, _job(session, 0, 0, torch.zeros(2, 64)))
    bad, fine = steps.execute([Piece(_job(session, 1, 5, torch.zeros(1, 64)), 0, 1),
                              Piece(_job(other, 0, 0, torch.zeros(1, 64)), 0, 1)])
    assert fine is not None and fine.output is not None and fine.error is None  # the other session is unaffected
    assert bad is not None and bad.error is not None
    assert bad.error.code == ErrorCode.BAD_REQUEST and "holds only 2 tokens" in str(bad.error)
    assert session.cache.length == 2  # the refused step changed nothing


def test_session_dtype_differs_from_compute_dtype(served: BlockSpan) -> None:
    steps = StepLoop(served, lambda *a: None)
    session = _session(steps, BlockRange(0, 4), dtype="bfloat16")
    out = _run(steps, _job(session, 0, 0, torch.randn(3, 64)))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 64)


def test_loop_delivers_in_order_and_skips_ended_sessions(served: BlockSpan) -> None:
    delivered: list[tuple[str, int, Tensor | None, SessionError | None]] = []

    async def main() -> None:
        steps = StepLoop(served, lambda finished: delivered.extend(
            (f.job.session.session_id, f.job.step_id, f.output, f.error) for f in finished))
        a = _session(steps, BlockRange(0, 4), "a")
        gone = _session(steps, BlockRange(0, 4), "gone")
        steps.start()
        for i in range(3):
            steps.submit(_job(a, i, 2 * i, torch.randn(2, 64)))
        steps.submit(_job(gone, 0, 0, torch.randn(2, 64)))
        gone.ended = True
        steps.drop(gone)
        for _ in range(200):
            if len(delivered) == 3:
                break
            await asyncio.sleep(0.02)
        await steps.stop()
        assert a.last_step_id == 2 and a.idle and not a.queued_ids

    asyncio.run(main())
    assert [(sid, i) for sid, i, _, _ in delivered] == [("a", 0), ("a", 1), ("a", 2)]
    assert all(out is not None and err is None for _, _, out, err in delivered)


def test_sub_span_shares_weights(served: BlockSpan) -> None:
    steps = StepLoop(served, lambda *a: None)
    sub = steps.sub_span(BlockRange(1, 3))
    assert sub.layers[0] is served.layers[1] and steps.sub_span(BlockRange(1, 3)) is sub
    with pytest.raises(Exception, match="not inside the served span"):
        steps.sub_span(BlockRange(2, 5))


def test_a_burst_is_held_until_its_last_member_arrives_then_runs_as_one_turn(served: BlockSpan) -> None:
    steps = StepLoop(served, lambda finished: None, burst_hold_s=60.0)
    a, b, c = (_session(steps, BlockRange(0, 4), sid) for sid in "abc")
    x = torch.randn(1, 64)
    tag = Burst(id=9, size=2)
    steps.submit(_job(a, 0, 0, x, time.monotonic(), burst=tag))
    steps.submit(_job(c, 0, 0, x, time.monotonic()))  # untagged: never held
    assert _turns(steps) == [[("c", 0, 1)]]  # a waits for the rest of its burst; c is not held back meanwhile
    assert steps.schedule() == [] and steps.queued_steps == 1
    steps.submit(_job(b, 0, 0, x, time.monotonic(), burst=tag))
    assert _turns(steps) == [[("a", 0, 1), ("b", 0, 1)]]


def test_an_incomplete_burst_runs_once_its_hold_ends(served: BlockSpan) -> None:
    delivered: list[int] = []

    async def main() -> None:
        steps = StepLoop(served, lambda finished: delivered.extend(f.job.step_id for f in finished),
                        burst_hold_s=0.3)
        a = _session(steps, BlockRange(0, 4), "a")
        steps.start()
        steps.submit(_job(a, 0, 0, torch.randn(1, 64), time.monotonic(), burst=Burst(id=1, size=5)))  # 4 never come
        await asyncio.sleep(0.05)
        assert delivered == []  # still held
        for _ in range(250):
            if delivered:
                break
            await asyncio.sleep(0.02)
        await steps.stop()

    asyncio.run(main())
    assert delivered == [0]
