"""The session service in-process: idle expiry, shutdown and delivery order (real step loop and span,
an in-memory stand-in for the client's stream; the real streams are covered by the process tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.server.handler import SessionService
from meshinfer.server.memory import MemoryBudget
from meshinfer.server.runtime import StepLoop
from meshinfer.types import BlockRange
from meshinfer.wire.limits import DEFAULT_LIMITS
from meshinfer.wire.messages import Error, ErrorCode, Hop, Message, Open, Step, StepResult
from meshinfer.wire.tensor import encode_tensor


class MemoryStream:
    """Collects what the service sends to one client."""

    def __init__(self) -> None:
        self.peer_id = "client-peer-id"
        self.sent: list[Message] = []
        self.closed = False

    async def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def send_nowait(self, payload: bytes) -> bool:
        return False  # always the ordered async path

    async def close(self, timeout: float = 2.0) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def span(meshinfer_cache_dir: Path) -> BlockSpan:
    from meshinfer.testing.checkpoints import tiny_checkpoint

    return Checkpoint(tiny_checkpoint("llama")).load_span(BlockRange(0, 4))


def _service(span: BlockSpan, idle_timeout: float = 60.0) -> tuple[SessionService, list[int]]:
    changes: list[int] = []
    holder: dict[str, SessionService] = {}
    steps = StepLoop(span, lambda finished: holder["s"].on_results(finished))
    service = SessionService(model_id="m", peer_id="me", steps=steps, budget=MemoryBudget(100, 4),
                             limits=DEFAULT_LIMITS, max_step_tokens=16, idle_timeout=idle_timeout,
                             on_change=lambda: changes.append(service.budget.tokens_left))
    holder["s"] = service
    return service, changes


def _open(sid: str, max_length: int = 40, span: BlockRange = BlockRange(0, 4), tail: list[Hop] | None = None,
          prev: str | None = None) -> Open:
    return Open(session_id=sid, model="m", span=span, max_length=max_length, dtype="float32", route_tail=tail or [],
                prev_peer=prev)


async def _until(cond, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def test_idle_sessions_expire_and_free_memory(span: BlockSpan) -> None:
    async def main() -> None:
        service, changes = _service(span, idle_timeout=0.3)
        service.steps.start()
        service.start()
        stream = MemoryStream()
        session = await service.open(_open("a"), stream)  # type: ignore[arg-type]
        assert service.budget.tokens_left == 60
        await _until(lambda: session.ended)
        assert session.end_reason == "idle" and service.budget.tokens_left == 100 and not service.sessions
        assert stream.closed and isinstance(stream.sent[-1], Error) and stream.sent[-1].code == ErrorCode.TIMEOUT
        assert changes == [60, 100]
        await service.shutdown()
        await service.steps.stop()

    asyncio.run(main())


def test_results_leave_in_order_and_local_push_and_shutdown(span: BlockSpan) -> None:
    async def main() -> None:
        service, _ = _service(span)
        service.steps.start()
        service.start()
        s2, s1 = MemoryStream(), MemoryStream()
        await service.open(_open("second", span=BlockRange(2, 4), prev="me"), s2)  # type: ignore[arg-type]
        hop = Hop(peer_id="me", span=BlockRange(2, 4), session_id="second")
        first = await service.open(_open("first", span=BlockRange(0, 2), tail=[hop]), s1)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(0)
        position = 0
        for step_id, tokens in enumerate([5, 1, 1, 1]):
            x = torch.randn(tokens, 64, generator=gen)
            service.step(first, Step(session_id="first", step_id=step_id, position=position, hidden=encode_tensor(x)))
            position += tokens
        await _until(lambda: len(s2.sent) == 4)
        for stream in (s1, s2):
            assert [(type(m), m.step_id) for m in stream.sent] == [(StepResult, i) for i in range(4)]  # type: ignore[union-attr]
        await service.shutdown()
        assert not service.sessions and service.budget.tokens_left == 100 and not service.accepting
        for stream in (s1, s2):
            assert isinstance(stream.sent[-1], Error) and stream.sent[-1].code == ErrorCode.OVERLOADED
        with pytest.raises(Exception, match="shutting down"):
            await service.open(_open("late"), MemoryStream())  # type: ignore[arg-type]
        await service.steps.stop()

    asyncio.run(main())


def test_retarget_repoints_pushes_and_refuses_a_broken_chain(span: BlockSpan) -> None:
    async def main() -> None:
        from meshinfer.server.session import SessionError
        from meshinfer.wire.messages import Retarget

        service, _ = _service(span)
        service.steps.start()
        service.start()
        s_old, s_new, s1 = MemoryStream(), MemoryStream(), MemoryStream()
        await service.open(_open("old", 20, span=BlockRange(2, 4), prev="me"), s_old)  # type: ignore[arg-type]
        await service.open(_open("new", 20, span=BlockRange(2, 4), prev="me"), s_new)  # type: ignore[arg-type]
        old = Hop(peer_id="me", span=BlockRange(2, 4), session_id="old")
        first = await service.open(_open("first", 20, span=BlockRange(0, 2), tail=[old]), s1)  # type: ignore[arg-type]
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
        service.step(first, Step(session_id="first", step_id=0, position=0, hidden=encode_tensor(x)))
        await _until(lambda: len(s_old.sent) == 1)
        new = Hop(peer_id="me", span=BlockRange(2, 4), session_id="new")
        service.retarget(first, Retarget(session_id="first", route_tail=[new]))
        service.step(first, Step(session_id="first", step_id=1, position=3, hidden=encode_tensor(x[:1])))
        await _until(lambda: len(s_new.sent) == 1)
        assert len(s_old.sent) == 1  # the old next hop gets nothing more
        gap = Hop(peer_id="me", span=BlockRange(3, 4), session_id="new")  # does not continue at block 2
        for bad, code in [(Retarget(session_id="first", route_tail=[gap]), ErrorCode.BAD_REQUEST),
                          (Retarget(session_id="other"), ErrorCode.UNKNOWN_SESSION)]:
            with pytest.raises(SessionError) as err:
                service.retarget(first, bad)
            assert err.value.code == code
        assert first.next_hop == new  # a refused retarget changes nothing
        service.retarget(first, Retarget(session_id="first"))  # empty tail: push nowhere
        assert first.next_hop is None
        await service.shutdown()
        await service.steps.stop()

    asyncio.run(main())


def test_a_turns_outputs_leave_as_one_burst_per_destination(span: BlockSpan) -> None:
    async def main() -> None:
        service, _ = _service(span)
        service.steps.start()
        service.start()
        firsts, seconds = [MemoryStream(), MemoryStream()], [MemoryStream(), MemoryStream()]
        sessions = []
        for i in range(2):
            await service.open(_open(f"second{i}", 20, span=BlockRange(2, 4), prev="me"), seconds[i])  # type: ignore[arg-type]
            hop = Hop(peer_id="me", span=BlockRange(2, 4), session_id=f"second{i}")
            sessions.append(await service.open(_open(f"first{i}", 20, span=BlockRange(0, 2), tail=[hop]),
                                               firsts[i]))  # type: ignore[arg-type]
        x = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
        for i, session in enumerate(sessions):  # queued together: one turn, then one pushed burst, one turn
            service.step(session, Step(session_id=f"first{i}", step_id=0, position=0, hidden=encode_tensor(x)))
        await _until(lambda: all(s.sent for s in seconds))
        finals = [s.sent[0] for s in seconds]
        assert all(isinstance(m, StepResult) for m in finals)
        tags = {m.burst for m in finals}  # type: ignore[union-attr]
        (tag,) = tags  # both final outputs go back to the same client: one burst of 2
        assert tag is not None and tag.size == 2
        assert all(isinstance(s.sent[0], StepResult) and s.sent[0].burst is None for s in firsts)  # copies: untagged
        await service.shutdown()
        await service.steps.stop()

    asyncio.run(main())


def test_pushes_only_from_the_named_previous_hop_nan_refused_and_per_peer_step_limit(span: BlockSpan) -> None:
    async def main() -> None:
        service, _ = _service(span)
        service.max_queued_steps_per_peer = 3
        service.steps.start()
        service.start()
        s2, s1 = MemoryStream(), MemoryStream()
        second = await service.open(_open("second", span=BlockRange(2, 4)), s2)  # type: ignore[arg-type]  # no prev
        first = await service.open(_open("first", span=BlockRange(0, 2), tail=[  # type: ignore[arg-type]
            Hop(peer_id="me", span=BlockRange(2, 4), session_id="second")]), s1)
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
        service.step(first, Step(session_id="first", step_id=0, position=0, hidden=encode_tensor(x)))
        await _until(lambda: len(s1.sent) == 2)
        assert isinstance(s1.sent[0], StepResult) and isinstance(s1.sent[1], Error)
        assert s1.sent[1].code == ErrorCode.NEXT_HOP_FAILED and "accepts steps from this server" in s1.sent[1].message
        assert not s2.sent and second.cache.length == 0 and second.last_step_id is None  # refused, untouched
        bad = x.clone()
        bad[1, 5] = float("nan")
        service.step(second, Step(session_id="second", step_id=0, position=0, hidden=encode_tensor(x)))
        await _until(lambda: len(s2.sent) == 1)
        for step_id, value in enumerate([float("nan"), float("inf")], start=1):
            bad[1, 5] = value
            service.step(second, Step(session_id="second", step_id=step_id, position=0, hidden=encode_tensor(bad)))
            await _until(lambda n=step_id: len(s2.sent) == n + 1)
            err = s2.sent[-1]
            assert isinstance(err, Error) and err.code == ErrorCode.BAD_REQUEST and "NaN or inf" in err.message
            assert second.cache.length == 2 and second.last_step_id == 0  # the session is unchanged
        await service.steps.stop()  # nothing runs now: steps stay queued
        one = torch.randn(1, 64)
        for k in range(3):
            service.step(second, Step(session_id="second", step_id=10 + k, position=2 + k, hidden=encode_tensor(one)))
        with pytest.raises(SessionError, match=r"has 3 steps waiting here \(limit --max-queued-steps-per-peer 3\)"):
            service.step(first, Step(session_id="first", step_id=5, position=2, hidden=encode_tensor(one)))
        await service.shutdown()

    from meshinfer.server.session import SessionError

    asyncio.run(main())
