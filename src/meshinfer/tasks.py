"""Stopping a background asyncio task: ``stop_task``.

Contract: ``await stop_task(task)`` cancels ``task`` (None: nothing to do) and waits until it has finished,
so nothing it does can run after the call returns. The ``CancelledError`` that ends it is swallowed, and so
are the exception classes in ``errors`` (for tasks whose failure no longer matters once they are stopped);
any other exception the task ended with is raised. Like the ``cancel(); with suppress(CancelledError):
await task`` it replaces, it also swallows a cancellation of the caller arriving during the wait. Leaf
module: imports nothing from meshinfer.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_task(task: asyncio.Future[Any] | None, *, errors: tuple[type[BaseException], ...] = ()) -> None:
    """Cancel ``task`` and wait for it to finish (see the module docstring)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, *errors):
        await task
