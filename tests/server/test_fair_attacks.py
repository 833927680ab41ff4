"""Issue 17 re-run against real servers (the package swarm: ``head`` 0:2 and ``tail`` 2:4 with the default
limits): a session flood from one peer is contained by the per-peer limits, a push into another client's
session is refused, a step holding NaN is refused, and a greedy peer at its limits does not keep another
peer from being served. Every attack comes from its own identity (a fresh ``Client``); honest outputs are
checked equal to the local computation each time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import pytest
import torch
from server_helpers import Client, Swarm, hop_of, server_threads

from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.server.push import PUSH_PROTOCOL
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Error, ErrorCode, Opened, Step, StepResult
from meshinfer.wire.tensor import decode_tensor, encode_tensor

pytestmark = pytest.mark.slow

HIDDEN = 64
DEFAULT_PEER_SESSIONS = 16
"""``--max-sessions-per-peer`` of a server with the default ``--max-sessions 32``."""


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=0.0, atol=1e-6)


@pytest.fixture(scope="module")
def spans(swarm: Swarm) -> dict[BlockRange, BlockSpan]:
    ckpt = Checkpoint(swarm.model_dir)
    return {r: ckpt.load_span(r) for r in (BlockRange(0, 4), BlockRange(0, 2))}


@pytest.fixture
def attacker(swarm: Swarm) -> Iterator[Client]:
    c = Client(swarm.bootstrap)  # an identity of its own
    try:
        yield c
    finally:
        c.close()


def local(span: BlockSpan, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    cache = span.new_cache(64)
    with server_threads(), torch.inference_mode():
        return [span(x.unsqueeze(0), cache)[0].clone() for x in xs]


def honest_route(swarm: Swarm, client: Client, spans: dict[BlockRange, BlockSpan], seed: int) -> None:
    """A push route head -> tail whose every output equals the whole model computed here."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(5, HIDDEN, generator=gen)] + [torch.randn(1, HIDDEN, generator=gen) for _ in range(3)]
    want = local(spans[BlockRange(0, 4)], xs)
    tail = client.open(swarm.tail, max_length=16, prev_peer=swarm.head.peer_id)
    head = client.open(swarm.head, max_length=16, route_tail=[hop_of(swarm.tail, tail.session_id)])
    position = 0
    for step_id, x in enumerate(xs):
        head.step(step_id, position, x)
        head.result(step_id)
        assert close(tail.result(step_id), want[step_id])
        position += x.shape[0]
    head.close_stream()
    tail.close_stream()


def test_a_session_flood_from_one_peer_is_contained(swarm: Swarm, client: Client, attacker: Client,
                                                    spans: dict[BlockRange, BlockSpan]) -> None:
    started = time.monotonic()
    flood = [attacker.try_open(swarm.head, max_length=256) for _ in range(32)]  # the whole context each
    replies = [s.recv() for s in flood]
    opened = [s for s, r in zip(flood, replies, strict=True) if isinstance(r, Opened)]
    refused = [r for r in replies if isinstance(r, Error)]
    assert time.monotonic() - started < 30
    assert len(opened) == DEFAULT_PEER_SESSIONS and len(refused) == 32 - DEFAULT_PEER_SESSIONS
    assert all(r.code == ErrorCode.OVERLOADED for r in refused)  # the client may try elsewhere, no lasting ban
    assert f"has {DEFAULT_PEER_SESSIONS} open sessions here (limit --max-sessions-per-peer " \
           f"{DEFAULT_PEER_SESSIONS})" in refused[0].message
    honest_route(swarm, client, spans, seed=11)  # another peer is still served, exactly
    for s in opened:
        s.close_stream()


