"""The bridge between threads and asyncio: ``LoopThread`` (an event loop in a background thread), ``run_on``
and ``call_on_loop``.

Contract: ``run_on(loop, coro, timeout)`` runs a coroutine on an event loop that runs in ANOTHER thread and
blocks the caller until it finishes (its result or its exception); past ``timeout`` the coroutine is
cancelled and ``TransportError`` raised. ``call_on_loop(loop, fn, timeout)`` does the same for a plain
function (state that lives on the loop, read from another thread), ``TimeoutError`` past ``timeout``.
``LoopThread`` owns one event loop running in one daemon thread: ``run(coro, timeout)`` is ``run_on`` its
loop, ``submit`` returns a ``concurrent.futures.Future``; call ``start()`` first (else ``UsageError``).
Objects bound to a loop (a ``PeerNode``...) are started through it and used through it. ``stop`` cancels
what is left on the loop and joins the thread. Leaf module: knows nothing of
the swarm, the network or the models; imports only ``meshinfer.errors``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from meshinfer.errors import TransportError, UsageError

T = TypeVar("T")


def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on ``loop`` (running in another thread) and wait for it (see the module docstring)."""
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TransportError(f"operation did not finish within {timeout:g}s") from None


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout: float) -> T:
    """Run ``fn()`` on ``loop`` from another thread and return its result (``TimeoutError`` after ``timeout``)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as err:
            future.set_exception(err)

    loop.call_soon_threadsafe(run)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        with contextlib.suppress(Exception):
            future.cancel()
        raise TimeoutError(f"the event loop did not answer within {timeout:g}s") from None


class LoopThread:
    """An asyncio event loop running in a daemon thread, for synchronous callers of async code."""

    def __init__(self, name: str = "meshinfer-p2p") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def start(self) -> LoopThread:
        if not self._started:
            self._thread.start()
            self._started = True
        return self

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if not self._started:
            raise UsageError("LoopThread.start() first")
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._running_loop())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return run_on(self._running_loop(), coro, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._started and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> LoopThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
