"""The sync face of the client's async generations: iterate an async generator running on a ``LoopThread``
from another thread.

Contract: ``iterate_on(runner, make)`` runs the async generator ``make()`` on ``runner``'s loop and yields its
items in the calling thread, handed over through a ``queue.SimpleQueue`` (off the loop's critical path: the loop
never waits for the consumer); an exception of the generator is raised in the calling thread. Abandoning the
iterator (``close``, garbage collection) cancels the generation on the loop and waits up to ``CLOSE_WAIT_S`` for
it to finish, so whatever it holds (a session on every server) is released before the call returns. Knows
nothing of sessions or models.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncGenerator, Callable, Generator
from typing import TypeVar

from meshinfer.loopthread import LoopThread

T = TypeVar("T")

CLOSE_WAIT_S = 10.0
"""How long abandoning the iterator waits for the generation to wind down on the loop."""


def iterate_on(runner: LoopThread, make: Callable[[], AsyncGenerator[T]]) -> Generator[T]:
    """``make()``'s items, produced on ``runner``'s loop, in this thread (see the module docstring)."""
    items: queue.SimpleQueue[tuple[T] | BaseException | None] = queue.SimpleQueue()

    async def produce() -> None:
        try:
            async with contextlib.aclosing(make()) as generation:
                async for item in generation:
                    items.put((item,))
            items.put(None)
        except BaseException as err:  # handed to the consuming thread
            items.put(err)
            if isinstance(err, asyncio.CancelledError):
                raise

    future = runner.submit(produce())
    try:
        while True:
            got = items.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got[0]
    finally:
        if not future.done():
            runner.loop.call_soon_threadsafe(future.cancel)
        with contextlib.suppress(BaseException):
            future.result(timeout=CLOSE_WAIT_S)  # the generation's resources are released before we return
