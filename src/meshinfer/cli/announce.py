"""Telling a launcher that a long-running subcommand is ready, and serving HTTP until stopped.

Contract: ``announce_ready`` prints what launchers and tests wait for in ONE flushed write on stdout (an
optional prefix, e.g. multiaddrs one per line, then ``readyline.ready_line(info)``) and then one human line on
stderr. ``serve_http`` runs an HTTP server (``gateway.serving.ApiServer``) in this thread, announces it once
it listens (``describe(url)`` gives the info and the human line) and, with ``stop_on_stdin_eof``, stops it
when stdin closes. Imports the network only when called.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

from meshinfer.readyline import ready_line


class HttpServer(Protocol):
    """What ``serve_http`` needs of ``gateway.serving.ApiServer``."""

    @property
    def url(self) -> str: ...

    def run(self, on_ready: Callable[[], None] | None = None) -> None: ...

    def stop(self, timeout: float = ...) -> None: ...


def announce_ready(info: dict[str, Any], human: str, *, prefix: str = "") -> None:
    """``prefix`` and the ready line of ``info`` on stdout in one flushed write, then ``human`` on stderr."""
    sys.stdout.write(prefix + ready_line(info))
    sys.stdout.flush()
    print(human, file=sys.stderr, flush=True)


def serve_http(server: HttpServer, describe: Callable[[str], tuple[dict[str, Any], str]], *,
               stop_on_stdin_eof: bool) -> None:
    """Run ``server`` until it is stopped, announcing ``describe(server.url)`` once it listens."""
    from meshinfer.p2p.runner import watch_stdin_eof

    def ready() -> None:
        announce_ready(*describe(server.url))
        if stop_on_stdin_eof:
            watch_stdin_eof(lambda: server.stop(timeout=0))

    server.run(on_ready=ready)
