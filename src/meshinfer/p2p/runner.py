"""``LoopThread``: an asyncio loop in a background thread, for synchronous callers of ``PeerNode``.

Contract: owns one event loop running in one daemon thread; ``run(coro, timeout)`` blocks the caller
until the coroutine finishes on that loop (``TransportError`` on timeout); ``submit`` returns a
``concurrent.futures.Future``. Start a ``PeerNode`` through it and call all of that node's methods
through it (a node belongs to the loop it was started on). ``stop`` cancels what is left and joins
the thread; a p2pd started from this thread dies when the thread ends. ``wait_for_exit_signal`` is
how long-running peer processes wait for SIGTERM/SIGINT (or their parent closing stdin);
``watch_stdin_eof`` is the one way every process here notices its parent closing stdin. Knows
nothing of the swarm.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
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


def watch_stdin_eof(on_eof: Callable[[], None], loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Call ``on_eof`` once stdin reaches EOF (the parent went away): on ``loop`` when given, else from a
    daemon thread. Reads the raw descriptor, never ``sys.stdin``'s buffered reader (a daemon thread blocked
    in it holds its lock at interpreter exit, which aborts the interpreter); with a loop, through the
    loop's reader (no thread at all) when epoll can watch stdin, else from a daemon thread."""
    fd = sys.stdin.fileno()
    if loop is not None:
        def on_readable() -> None:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                on_eof()

        try:
            loop.add_reader(fd, on_readable)
            return
        except (OSError, ValueError, PermissionError):  # e.g. a regular file: epoll cannot watch it
            pass

    def drain() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 65536):
                pass
        if loop is None:
            on_eof()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(on_eof)

    threading.Thread(target=drain, name="stdin-watch", daemon=True).start()


async def wait_for_exit_signal(*, watch_stdin: bool = True) -> None:
    """Return on SIGTERM/SIGINT, or when stdin reaches EOF (the parent went away)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if watch_stdin and not sys.stdin.isatty():
        watch_stdin_eof(stop.set, loop)
    await stop.wait()
