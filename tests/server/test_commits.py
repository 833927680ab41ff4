"""Servers commit to their results (issue 19, D4): a real step loop and span, an in-memory client stream, a real
key. Every 16th result carries a signed commit that the client's log accepts, and a pushed hop's chain names as
inputs exactly the bytes the previous hop returned (pushes carry the same wire bytes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.p2p.commit import COMMIT_EVERY, CommitLog, sha256
from meshinfer.p2p.identity import Identity
from meshinfer.server.handler import SessionService
from meshinfer.server.memory import MemoryBudget
from meshinfer.server.runtime import StepLoop
from meshinfer.types import BlockRange
from meshinfer.wire.limits import DEFAULT_LIMITS
from meshinfer.wire.messages import Hop, Message, Open, Step, StepResult
from meshinfer.wire.tensor import encode_tensor


class MemoryStream:
    def __init__(self) -> None:
        self.peer_id = "client-peer-id"
        self.sent: list[Message] = []

    async def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def send_nowait(self, payload: bytes) -> bool:
        return False

    async def close(self, timeout: float = 2.0) -> None:
        pass


@pytest.fixture(scope="module")
def span(meshinfer_cache_dir: Path) -> BlockSpan:
    from meshinfer.testing.checkpoints import tiny_checkpoint

    return Checkpoint(tiny_checkpoint("llama")).load_span(BlockRange(0, 4))


@pytest.mark.parametrize("on_demand", [False, True], ids=["every-16", "on-demand"])
def test_results_carry_signed_commits_the_client_accepts(span: BlockSpan, on_demand: bool) -> None:
    """Every 16th result carries a commit; with ``on_demand``, step 2 asks for one too (``Step.want_commit``),
    and the pushed hop's result of that step carries one as well."""
    ident = Identity.generate()

    async def main() -> None:
        holder: dict[str, SessionService] = {}
        steps = StepLoop(span, lambda finished: holder["s"].on_results(finished))
        service = SessionService(model_id="m", peer_id=ident.peer_id, steps=steps, budget=MemoryBudget(200, 4),
                                 limits=DEFAULT_LIMITS, max_step_tokens=16, idle_timeout=60.0, identity=ident)
        holder["s"] = service
        steps.start()
        service.start()
        s1, s2 = MemoryStream(), MemoryStream()
        await service.open(Open(session_id="second", model="m", span=BlockRange(2, 4), max_length=64, dtype="float32",
                                prev_peer=ident.peer_id), s2)  # type: ignore[arg-type]
        hop = Hop(peer_id=ident.peer_id, span=BlockRange(2, 4), session_id="second")
        first = await service.open(Open(session_id="first", model="m", span=BlockRange(0, 2), max_length=64,
                                        dtype="float32", route_tail=[hop]), s1)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(0)
        position, sent = 0, []
        n = COMMIT_EVERY + 4  # on demand: commits after steps 2 and 18
        for step_id in range(n):
            x = encode_tensor(torch.randn(5 if step_id == 0 else 1, 64, generator=gen))
            sent.append(x)
            service.step(first, Step(session_id="first", step_id=step_id, position=position, hidden=x,
                                     want_commit=on_demand and step_id == 2))
            position += x.shape[0]
        for _ in range(500):
            if len(s2.sent) == n:
                break
            await asyncio.sleep(0.02)
        await service.shutdown()
        await steps.stop()
        logs = {}
        for name, stream, blocks in (("first", s1, BlockRange(0, 2)), ("second", s2, BlockRange(2, 4))):
            results = [m for m in stream.sent if isinstance(m, StepResult)]
            assert len(results) == n
            expected = [2, 2 + COMMIT_EVERY] if on_demand else [COMMIT_EVERY - 1]
            assert [i for i, m in enumerate(results) if m.commit is not None] == expected
            log = CommitLog("m", blocks, name, ident.peer_id)
            for m in results:
                log.record(m)
            assert log.broken is None and log.signed is not None and log.signed.steps == expected[-1] + 1
            logs[name] = log
        first_log, second_log = logs["first"], logs["second"]
        assert [e.input_sha for e in first_log.entries] == [sha256(x.data) for x in sent[:len(first_log.entries)]]
        assert [e.input_sha for e in second_log.entries] == [e.output_sha for e in first_log.entries]

    asyncio.run(main())
