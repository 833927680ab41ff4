"""Bad input to a real server gets typed errors; a healthy session keeps working; memory comes back.

All tests talk to the swarm's full node (blocks 0:4, KV budget 512 tokens, at most 4 sessions, at
most 64 tokens per step) while one healthy session stays open on it for the whole module and is
checked against the local engine after each test. Memory is read where clients read it: the
``cache_tokens_left`` the server announces in the DHT.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import torch
from server_helpers import (
    FULL_CACHE_TOKENS,
    FULL_MAX_SESSIONS,
    FULL_MAX_STEP_TOKENS,
    Client,
    RemoteSession,
    Swarm,
    hop_of,
    server_threads,
    wait_until,
)

from meshinfer.errors import TransportError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.testing.procs import ManagedProcess, wait_gone
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Close, Error, ErrorCode, Open, Opened, Ping, Pong, Step
from meshinfer.wire.tensor import Tensor

pytestmark = pytest.mark.slow

HIDDEN = 64
HEALTHY_LENGTH = 64
BASELINE = FULL_CACHE_TOKENS - HEALTHY_LENGTH  # announced while only the healthy session is open
NUM_BLOCKS = 4


class Healthy:
    """A session that must keep producing exact outputs whatever other clients do."""

    def __init__(self, client: Client, swarm: Swarm, local: BlockSpan) -> None:
        self.sess = client.open(swarm.full, max_length=HEALTHY_LENGTH)
        self.local, self.cache = local, local.new_cache(HEALTHY_LENGTH)
        self.step_id = self.position = 0
        self.gen = torch.Generator().manual_seed(11)

    def check(self) -> None:
        x = torch.randn(3 if self.position == 0 else 1, HIDDEN, generator=self.gen)  # [T, H]
        self.sess.step(self.step_id, self.position, x)
        got = self.sess.result(self.step_id)
        with server_threads(), torch.inference_mode():
            want = self.local(x.unsqueeze(0), self.cache)[0]
        assert torch.allclose(got, want, rtol=0.0, atol=1e-6)
        self.step_id += 1
        self.position += x.shape[0]


@pytest.fixture(scope="module")
def healthy(swarm: Swarm, client: Client) -> Iterator[Healthy]:
    h = Healthy(client, swarm, Checkpoint(swarm.model_dir).load_span(BlockRange(0, NUM_BLOCKS)))
    h.check()
    yield h
    h.sess.send(Close(session_id=h.sess.session_id))
    assert wait_until(lambda: client.cache_tokens_left(swarm.full, NUM_BLOCKS) == FULL_CACHE_TOKENS, 20), \
        "memory did not return to the full budget after the healthy session closed"


@pytest.fixture()
def at_baseline(swarm: Swarm, client: Client, healthy: Healthy) -> Iterator[None]:
    """Each test starts and ends with only the healthy session holding memory (and it still works)."""
    def left() -> int | None:
        return client.cache_tokens_left(swarm.full, NUM_BLOCKS)

    assert wait_until(lambda: left() == BASELINE, 20), f"start: {left()} tokens left, want {BASELINE}"
    yield
    healthy.check()
    assert wait_until(lambda: left() == BASELINE, 20), f"end: {left()} tokens left, want {BASELINE}"


def expect_error(sess: RemoteSession, code: str, text: str = "") -> Error:
    err = sess.error()
    assert err.code == code, err
    assert text in err.message, err
    return err


def test_open_refusals(swarm: Swarm, client: Client, at_baseline: None) -> None:
    cases = [
        (dict(model="0" * 32), ErrorCode.UNKNOWN_MODEL, "not 0000"),
        (dict(span=BlockRange(2, 6)), ErrorCode.SPAN_NOT_SERVED, "serves blocks 0:4"),
        (dict(max_length=1000), ErrorCode.LIMIT_EXCEEDED, "context of 256"),
        (dict(span=BlockRange(0, 2), route_tail=[hop_of(swarm.tail, "x", BlockRange(3, 4))]),
         ErrorCode.BAD_REQUEST, "continue at block 2"),
    ]
    for kwargs, code, text in cases:
        sess = client.try_open(swarm.full, **kwargs)  # type: ignore[arg-type]
        err = expect_error(sess, code, text)
        assert err.session_id == sess.session_id
        sess.close_stream()
    sess = client.try_open(swarm.head, BlockRange(1, 3))
    expect_error(sess, ErrorCode.SPAN_NOT_SERVED, "serves blocks 0:2")
    sess.close_stream()
    # A wire-level bad Open (unknown dtype) is refused by the decoder: bad_request.
    sess = client.try_open(swarm.full, dtype="int8")
    expect_error(sess, ErrorCode.BAD_REQUEST, "dtype")
    sess.close_stream()


def test_admission_by_kv_budget_and_session_limit(swarm: Swarm, client: Client, at_baseline: None) -> None:
    big = client.open(swarm.full, max_length=256)
    sess = client.try_open(swarm.full, max_length=256)
    expect_error(sess, ErrorCode.OVERLOADED, f"asks for 256 tokens, {BASELINE - 256} of {FULL_CACHE_TOKENS} left")
    # The refused stream may try again with what fits.
    sess.send(Open(session_id=sess.session_id, model=swarm.full.model_id, span=BlockRange(0, 4), max_length=16,
                   dtype="float32"))
    assert isinstance(sess.recv(), Opened)
    assert FULL_MAX_SESSIONS == 4  # healthy + big + sess + one more
    last = client.open(swarm.full, max_length=8)
    over = client.try_open(swarm.full, max_length=8)
    expect_error(over, ErrorCode.OVERLOADED, "limit of 4 open sessions")
    assert wait_until(lambda: client.cache_tokens_left(swarm.full, NUM_BLOCKS) == BASELINE - 256 - 16 - 8, 20)
    for s in (big, sess, last, over):
        s.close_stream()


def _tensor(shape: list[int], dtype: str = "float32") -> Tensor:
    n = 1
    for d in shape:
        n *= d
    return Tensor(dtype=dtype, shape=shape, data=bytes(n * (4 if dtype == "float32" else 2)))


def test_step_refusals(swarm: Swarm, client: Client, at_baseline: None) -> None:
    stray = client.connect(swarm.full)  # no Open on this stream
    client.run(stray.send(Step(session_id="nobody", step_id=0, position=0, hidden=_tensor([1, HIDDEN]))))
    err = client.run(stray.recv(10))
    assert isinstance(err, Error) and err.code == ErrorCode.UNKNOWN_SESSION
    client.run(stray.close())

    sess = client.open(swarm.full, max_length=16)
    sid = sess.session_id
    bad = [
        (Step(session_id=sid, step_id=0, position=0, hidden=_tensor([2, HIDDEN + 1])), ErrorCode.BAD_REQUEST,
         "hidden size 65"),
        (Step(session_id=sid, step_id=0, position=0, hidden=_tensor([2, HIDDEN], "float16")), ErrorCode.BAD_REQUEST,
         "opened with dtype float32"),
        (Step(session_id=sid, step_id=0, position=0, hidden=_tensor([1, 2, HIDDEN])), ErrorCode.BAD_REQUEST,
         "shape [tokens, 64]"),
        (Step(session_id=sid, step_id=0, position=15, hidden=_tensor([2, HIDDEN])), ErrorCode.LIMIT_EXCEEDED,
         "max length 16"),
        (Step(session_id=sid, step_id=0, position=0, hidden=_tensor([FULL_MAX_STEP_TOKENS + 1, HIDDEN])),
         ErrorCode.LIMIT_EXCEEDED, "limit of 64 per step"),
        (Step(session_id=sid, step_id=0, position=0, hidden=_tensor([4097, HIDDEN])), ErrorCode.LIMIT_EXCEEDED,
         "max tokens per step"),
        (Step(session_id=sid, step_id=0, position=5, hidden=_tensor([1, HIDDEN])), ErrorCode.BAD_REQUEST,
         "holds only 0 tokens"),
        (Step(session_id="someone-else", step_id=0, position=0, hidden=_tensor([1, HIDDEN])),
         ErrorCode.UNKNOWN_SESSION, "not someone-…"),
    ]
    for msg, code, text in bad:
        sess.send(msg)
        expect_error(sess, code, text)
    # The session itself is still fine: a good step, then a step id older than it is refused.
    sess.step(3, 0, torch.randn(2, HIDDEN))
    sess.result(3)
    sess.step(2, 2, torch.randn(1, HIDDEN))
    expect_error(sess, ErrorCode.BAD_REQUEST, "older than the last computed step 3")
    sess.send(Close(session_id=sid))


def test_garbage_bytes(swarm: Swarm, client: Client, at_baseline: None) -> None:
    sess = client.open(swarm.full, max_length=32)
    # Well-framed but undecodable payloads are answered and skipped: the session goes on.
    client.run(sess.stream.send_bytes(b"\xc1\xff not msgpack"))
    expect_error(sess, ErrorCode.BAD_REQUEST, "malformed")
    client.run(sess.stream.send_bytes(msgspec.msgpack.encode({"type": "ping", "seq": 1, "v": 99})))
    expect_error(sess, ErrorCode.VERSION_MISMATCH, "version 99")
    sess.send(Ping(seq=7, payload=b"still there?"))
    pong = sess.recv()
    assert isinstance(pong, Pong) and pong.seq == 7
    # Bytes that are not even frames break the stream: typed error, then the server hangs up.
    sess.write_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    expect_error(sess, ErrorCode.BAD_REQUEST, "frame")
    with pytest.raises(TransportError):
        sess.recv(timeout=10)
    sess.close_stream()


def test_client_vanishing_mid_session(swarm: Swarm, client: Client, at_baseline: None) -> None:
    # 1. The stream simply drops (no Close): the server ends the session and frees its memory.
    sess = client.open(swarm.full, max_length=100)
    sess.step(0, 0, torch.randn(4, HIDDEN))
    sess.result(0)
    assert wait_until(lambda: client.cache_tokens_left(swarm.full, NUM_BLOCKS) == BASELINE - 100, 20)
    sess.close_stream()
    assert wait_until(lambda: client.cache_tokens_left(swarm.full, NUM_BLOCKS) == BASELINE, 20)

    # 2. A client process is SIGKILLed mid-session.
    spec = {"initial_peers": swarm.bootstrap, "peer_id": swarm.full.peer_id, "maddrs": swarm.full.maddrs,
            "model_id": swarm.full.model_id, "blocks": "0:4", "max_length": 120}
    proc = ManagedProcess([sys.executable, str(Path(__file__).with_name("vanishing_client.py")), json.dumps(spec)],
                          name="vanishing client")
    try:
        proc.read_json(timeout=90)
        assert wait_until(lambda: client.cache_tokens_left(swarm.full, NUM_BLOCKS) == BASELINE - 120, 20)
        kids = proc.descendants()
        proc.kill(signal.SIGKILL)
        proc.proc.wait(timeout=10)
        assert not wait_gone(kids, 10), "the killed client's p2pd outlived it"
    finally:
        proc.stop()
    assert wait_until(lambda: client.cache_tokens_left(swarm.full, NUM_BLOCKS) == BASELINE, 30), \
        "memory of the vanished client's session was not released"


def test_pushed_steps_are_checked_like_client_steps(swarm: Swarm, client: Client) -> None:
    """A bad step pushed by a previous hop reaches the next hop's client as a typed error."""
    tail = client.open(swarm.tail, max_length=4, prev_peer=swarm.head.peer_id)
    head = client.open(swarm.head, max_length=16, route_tail=[hop_of(swarm.tail, tail.session_id)])
    head.step(0, 0, torch.randn(6, HIDDEN))  # fits the head's 16 tokens, not the tail's 4
    head.result(0)
    err = expect_error(tail, ErrorCode.LIMIT_EXCEEDED, "max length 4")
    assert (err.session_id, err.step_id) == (tail.session_id, 0)
    head.close_stream()
    tail.close_stream()
