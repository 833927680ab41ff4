"""One session stream, several sessions in turn (the client reuses its connection), and Open + Step back to back:
a Step after a refused Open gets the Open's error. In-process service with the real step loop and span; the
client's stream is a scripted stand-in (real streams: tests/client/test_reuse_latency.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.p2p.stream import StreamClosed
from meshinfer.server.early import EarlyPushes
from meshinfer.server.handler import SessionService
from meshinfer.server.memory import MemoryBudget
from meshinfer.server.runtime import StepLoop
from meshinfer.types import BlockRange
from meshinfer.wire.limits import DEFAULT_LIMITS
from meshinfer.wire.messages import Close, Error, ErrorCode, Message, Open, Opened, Step, StepResult, encode_message
from meshinfer.wire.tensor import encode_tensor


class ScriptStream:
    """What the service reads (``feed``; None ends the stream) and what it sends (``sent``)."""

    def __init__(self, peer_id: str = "client-peer-id") -> None:
        self.peer_id = peer_id
        self.inbox: asyncio.Queue[Message | None] = asyncio.Queue()
        self.sent: list[Message] = []
        self.closed = False

    def feed(self, *msgs: Message | None) -> None:
        for msg in msgs:
            self.inbox.put_nowait(msg)

    async def recv_bytes(self, timeout: float | None = None) -> bytes:
        msg = await self.inbox.get()
        if msg is None:
            raise StreamClosed("end of script")
        return encode_message(msg)

    async def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def send_nowait(self, payload: bytes) -> bool:
        return False

    async def close(self, timeout: float = 2.0) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def span(meshinfer_cache_dir: Path) -> BlockSpan:
    from meshinfer.testing.checkpoints import tiny_checkpoint

    return Checkpoint(tiny_checkpoint("llama")).load_span(BlockRange(0, 4))


def _open(sid: str, model: str = "m", prev: str | None = None) -> Open:
    return Open(session_id=sid, model=model, span=BlockRange(0, 4), max_length=40, dtype="float32", prev_peer=prev)


def _step(sid: str, step_id: int, position: int, tokens: int) -> Step:
    return Step(session_id=sid, step_id=step_id, position=position, hidden=encode_tensor(torch.ones(tokens, 64)))


async def _until(cond, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def test_one_stream_carries_sessions_in_turn_and_a_refused_open_answers_its_steps(span: BlockSpan) -> None:
    async def main() -> None:
        holder: dict[str, SessionService] = {}
        steps = StepLoop(span, lambda finished: holder["s"].on_results(finished))
        service = SessionService(model_id="m", peer_id="me", steps=steps, budget=MemoryBudget(100, 4),
                                 limits=DEFAULT_LIMITS, max_step_tokens=16, idle_timeout=60.0)
        holder["s"] = service
        steps.start()
        service.start()
        stream = ScriptStream()
        task = asyncio.create_task(service.handle_session(stream))  # type: ignore[arg-type]
        try:
            # a refused Open and the Step sent right after it: both answered with the Open's error
            stream.feed(_open("bad", model="other"), _step("bad", 0, 0, 3))
            await _until(lambda: len(stream.sent) == 2)
            first, second = stream.sent
            assert isinstance(first, Error) and first.code == ErrorCode.UNKNOWN_MODEL and first.step_id is None
            assert isinstance(second, Error) and second.code == ErrorCode.UNKNOWN_MODEL and second.step_id == 0
            # then a session on the same stream, Open + Step back to back, closed; then another one
            for n, sid in enumerate(("a", "b")):
                stream.sent.clear()
                stream.feed(_open(sid), _step(sid, 0, 0, 3), _step(sid, 1, 3, 1))
                await _until(lambda: sum(isinstance(m, StepResult) for m in stream.sent) == 2)
                assert isinstance(stream.sent[0], Opened) and stream.sent[0].session_id == sid
                assert [m.step_id for m in stream.sent[1:]] == [0, 1]  # type: ignore[union-attr]
                stream.feed(Close(session_id=sid))
                await _until(lambda: not service.sessions)
                assert service.budget.tokens_left == 100, n  # its memory is back before the next Open
            assert not stream.closed and not task.done()  # the stream stays for the next session
            stream.feed(None)
            await asyncio.wait_for(task, 10)
        finally:
            task.cancel()
            await service.shutdown()
            await steps.stop()

    asyncio.run(main())


def test_a_push_that_overtakes_its_open_is_held_until_the_open_and_a_stray_one_refused(span: BlockSpan) -> None:
    async def main() -> None:
        holder: dict[str, SessionService] = {}
        steps = StepLoop(span, lambda finished: holder["s"].on_results(finished))
        service = SessionService(model_id="m", peer_id="me", steps=steps, budget=MemoryBudget(100, 4),
                                 limits=DEFAULT_LIMITS, max_step_tokens=16, idle_timeout=2.0)
        holder["s"] = service
        service._early = EarlyPushes(max_age_s=0.3)
        steps.start()
        service.start()
        client, pusher = ScriptStream(), ScriptStream("prev-peer")
        tasks = [asyncio.create_task(service.handle_push(pusher)),  # type: ignore[arg-type]
                 asyncio.create_task(service.handle_session(client))]  # type: ignore[arg-type]
        try:
            pusher.feed(_step("s", 0, 0, 3), _step("never", 0, 0, 1))  # before any Open
            await asyncio.sleep(0.1)
            assert pusher.sent == [] and not client.sent  # held, not refused
            client.feed(_open("s", prev="prev-peer"))
            await _until(lambda: any(isinstance(m, StepResult) for m in client.sent))
            assert isinstance(client.sent[0], Opened) and client.sent[1].step_id == 0  # type: ignore[union-attr]
            await _until(lambda: len(pusher.sent) == 1)  # the stray one, once held too long
            refused = pusher.sent[0]
            assert isinstance(refused, Error) and refused.code == ErrorCode.UNKNOWN_SESSION
            assert refused.session_id == "never"
        finally:
            for task in tasks:
                task.cancel()
            await service.shutdown()
            await steps.stop()

    asyncio.run(main())


def test_early_pushes_are_bounded_and_expire() -> None:
    early: EarlyPushes[str] = EarlyPushes(max_age_s=1.0, max_steps=4, max_per_session=2, max_per_peer=3,
                                          max_bytes=100)
    assert early.hold("a", "P", "a0", 10, now=0.0) and early.hold("a", "P", "a1", 10, now=0.5)
    assert not early.hold("a", "Q", "a2", 10, now=0.5)  # per session
    assert not early.hold("b", "Q", "b0", 90, now=0.5)  # bytes
    assert early.hold("b", "P", "b0", 50, now=0.5)
    assert not early.hold("c", "P", "c0", 1, now=0.5)  # per pusher
    assert early.hold("c", "Q", "c0", 1, now=0.5)
    assert not early.hold("d", "R", "d0", 1, now=0.5)  # steps in all
    assert early.expire(now=1.2) == ["a0"]
    assert early.take("a") == ["a1"] and early.take("a") == []
    assert len(early) == 2 and early.hold("d", "P", "d0", 20, now=1.2)  # room again
    assert early.expire(now=10.0) == ["b0", "c0", "d0"] and len(early) == 0
