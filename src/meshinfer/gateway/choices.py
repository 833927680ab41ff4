"""The choices of one answer: ``n`` generations side by side, started together, joined or interleaved.

Contract: an ``Answer`` is one generation being answered: its text pieces (``generate_text``, run inside a
generation slot) and its ``Outcome``; ``close()`` (idempotent) abandons it if it still runs, which frees its
slot and closes its session, and counts it in the gateway's ``stats``: ``completed``, or ``cancelled`` (the
client went away) unless ``failed`` (an error, counted where it is answered). ``Choices`` holds the answers
of one request, choice ``i`` being ``answers[i]``:

- ``firsts()`` waits for every choice's first piece at once (so that a swarm that cannot serve is an HTTP
  error before any byte is sent); if one fails, the others are stopped before the error propagates;
- ``rests()`` then joins what each choice has left (whole answers);
- ``items()`` yields ``(i, piece, scored)`` as the choices produce them and ``(i, None, scored)`` when choice
  ``i`` has ended (streams), ``scored`` being how many of its ``Outcome.logprobs`` existed at that moment
  (a pump runs ahead of the consumer); one pump task per choice feeds a queue (a single choice is driven by
  the caller's task itself, with no pump); the first error of any choice is raised;
- ``close()`` (idempotent) cancels the pumps, then closes every answer.

A generator is never advanced by two tasks at once: ``firsts`` and ``rests`` finish (or cancel) their tasks
before they return, and ``close`` stops the pumps before it closes the generators. Knows nothing of HTTP or
of the response format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from meshinfer.gateway.generation import Outcome

log = logging.getLogger(__name__)

T = TypeVar("T")


class Answer:
    """One generation being answered (see the module docstring)."""

    def __init__(self, pieces: AsyncIterator[str], outcome: Outcome, stats: dict[str, int]) -> None:
        self.pieces = pieces
        self.outcome = outcome
        self.stats = stats
        self.failed = False
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.pieces.aclose()  # type: ignore[attr-defined]
        if self.outcome.finished:
            self.stats["completed"] += 1
        elif not self.failed:
            self.stats["cancelled"] += 1
            log.info("generation abandoned after %d tokens: the client went away", self.outcome.completion_tokens)


async def _all(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Every call's result, run concurrently; on the first error (or a cancel) the rest are cancelled and
    awaited before it propagates."""
    tasks = [asyncio.ensure_future(call()) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _join(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])


class Choices:
    """The answers of one request (see the module docstring)."""

    def __init__(self, answers: Sequence[Answer]) -> None:
        self.answers = list(answers)
        self._queue: asyncio.Queue[tuple[int, str | BaseException | None, int]] = asyncio.Queue()
        self._pumps: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def outcomes(self) -> list[Outcome]:
        return [a.outcome for a in self.answers]

    async def firsts(self) -> list[str]:
        """Each choice's first piece ("" for a choice with no token at all)."""
        return await _all([lambda a=a: anext(a.pieces, "") for a in self.answers])

    async def rests(self) -> list[str]:
        """Each choice's remaining text."""
        return await _all([lambda a=a: _join(a.pieces) for a in self.answers])

    async def _pump(self, index: int, answer: Answer) -> None:
        scored = answer.outcome.logprobs
        try:
            async for piece in answer.pieces:
                self._queue.put_nowait((index, piece, len(scored)))
            self._queue.put_nowait((index, None, len(scored)))
        except Exception as err:  # handed to ``items``' consumer
            self._queue.put_nowait((index, err, len(scored)))

    async def items(self) -> AsyncIterator[tuple[int, str | None, int]]:
        """``(i, piece, scored)`` as produced, ``(i, None, scored)`` when choice ``i`` ended; raises the first
        error."""
        if len(self.answers) == 1:  # the common case: no pump, the caller's task drives the one generation
            (answer,) = self.answers
            async for piece in answer.pieces:
                yield 0, piece, len(answer.outcome.logprobs)
            yield 0, None, len(answer.outcome.logprobs)
            return
        self._pumps = [asyncio.create_task(self._pump(i, a), name=f"choice-{i}") for i, a in enumerate(self.answers)]
        left = len(self._pumps)
        while left:
            index, item, scored = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                left -= 1
            yield index, item, scored

    def fail(self) -> None:
        """Mark every answer failed (an error was answered: not counted as cancelled or completed)."""
        for answer in self.answers:
            answer.failed = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._pumps:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*self._pumps, return_exceptions=True)
        for answer in self.answers:
            await answer.close()
