"""Running a block server as a process: until SIGTERM/SIGINT (or stdin EOF), with a clean stop.

Contract: ``serve_until_signal(config, p2p)`` starts ``server.app.BlockServer`` and returns its exit code:
SIGTERM/SIGINT (and, when asked, the end of stdin: the launcher went away), even during start-up, lead to a
clean stop (drain, leave the swarm); a second signal cuts the drain short; 1 when the server could no
longer serve. Printing is the caller's job (``on_ready``). Knows nothing of models or sessions.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from meshinfer.config import P2PConfig
from meshinfer.errors import MeshinferError
from meshinfer.p2p.runner import watch_stdin_eof
from meshinfer.server.app import BlockServer
from meshinfer.server.config import ServerConfig
from meshinfer.tasks import stop_task

log = logging.getLogger(__name__)


async def serve_until_signal(config: ServerConfig, p2p: P2PConfig, *, model_dir: str | Path | None = None,
                             on_ready: Callable[[BlockServer], None] = lambda s: None,
                             stop_on_stdin_eof: bool = False) -> int:
    """Run a server until SIGTERM/SIGINT (or stdin EOF when asked); returns the exit code (0, or 1 when
    the server could no longer serve). A second signal ends the drain at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    running: list[BlockServer] = []

    def on_signal() -> None:
        if stop.is_set() and running:
            log.info("second stop signal: ending open sessions now")
            running[0].hurry()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if stop_on_stdin_eof:
        watch_stdin_eof(stop.set, loop)
    starting = asyncio.create_task(BlockServer.start(config, p2p, model_dir))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # signalled during start-up: BlockServer.start cleans up on cancel
        log.info("stop requested during start-up")
        await stop_task(starting, errors=(MeshinferError,))
        return 0
    stopping.cancel()
    server = starting.result()  # raises the start-up error, if any
    running.append(server)
    try:
        on_ready(server)
        stopping = asyncio.create_task(stop.wait())
        failing = asyncio.create_task(server.fatal.wait())
        await asyncio.wait([stopping, failing], return_when=asyncio.FIRST_COMPLETED)
        for task in (stopping, failing):
            task.cancel()
    finally:
        await server.stop()
    return 1 if server.fatal.is_set() else 0
