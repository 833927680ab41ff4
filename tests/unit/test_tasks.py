"""``meshinfer.tasks.stop_task``: a stopped task has finished, its cancellation (and the listed errors) are
swallowed, any other error it ended with is raised."""

from __future__ import annotations

import asyncio

import pytest

from meshinfer.tasks import stop_task


async def _forever(started: asyncio.Event, cleaned: list[str]) -> None:
    started.set()
    try:
        await asyncio.sleep(3600)
    finally:
        await asyncio.sleep(0)  # cleanup that itself awaits: stop_task waits for it
        cleaned.append("done")


def test_stop_task_cancels_and_waits_until_finished() -> None:
    async def main() -> None:
        started, cleaned = asyncio.Event(), []
        task = asyncio.create_task(_forever(started, cleaned))
        await started.wait()
        await stop_task(task)
        assert task.cancelled() and cleaned == ["done"]
        await stop_task(task)  # again: a no-op
        await stop_task(None)

    asyncio.run(main())


def test_stop_task_raises_what_a_finished_task_raised_unless_listed() -> None:
    async def fail() -> None:
        raise ValueError("boom")

    async def main() -> None:
        task = asyncio.create_task(fail())
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="boom"):
            await stop_task(task)
        await stop_task(task, errors=(ValueError,))

    asyncio.run(main())
