"""The HTTP/1.1 protocol the gateway and the dashboard serve with: uvicorn's h11 protocol plus a deadline on every
stretch of a connection during which no request is being served.

Contract: ``guarded_protocol(limits)`` returns an ``H11Protocol`` subclass for ``uvicorn.Config(http=...)``.
uvicorn bounds a request head's size (``h11_max_incomplete_event_size``) and the idle time between requests
(``timeout_keep_alive``), but a client that connects and sends nothing, or dribbles a request head a byte at
a time (slowloris), or keeps sending the unread body of a request already answered (e.g. after a 413), holds
its socket forever. Here such a connection
gets ``limits.header_timeout`` seconds from its connect (or from the first byte after a finished response) until
its next request head is complete; then it is closed (with a bare ``408 Request Timeout`` when nothing of a
request was answered yet). A connection closed after its response while the client still sends the request's
body (a 413 to a client that asked for ``Connection: close``) closes lingering: its write side first, so the
client reads the answer instead of a reset, then the rest of the body is read and discarded (never buffered)
until the client's EOF or the same deadline. While the app serves a request, no deadline runs here: the app
bounds the body's arrival itself (``HttpLimits.body_timeout``) and a stream may last as long as the generation.
Knows nothing of the routes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from meshinfer.gateway.config import HttpLimits

log = logging.getLogger(__name__)

TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class _LingeringTransport:
    """The protocol's view of its transport: ``close()`` lingers while the request's body is still coming."""

    def __init__(self, transport: asyncio.Transport, protocol: _GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        transport = self._transport
        if self._protocol.conn.their_state is h11.SEND_BODY and not transport.is_closing() \
                and transport.can_write_eof():
            self._protocol.linger()
        else:
            transport.close()


class _GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` with the head deadline of the module docstring (``header_timeout`` set by the factory)."""

    header_timeout: float = 15.0
    _deadline: asyncio.TimerHandle | None = None
    _lingering: bool = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, _LingeringTransport(transport, self)))
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a refused body: discarded
        super().data_received(data)
        self._watch()

    def linger(self) -> None:
        """Close the write side now, read and discard until EOF or the deadline, then close."""
        if self._lingering:
            return
        self._lingering = True
        self.transport.write_eof()
        self.transport.resume_reading()
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY:  # answered before its body was read: it drains under a deadline
            self._watch()

    def _serving(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _watch(self) -> None:
        if self._lingering:
            return
        if self.transport.is_closing() or self._serving():
            self._disarm()
        elif self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._lingering:
            cast(_LingeringTransport, self.transport)._transport.close()
            return
        if self.transport.is_closing() or self._serving():
            return
        if self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE:
            self.transport.write(TIMEOUT_RESPONSE)
        log.debug("closing %s: no complete request head within %g s (limit --header-timeout)", self.client,
                  self.header_timeout)
        self.transport.close()


def guarded_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """The protocol class to serve with under ``limits`` (see the module docstring)."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {"header_timeout": limits.header_timeout})
