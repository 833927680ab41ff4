"""``HeadBatcher`` in-process with a real tiny head: exact rows, cohorts, burst holds and the tags it hands out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from meshinfer.client.head_batch import HeadBatcher
from meshinfer.errors import ConfigError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.head import ClientHead
from meshinfer.wire.messages import Burst


@pytest.fixture(scope="module")
def head(meshinfer_cache_dir: Path) -> ClientHead:
    from meshinfer.testing.checkpoints import tiny_checkpoint

    return Checkpoint(tiny_checkpoint("llama")).load_head()


def _rows(n: int, hidden: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randn(hidden, generator=gen) for _ in range(n)]


def test_one_generation_gets_exact_logits_at_once_and_no_tag(head: ClientHead) -> None:
    async def main() -> None:
        heads = HeadBatcher(head)
        heads.active = 1
        (h,) = _rows(1, head.spec.hidden_size)
        logits, tag = await heads.logits(h, None, "p")
        assert tag is None and heads.batches == 1
        torch.testing.assert_close(logits, head.logits(h[None])[0])

    asyncio.run(main())


def test_rows_go_in_cohorts_and_rows_bound_for_one_server_share_a_tag(head: ClientHead) -> None:
    async def main() -> None:
        heads = HeadBatcher(head, cohorts=2)
        heads.active = 4
        rows = _rows(4, head.spec.hidden_size)
        out = await asyncio.gather(*(heads.logits(h, None, peer) for h, peer in zip(rows, "pppq", strict=True)))
        assert heads.batches == 2 and heads.rows == 4  # ceil(4 / 2) rows per call
        for (logits, _), h in zip(out, rows, strict=True):
            torch.testing.assert_close(logits, head.logits(h[None])[0], rtol=1e-5, atol=1e-5)
        tags = [tag for _, tag in out]
        assert tags[0] is not None and tags[0] == tags[1] and tags[0].size == 2  # first call: two rows to p
        assert tags[2] is None and tags[3] is None  # second call: one row each to p and q

    asyncio.run(main())


def test_rows_of_a_burst_wait_for_the_whole_burst(head: ClientHead) -> None:
    async def main() -> None:
        heads = HeadBatcher(head, cohorts=1, hold_s=60.0)
        heads.active = 3
        rows = _rows(3, head.spec.hidden_size)
        burst = Burst(id=5, size=3)
        first = [asyncio.ensure_future(heads.logits(h, burst, "p")) for h in rows[:2]]
        await asyncio.sleep(0.05)
        assert heads.batches == 0 and not any(f.done() for f in first)  # held: one member is missing
        last = await heads.logits(rows[2], burst, "p")
        done = [await f for f in first] + [last]
        assert heads.batches == 1 and heads.rows == 3  # one call for the whole burst
        assert all(tag is not None and tag.size == 3 and tag.id != burst.id for _, tag in done)

    asyncio.run(main())


def test_an_incomplete_burst_is_computed_when_its_hold_ends_and_cancelled_rows_are_dropped(head: ClientHead) -> None:
    async def main() -> None:
        heads = HeadBatcher(head, cohorts=1, hold_s=0.2)
        heads.active = 2
        a, b = _rows(2, head.spec.hidden_size)
        gone = asyncio.ensure_future(heads.logits(b, Burst(id=8, size=4), "p"))
        await asyncio.sleep(0)
        gone.cancel()
        logits, tag = await asyncio.wait_for(heads.logits(a, Burst(id=8, size=4), "p"), 10.0)
        assert heads.rows == 1 and tag is None  # the cancelled row was not computed
        torch.testing.assert_close(logits, head.logits(a[None])[0])

    asyncio.run(main())


def test_cohorts_must_be_positive(head: ClientHead) -> None:
    with pytest.raises(ConfigError, match="cohorts"):
        HeadBatcher(head, cohorts=0)


def test_several_rows_of_one_session_share_the_batch_of_other_sessions(head: ClientHead) -> None:
    async def main() -> None:
        heads = HeadBatcher(head, cohorts=1)
        heads.active = 2
        rows = _rows(4, head.spec.hidden_size)
        verify = torch.stack(rows[:3])  # [3, H]: a speculative verify step's rows
        (many, _), (one, _) = await asyncio.gather(heads.logits_rows(verify, None, "p"), heads.logits(rows[3]))
        assert heads.batches == 1 and heads.rows == 2  # two sessions, one matmul
        assert many.shape == (3, head.spec.vocab_size) and one.shape == (head.spec.vocab_size,)
        torch.testing.assert_close(many, head.logits(verify), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one, head.logits(rows[3][None])[0], rtol=1e-5, atol=1e-5)
        with pytest.raises(ConfigError):
            await heads.logits_rows(rows[0])

    asyncio.run(main())