def test_a_push_into_another_clients_session_is_refused(swarm: Swarm, client: Client, attacker: Client,
                                                        spans: dict[BlockRange, BlockSpan]) -> None:
    gen = torch.Generator().manual_seed(12)
    xs = [torch.randn(3, HIDDEN, generator=gen), torch.randn(1, HIDDEN, generator=gen)]
    want = local(spans[BlockRange(0, 4)], xs)
    tail = client.open(swarm.tail, max_length=16, prev_peer=swarm.head.peer_id)
    head = client.open(swarm.head, max_length=16, route_tail=[hop_of(swarm.tail, tail.session_id)])
    head.step(0, 0, xs[0])
    head.result(0)
    assert close(tail.result(0), want[0])
    # The attacker knows the victim's session id (every earlier hop learns it) and pushes a step that would
    # rewind the victim's cache to one token.
    push = attacker.run(attacker.node.open_stream(swarm.tail.peer_id, PUSH_PROTOCOL, maddrs=swarm.tail.maddrs))
    attacker.run(push.send(Step(session_id=tail.session_id, step_id=9, position=1,
                                hidden=encode_tensor(torch.randn(1, HIDDEN)))))
    reply = attacker.run(push.recv(10))
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_SESSION
    assert "accepts steps from peer" in reply.message and tail.session_id not in reply.message
    # ... and on a session stream of its own, without opening the session, it gets nowhere either.
    own = attacker.connect(swarm.tail)
    attacker.run(own.send(Step(session_id=tail.session_id, step_id=9, position=1,
                               hidden=encode_tensor(torch.randn(1, HIDDEN)))))
    assert isinstance(err := attacker.run(own.recv(10)), Error) and err.code == ErrorCode.UNKNOWN_SESSION
    head.step(1, 3, xs[1])  # the victim goes on as if nothing happened
    head.result(1)
    msg = tail.recv()
    assert isinstance(msg, StepResult) and msg.step_id == 1, msg
    assert close(decode_tensor(msg.hidden), want[1])
    attacker.run(push.close())
    attacker.run(own.close())
    head.close_stream()
    tail.close_stream()


def test_a_step_with_nan_or_inf_is_refused_and_the_session_kept(swarm: Swarm, attacker: Client,
                                                                spans: dict[BlockRange, BlockSpan]) -> None:
    x = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(13))
    (want,) = local(spans[BlockRange(0, 2)], [x])
    sess = attacker.open(swarm.head, max_length=16)
    sess.step(0, 0, x)
    assert close(sess.result(0), want)
    for step_id, value in ((1, float("nan")), (2, float("inf")), (3, float("-inf"))):
        bad = torch.randn(1, HIDDEN)
        bad[0, step_id] = value
        sess.step(step_id, 0, bad)  # would also rewind the cache to 0 if it were taken
        err = sess.error()
        assert (err.code, err.step_id) == (ErrorCode.BAD_REQUEST, step_id) and "NaN or inf" in err.message
    sess.step(4, 0, x)  # the session holds its 2 tokens still: replaying them gives the same output
    assert close(sess.result(4), want)
    sess.close_stream()


def test_a_greedy_peer_at_its_limits_does_not_keep_another_from_being_served(swarm: Swarm, client: Client,
                                                                             attacker: Client) -> None:
    def decode_latencies(n: int) -> list[float]:
        sess = client.open(swarm.head, max_length=n + 8)
        sess.step(0, 0, torch.randn(4, HIDDEN))
        sess.result(0)
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            sess.step(i + 1, 4 + i, torch.randn(1, HIDDEN))
            sess.result(i + 1)
            lat.append(time.perf_counter() - t0)
        sess.close_stream()
        return lat

    idle_round = decode_latencies(30)
    greedy = [attacker.open(swarm.head, max_length=256) for _ in range(DEFAULT_PEER_SESSIONS)]
    big = torch.randn(256, HIDDEN)
    for s in greedy:  # 16 prefills of a whole context queued on each session: 256 steps, 64k tokens
        for k in range(16):
            s.step(k, 0, big)
    loaded = statistics.median(decode_latencies(30))
    for s in greedy:
        s.close_stream()
    idle = statistics.median(idle_round + decode_latencies(30))  # before and after: the machine is shared
    ratio = loaded / idle
    print(f"decode latency idle {idle * 1000:.2f} ms, next to a greedy peer {loaded * 1000:.2f} ms: x{ratio:.2f}")
    # Loose: this 2-core machine is shared and the greedy peer runs in this very process (one GIL with the victim);
    # scripts/attacks/fair_attacks.py measures 6-11 ms next to a greedy peer (52-123 ms before) on the demo model.
    assert ratio < 8.0
