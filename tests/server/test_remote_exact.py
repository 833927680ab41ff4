"""Remote spans compute exactly what the local engine computes, step by step, including push routes.

Each test drives real ``meshinfer serve`` processes through the raw session protocol and compares
every output with a ``BlockSpan`` loaded in the test process from the same checkpoint (fp32).
"""

from __future__ import annotations

import pytest
import torch
from server_helpers import Client, Swarm, hop_of, new_session_id, server_threads

from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Error, ErrorCode, StepResult
from meshinfer.wire.tensor import decode_tensor

pytestmark = pytest.mark.slow

HIDDEN = 64
PREFILL = 7
DECODE_STEPS = 4


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=0.0, atol=1e-6)


@pytest.fixture(scope="module")
def local_spans(swarm: Swarm) -> dict[BlockRange, BlockSpan]:
    ckpt = Checkpoint(swarm.model_dir)
    return {r: ckpt.load_span(r) for r in (BlockRange(0, 4), BlockRange(0, 2), BlockRange(2, 4), BlockRange(1, 3))}


def inputs(seed: int) -> list[torch.Tensor]:
    """A prefill chunk then single-token steps: [T, H] each."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(PREFILL, HIDDEN, generator=gen)] + [torch.randn(1, HIDDEN, generator=gen)
                                                           for _ in range(DECODE_STEPS)]


def local_outputs(span: BlockSpan, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The span's outputs computed here with the servers' thread count (same float sums, same bits)."""
    cache = span.new_cache(64)
    with server_threads(), torch.inference_mode():
        return [span(x.unsqueeze(0), cache)[0].clone() for x in xs]


@pytest.mark.parametrize("blocks", ["0:4", "1:3"], ids=["whole-span", "sub-span"])
def test_remote_span_equals_local(swarm: Swarm, client: Client, local_spans, blocks: str) -> None:
    span = BlockRange.parse(blocks)
    xs = inputs(seed=1)
    expected = local_outputs(local_spans[span], xs)
    sess = client.open(swarm.full, span, max_length=64)
    position = 0
    for step_id, (x, want) in enumerate(zip(xs, expected, strict=True)):
        sess.step(step_id, position, x)
        got = sess.result(step_id)
        assert close(got, want), f"step {step_id}: max diff {(got - want).abs().max().item()}"
        position += x.shape[0]
    # A repeated step id is answered from the last result, not recomputed (the cache stays put) ...
    sess.step(DECODE_STEPS, position - 1, xs[-1])
    assert close(sess.result(DECODE_STEPS), expected[-1])
    # ... and rewinding to an earlier position recomputes from there, exactly like a fresh cache.
    sess.step(DECODE_STEPS + 1, PREFILL, xs[1])
    assert close(sess.result(DECODE_STEPS + 1), expected[1])
    sess.close_stream()


def test_push_route_equals_whole_model(swarm: Swarm, client: Client, local_spans) -> None:
    """A step sent only to the first server comes back from the last one, equal to all blocks locally."""
    xs = inputs(seed=2)
    whole = local_outputs(local_spans[BlockRange(0, 4)], xs)
    first_half = local_outputs(local_spans[BlockRange(0, 2)], xs)
    tail = client.open(swarm.tail, max_length=32, prev_peer=swarm.head.peer_id)
    head = client.open(swarm.head, max_length=32, route_tail=[hop_of(swarm.tail, tail.session_id)])
    position = 0
    for step_id, x in enumerate(xs):
        head.step(step_id, position, x)
        assert close(head.result(step_id), first_half[step_id])  # every hop returns its output too
        got = tail.result(step_id)  # the last server's answer: nobody sent it a step directly
        assert close(got, whole[step_id]), f"step {step_id}: max diff {(got - whole[step_id]).abs().max().item()}"
        position += x.shape[0]
    # The client may also drive the second hop itself with the first hop's output (fallback mode):
    # a step id the tail already computed (it was pushed) is answered again, not recomputed.
    head_out = first_half[-1]
    tail.step(len(xs) - 1, position - 1, head_out)
    assert close(tail.result(len(xs) - 1), whole[-1])
    head.close_stream()
    tail.close_stream()


def test_push_to_unknown_session_reports_next_hop_failed(swarm: Swarm, client: Client, local_spans) -> None:
    ghost = new_session_id()  # never opened on the tail server
    head = client.open(swarm.head, max_length=16, route_tail=[hop_of(swarm.tail, ghost)])
    x = inputs(seed=3)[0]
    head.step(0, 0, x)
    assert close(head.result(0), local_outputs(local_spans[BlockRange(0, 2)], [x])[0])
    err = head.error()
    assert (err.code, err.session_id, err.step_id) == (ErrorCode.NEXT_HOP_FAILED, head.session_id, 0)
    assert swarm.tail.peer_id in err.message and "unknown_session" in err.message
    head.close_stream()


def test_two_hops_on_one_server(swarm: Swarm, client: Client, local_spans) -> None:
    """A route may use the same server twice (0:2 then 2:4 on the full node): pushed locally."""
    xs = inputs(seed=4)[:2]
    whole = local_outputs(local_spans[BlockRange(0, 4)], xs)
    second = client.open(swarm.full, BlockRange(2, 4), max_length=16, prev_peer=swarm.full.peer_id)
    first = client.open(swarm.full, BlockRange(0, 2), max_length=16,
                        route_tail=[hop_of(swarm.full, second.session_id, BlockRange(2, 4))])
    first.step(0, 0, xs[0])
    first.result(0)
    assert close(second.result(0), whole[0])
    first.step(1, PREFILL, xs[1])
    first.result(1)
    msg = second.recv()
    assert isinstance(msg, StepResult) and not isinstance(msg, Error)
    assert close(decode_tensor(msg.hidden), whole[1])
    first.close_stream()
    second.close_stream()

