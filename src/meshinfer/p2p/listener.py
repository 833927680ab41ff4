"""A TCP listener (TLS or plain) whose cost per connection ends with the connection.

Contract: ``Listener(on_connection, ssl_context=..., ...)`` binds ``host:port`` (``start``), accepts
connections in one task of its own and, for each, runs the TLS handshake (when it has a context) in a task
bounded in number (``max_handshakes`` at once: more are closed at once, with a rate-limited warning) and in
time (``handshake_timeout``), then hands an asyncio reader/writer pair to ``on_connection``. A plain
listener may be limited to loopback peers. ``close()`` stops accepting and cancels what is in progress.

Why not ``asyncio.start_server(ssl=...)``: in CPython 3.11 every connection whose TLS handshake fails
(a client that connects and closes, or sends anything but TLS) leaves a reference cycle behind (the
handshake's exception -> its traceback -> the accepting coroutine's frame -> the waiter future -> the
exception), which holds the connection's ``SSLObject``, buffers and transport until a full garbage
collection, which a large process rarely runs: 4 x 3,000 connect/close cycles grew a server by ~520 MB
that never came back. Here the handshake runs in our own task (``loop.connect_accepted_socket``), so we
see its exception and drop its traceback chain, and everything is freed by reference counting at once.
Knows nothing of peers' keys, protocols or messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable

from meshinfer.errors import TransportError
from meshinfer.p2p.admission import RefusalLog

ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ACCEPT_RETRY_S = 0.1
"""Pause after a failed accept (e.g. out of file descriptors) before trying again."""


def forget_traceback(err: BaseException | None) -> None:
    """Drop the tracebacks of ``err`` and the exceptions chained to it: they hold the frames (and so the
    transports and buffers) of the code that raised them, often in a reference cycle."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        err.__traceback__ = None
        err = err.__cause__ or err.__context__


class Listener:
    """Accepts connections on one socket; see the module docstring."""

    def __init__(self, on_connection: ConnectionHandler, *, ssl_context: ssl.SSLContext | None,
                 handshake_timeout: float, max_handshakes: int, refusals: RefusalLog,
                 loopback_only: bool = False, name: str = "direct") -> None:
        self._on_connection = on_connection
        self._ssl = ssl_context
        self._handshake_timeout = handshake_timeout
        self._max_handshakes = max_handshakes
        self._refusals = refusals
        self._loopback_only = loopback_only
        self._name = name
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.handshakes = 0
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Bind and start accepting; the port bound. ``TransportError`` if the address cannot be used."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(addr)
                sock.listen(128)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
        except (OSError, IndexError) as err:
            raise TransportError(f"cannot listen for {self._name} connections on {host}:{port}: {err}") from None
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept_loop(sock), name=f"{self._name}-accept")
        return self.port

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as err:  # out of descriptors, connection aborted before accept, ...
                self._refusals.refused(f"{self._name}-accept", f"cannot accept a {self._name} connection: {err}")
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            host = str(addr[0]) if isinstance(addr, tuple) and addr else ""
            if self._loopback_only and not _is_loopback(host):
                conn.close()
                continue
            if self.handshakes >= self._max_handshakes:
                conn.close()
                self._refusals.refused(
                    f"{self._name}-handshakes",
                    f"a {self._name} connection from {host}: {self.handshakes} handshakes in progress "
                    f"(limit {self._max_handshakes})")
                continue
            self.handshakes += 1
            task = asyncio.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(reader)
            async with asyncio.timeout(self._handshake_timeout):
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, conn, ssl=self._ssl,
                    ssl_handshake_timeout=self._handshake_timeout if self._ssl is not None else None)
        except Exception as err:  # TLS refused, peer gone, timeout: only this connection is lost
            forget_traceback(err)
            conn.close()
            return
        finally:
            self.handshakes -= 1
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            await self._on_connection(reader, writer)
        finally:
            writer.close()

    async def close(self) -> None:
        """Stop accepting and cancel connections still in their handshake or being served (idempotent)."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._accepting
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
