"""The HTTP side of a generation that may outlive its request: a client that goes away, a stream that must clean
up however it ends.

Contract: ``unless_gone(request, awaitable)`` waits for ``awaitable`` while checking every ``DISCONNECT_POLL_S``
that the HTTP client is still there (``ClientGone`` if it left; the awaitable is then cancelled). ``ClosingStream``
is an SSE ``StreamingResponse`` that always runs ``on_close`` when it ends, however it ends (a send that failed
because the client went away, a body never started), so the generation is abandoned at once. ``after(first,
pieces)`` yields ``first()``'s text, then ``pieces`` (closed whatever happens). Knows nothing of models or of the
OpenAI format.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from meshinfer.tasks import stop_task

T = TypeVar("T")

DISCONNECT_POLL_S = 0.25
"""How often a request waiting for its first token (or a whole non-streaming answer) checks its client."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class ClosingStream(StreamingResponse):
    """A streaming response that always runs ``on_close`` when it ends, however it ends (a send that failed
    because the client went away, a body never started): that abandons the generation at once."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


async def after(first: Callable[[], Awaitable[str]], pieces: AsyncIterator[str]) -> AsyncIterator[str]:
    """``first()``'s text, then ``pieces`` (closed whatever happens)."""
    async with contextlib.aclosing(pieces):  # type: ignore[type-var]
        yield await first()
        async for piece in pieces:
            yield piece


async def unless_gone(request: Request, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, checking the client every ``DISCONNECT_POLL_S``; ``ClientGone`` if it left."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            await stop_task(task, errors=(BaseException,))
