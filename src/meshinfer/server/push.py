"""Outgoing push streams: one pooled ``meshinfer/push/1`` stream per next-hop peer, shared by sessions.

Contract: ``PushPool.push(hop, step)`` sends a ``Step`` to the server ``hop`` names over a stream it
opens on first use (dialling ``hop.maddrs`` when given) and keeps for later steps of every session
going to that peer. A send that fails drops the stream and is retried once on a fresh one
(reconnect); if that fails too, ``push`` raises ``TransportError`` and the caller reports
``next_hop_failed`` to its client. Each pooled stream has a reader task: the receiving server answers
a pushed step it cannot take (e.g. an unknown session) with an ``Error`` naming the session it was
addressed to, and the pool hands that ``Error`` to ``on_error``. ``warm(hop)`` opens the stream ahead of
the first push (at a session's ``Open``). Streams close on ``close()``. Knows nothing of
sessions or models; never pushes to itself (the caller short-cuts that case).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from meshinfer.errors import MeshinferError, TransportError
from meshinfer.p2p.node import PeerNode
from meshinfer.p2p.stream import MessageStream, StreamSettings
from meshinfer.tasks import stop_task
from meshinfer.wire.messages import Error, Hop, Step, encode_message

log = logging.getLogger(__name__)

PUSH_PROTOCOL = "/meshinfer/push/1"
"""Server-to-server streams carrying pushed steps (docs/architecture.md section 10)."""


class PushPool:
    """Pooled push streams to next-hop servers, opened lazily, reopened after a failure."""

    def __init__(self, node: PeerNode, on_error: Callable[[Error], None], *, settings: StreamSettings,
                 open_timeout: float = 5.0) -> None:
        self._node = node
        self._on_error = on_error
        self._settings = settings
        self._open_timeout = open_timeout
        self._streams: dict[str, MessageStream] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._readers: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def peers(self) -> list[str]:
        return sorted(self._streams)

    async def _stream(self, hop: Hop) -> MessageStream:
        lock = self._locks.setdefault(hop.peer_id, asyncio.Lock())
        async with lock:
            stream = self._streams.get(hop.peer_id)
            if stream is not None and not stream.closed:
                return stream
            if self._closed:
                raise TransportError("push pool is closed")
            stream = await self._node.open_stream(hop.peer_id, PUSH_PROTOCOL, maddrs=hop.maddrs, direct=hop.direct,
                                                  timeout=self._open_timeout, settings=self._settings)
            self._streams[hop.peer_id] = stream
            task = asyncio.create_task(self._read(hop.peer_id, stream), name=f"push-reader:{hop.peer_id[:12]}")
            self._readers.add(task)
            task.add_done_callback(self._readers.discard)
            log.debug("opened push stream to %s", hop.peer_id)
            return stream

    def warm(self, hop: Hop) -> None:
        """Open the stream to ``hop``'s server in the background if none is open (a session pushing there was just
        opened: its first push then finds the stream ready); a failure is left to ``push``."""
        stream = self._streams.get(hop.peer_id)
        if self._closed or (stream is not None and not stream.closed):
            return
        lock = self._locks.get(hop.peer_id)
        if lock is not None and lock.locked():
            return  # being opened already

        async def dial() -> None:
            with contextlib.suppress(MeshinferError):
                await self._stream(hop)

        task = asyncio.create_task(dial(), name=f"push-warm:{hop.peer_id[:12]}")
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _drop(self, peer_id: str, stream: MessageStream) -> None:
        if self._streams.get(peer_id) is stream:
            del self._streams[peer_id]
        await stream.close(timeout=0.5)

    async def push(self, hop: Hop, step: Step) -> None:
        """Send ``step`` to ``hop``'s server; one reconnect on failure, then ``TransportError``."""
        payload = encode_message(step)
        last: MeshinferError | None = None
        for attempt in range(2):
            try:
                stream = await self._stream(hop)
            except MeshinferError as err:
                last = err
                continue
            try:
                await stream.send_bytes(payload)
                return
            except MeshinferError as err:
                last = err
                log.info("push to %s failed (attempt %d): %s", hop.peer_id, attempt + 1, err)
                await self._drop(hop.peer_id, stream)
        raise TransportError(f"cannot push to next hop {hop.peer_id}: {last}")

    def push_nowait(self, hop: Hop, step: Step) -> bool:
        """Send ``step`` at once over an open, idle stream to ``hop``; False: nothing sent, use ``push``."""
        stream = self._streams.get(hop.peer_id)
        if stream is None or stream.closed:
            return False
        try:
            return stream.send_nowait(encode_message(step))
        except MeshinferError:
            return False

    async def _read(self, peer_id: str, stream: MessageStream) -> None:
        """Pass the next hop's ``Error`` replies on; drop the stream when it ends."""
        try:
            async for msg in stream:
                if isinstance(msg, Error):
                    try:
                        self._on_error(msg)
                    except Exception:
                        log.exception("handling an error from next hop %s failed", peer_id)
        except MeshinferError as err:
            log.debug("push stream to %s ended: %s", peer_id, err)
        finally:
            await self._drop(peer_id, stream)

    async def close(self) -> None:
        self._closed = True
        for peer_id, stream in list(self._streams.items()):
            await self._drop(peer_id, stream)
        for task in list(self._readers):
            await stop_task(task, errors=(Exception,))
