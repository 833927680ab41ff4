"""``ApiServer``: run the gateway's ASGI app with uvicorn, in this thread (the CLI) or in a background thread
(tests, benchmarks), or on an event loop that already runs in another thread (the swarm client's loop).

Contract: binds its listening socket itself before uvicorn starts (so ``port=0`` gets a free port and ``url``
is known at once), runs uvicorn on its own asyncio loop, or on ``loop`` when one is given (a loop running in
another thread, e.g. ``DistributedModel.loop``: the gateway then iterates the client's generations directly,
with no thread hand-off per token; ``run`` and ``start`` only wait for it there) (access log off) with the HTTP/1.1
protocol of ``gateway.httpguard`` under ``HttpLimits`` (request heads of at most ``max_header_bytes``, completed within
``header_timeout``; idle keep-alive connections closed after ``keepalive_timeout``), and reports readiness
only once uvicorn has started. ``start()`` serves from a daemon thread until ``stop()``;
``run(on_ready)`` serves in the calling thread until ``stop()`` or, in the main thread, SIGINT/SIGTERM (then
it returns normally). Shutdown gives open streams ``graceful_timeout`` seconds, then runs the app's
``state.shutdown_hooks`` once (``shutdown_app``: uvicorn runs with ``lifespan="off"``, so the app's worker thread and
background tasks stop here; each hook is a callable, sync or returning an awaitable, run on the serving loop; one that
fails is logged and the others still run). Knows nothing of models.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from meshinfer.errors import ConfigError
from meshinfer.gateway.config import HttpLimits

log = logging.getLogger(__name__)


async def shutdown_app(app: Any) -> None:
    """Run and clear ``app.state.shutdown_hooks`` (none: nothing to do); idempotent."""
    state = getattr(app, "state", None)
    hooks: list[Callable[[], object]] = list(getattr(state, "shutdown_hooks", None) or ())
    if hooks:
        state.shutdown_hooks = []  # type: ignore[union-attr]
    for hook in reversed(hooks):  # the last added first: they may use what the first ones stop
        try:
            result = hook()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.warning("a gateway shutdown hook failed", exc_info=True)


class ApiServer:
    """One uvicorn server for one ASGI app on ``host:port``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 graceful_timeout: float = 5.0, limits: HttpLimits | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        import uvicorn

        from meshinfer.gateway.httpguard import guarded_protocol

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as err:
            self._sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
        self.host = host
        self.port = int(self._sock.getsockname()[1])
        self.limits = limits = limits or HttpLimits()
        config = uvicorn.Config(app, loop="asyncio", lifespan="off", log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=math.ceil(graceful_timeout),
                                http=guarded_protocol(limits), h11_max_incomplete_event_size=limits.max_header_bytes,
                                timeout_keep_alive=limits.keepalive_timeout)
        self.app = app
        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # ours: see run()
        self.loop = loop
        """The running loop uvicorn is served on (None: its own loop, in ``run``'s thread)."""
        self._future: concurrent.futures.Future[None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The base URL of the server (``http://host:port``); the OpenAI base URL is ``url + "/v1"``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def _serve(self, on_ready: Callable[[], None] | None) -> None:
        task = asyncio.create_task(self.server.serve(sockets=[self._sock]))
        while not self.server.started and not task.done():
            await asyncio.sleep(0.02)
        if self.server.started and on_ready is not None:
            on_ready()
        try:
            await task
        finally:
            await shutdown_app(self.app)

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve in this thread until stopped; ``on_ready`` is called once the server accepts connections.
        In the main thread SIGINT/SIGTERM stop it (a second SIGINT ends open streams at once) and it then
        returns normally (uvicorn's own handlers would re-raise the signal after shutting down)."""
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            if self.loop is None:
                asyncio.run(self._serve(on_ready))
            else:  # served on that loop's thread; this one waits (and takes the signals, in the main thread)
                future = self._future = asyncio.run_coroutine_threadsafe(self._serve(on_ready), self.loop)
                while True:
                    try:
                        future.result(timeout=0.25)
                        break
                    except concurrent.futures.TimeoutError:
                        continue
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._sock.close()

    def _on_signal(self, sig: int, frame: object) -> None:
        if self.server.should_exit and sig == signal.SIGINT:
            self.server.force_exit = True
        self.server.should_exit = True

    def start(self, timeout: float = 30.0) -> ApiServer:
        """Serve from a background thread (or on ``loop``); return once the server accepts connections."""
        if self.loop is not None:
            future = self._future = asyncio.run_coroutine_threadsafe(self._serve(None), self.loop)
            future.add_done_callback(lambda f: self._sock.close())
            deadline = time.monotonic() + timeout
            while not self.server.started:
                if future.done():
                    raise ConfigError(f"the API server on {self.url} failed to start: {future.exception()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConfigError(f"the API server on {self.url} did not start within {timeout:g} s")
                time.sleep(0.02)
            return self

        def target() -> None:
            try:
                self.run()
            except BaseException as err:  # reported by start()
                self._error = err

        self._thread = threading.Thread(target=target, name=f"meshinfer-api:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise ConfigError(f"the API server on {self.url} failed to start: {self._error}")
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the API server on {self.url} did not start within {timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Ask the server to exit (open streams get the graceful timeout) and wait for its thread."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        elif self._future is not None and not _on_loop(self.loop):  # waiting on the loop's own thread would hang
            with contextlib.suppress(concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                self._future.exception(timeout)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _on_loop(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether this thread is running ``loop`` now."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
