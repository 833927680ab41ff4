"""How peer processes live: ``wait_for_exit_signal`` and ``watch_stdin_eof``.

Contract: ``wait_for_exit_signal`` is how long-running peer processes wait for SIGTERM/SIGINT (or their
parent closing stdin); ``watch_stdin_eof`` is the one way every process here notices its parent closing
stdin. Synchronous callers drive a ``PeerNode`` through ``meshinfer.loopthread.LoopThread`` (a node belongs
to the loop it was started on; a p2pd started from its thread dies when the thread ends). Knows nothing of
the swarm.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["wait_for_exit_signal", "watch_stdin_eof"]


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
