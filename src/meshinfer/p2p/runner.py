"""``LoopThread``: an asyncio loop in a background thread, for synchronous callers of ``PeerNode``.

Contract: owns one event loop running in one daemon thread; ``run(coro, timeout)`` blocks the caller
until the coroutine finishes on that loop (``TransportError`` on timeout); ``submit`` returns a
``concurrent.futures.Future``. Start a ``PeerNode`` through it and call all of that node's methods
through it (a node belongs to the loop it was started on). ``stop`` cancels what is left and joins
the thread; a p2pd started from this thread dies when the thread ends. ``wait_for_exit_signal`` is
how long-running peer processes wait for SIGTERM/SIGINT (or their parent closing stdin). Knows
nothing of the swarm.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from meshinfer.errors import TransportError

T = TypeVar("T")


class LoopThread:
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

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if not self._started:
            raise RuntimeError("LoopThread.start() first")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TransportError(f"operation did not finish within {timeout:g}s") from None

    def stop(self, timeout: float = 10.0) -> None:
        if self._started and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> LoopThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_for_exit_signal(*, watch_stdin: bool = True) -> None:
    """Return on SIGTERM/SIGINT, or when stdin reaches EOF (the parent went away)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if watch_stdin and not sys.stdin.isatty():
        def watch() -> None:  # a daemon thread: never delays interpreter exit
            with contextlib.suppress(Exception):
                sys.stdin.buffer.read()
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch, name="stdin-watch", daemon=True).start()
    await stop.wait()
