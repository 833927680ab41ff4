"""``MessageStream``: ordered typed messages over one bidirectional byte stream between two peers.

Contract: wraps an asyncio reader/writer pair (what the p2p daemon hands out per stream) with the
frame format of ``meshinfer.wire.framing``. ``send`` encodes a message, splits payloads over
``CHUNK_BYTES`` into frames and awaits ``drain`` after each frame (backpressure; a write that cannot
drain within ``write_timeout`` raises ``TransportError``); ``send_nowait`` is the synchronous fast path
for a small message when nothing is waiting to be written (returns False when the caller must use
``send``, so message order is always kept). ``recv`` reads one message: every frame
read is bounded by a timeout (``idle_timeout`` for the next message to start, ``read_timeout``
once it has, ``message_timeout`` for a whole message; on an accepted stream ``first_timeout`` bounds the
wait for, and every frame of, its first message), every header is checked against ``WireLimits`` before
its body is read, reassembly refuses oversize messages, and malformed bytes raise ``WireError``. A
stream given an ``Admission`` reserves the bytes of a message in progress against its peer's and the
node's buffer caps before reading each body and gives them back when the message is done or the read
fails (``LimitExceededError`` past a cap). A clean end of stream
at a message boundary raises ``StreamClosed``, a read timeout ``StreamTimeout`` (both
``TransportError``); ``StreamClosed`` also ends ``async for``. After a framing error or a timeout the
stream is broken: further ``recv`` calls raise at once. Sends are serialised by a lock, so several
tasks may share one stream. ``run_handler`` is the server side: it runs a handler on an incoming
stream, turns a ``WireError`` (or a read timeout) into a typed ``Error`` reply, reports anything
unexpected as ``internal``, and always closes the stream, so one bad peer never disturbs the others.
Knows nothing of hivemind or the DHT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from meshinfer.errors import ConfigError, MeshinferError, RemoteError, TransportError, WireError
from meshinfer.p2p.admission import Admission
from meshinfer.wire.framing import HEADER_BYTES, Reassembler, check_magic, frames_of, parse_header
from meshinfer.wire.limits import CHUNK_BYTES, DEFAULT_LIMITS, WireLimits
from meshinfer.wire.messages import Error, ErrorCode, Message, decode_message, encode_message, error_message

log = logging.getLogger(__name__)

READ_BUFFER_BYTES = 4 * CHUNK_BYTES
"""A stream's reader buffers at most twice this before it stops reading the socket (backpressure)."""


class StreamClosed(TransportError):
    """The peer ended the stream cleanly (between two messages)."""


class StreamTimeout(TransportError):
    """The peer sent nothing (or not enough) within the read timeout."""


@dataclass(frozen=True)
class StreamSettings:
    """Timeouts and limits of one stream."""

    read_timeout: float = 30.0
    """Seconds to wait for the rest of a frame once it started (a peer stalled mid-message)."""
    idle_timeout: float | None = None
    """Seconds to wait for the first byte of the next message; None: the same as ``read_timeout``.
    A server's idle sessions end after this; a client waiting for a slow reply may want it long."""
    write_timeout: float = 30.0
    """Seconds a write may wait for the peer to take data (backpressure) before giving up."""
    message_timeout: float = 120.0
    """Seconds one message may take from its first byte to its last (however it is cut into frames)."""
    first_timeout: float | None = 5.0
    """On an accepted stream: seconds to wait for its first message (e.g. ``Open``) to start, and for each
    of its frames; None: as for later messages. A peer that connects and stays silent or trickles is closed."""
    limits: WireLimits = field(default_factory=WireLimits)

    def __post_init__(self) -> None:
        for name in ("read_timeout", "write_timeout", "message_timeout", "idle_timeout", "first_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"stream {name} must be > 0, got {value}")


DEFAULT_SETTINGS = StreamSettings(limits=DEFAULT_LIMITS)


class MessageStream:
    """One end of a session stream with peer ``peer_id`` speaking ``protocol``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, peer_id: str,
                 protocol: str, settings: StreamSettings = DEFAULT_SETTINGS, accepted: bool = False,
                 admission: Admission | None = None) -> None:
        self.peer_id = peer_id
        self.protocol = protocol
        self.settings = settings
        self._reader = reader
        # asyncio's default 64 KiB reader limit pauses the transport every 128 KiB of a large message;
        # a bigger one lets readexactly() fill a 1 MiB frame without that churn (no public setter).
        if getattr(reader, "_limit", READ_BUFFER_BYTES) < READ_BUFFER_BYTES:
            reader._limit = READ_BUFFER_BYTES  # pyright: ignore[reportAttributeAccessIssue]  # private, not in typeshed
        self._writer = writer
        self._send_lock = asyncio.Lock()
        self._broken: MeshinferError | None = None
        self._closed = False
        self._admission = admission
        self._awaiting_first = accepted and settings.first_timeout is not None
        self._mid_send = False  # a send was interrupted inside a message (same)
        self._mid_message = False  # a recv was interrupted inside a message: the framing is lost for reuse
        self.dial_rtt_s: float | None = None
        """The round trip measured while this stream's connection was dialled (direct plane hellos), if any."""
        self.reused = False
        """Whether this stream came from the node's idle pool (carried an earlier session before)."""

    def __repr__(self) -> str:
        return f"MessageStream(peer={self.peer_id[:12]}…, protocol={self.protocol})"

    @property
    def closed(self) -> bool:
        return self._closed

    def reusable(self) -> bool:
        """Whether the connection can carry another session: open, unbroken, at a message boundary, nothing in
        the middle of being written, and the peer has not ended it."""
        return not (self._closed or self._broken is not None or self._mid_message or self._mid_send
                    or self._send_lock.locked()
                    or self._writer.is_closing() or self._reader.exception() is not None
                    or getattr(self._reader, "_eof", False))  # private: at_eof() is False while data is buffered

    # --- sending ------------------------------------------------------------------------------

    async def send(self, msg: Message) -> None:
        """Send one message (chunked when large); waits while the peer is slow to read."""
        await self.send_bytes(encode_message(msg))

    async def send_bytes(self, payload: bytes) -> None:
        """Send an already encoded message payload as frames."""
        async with self._send_lock:
            self._mid_send = True
            for frame in frames_of(payload, CHUNK_BYTES):
                await self._write(frame)
            self._mid_send = False

    def send_nowait(self, payload: bytes) -> bool:
        """Write an encoded message payload now, without yielding to the event loop, if that is safe:
        one frame, no send in progress and nothing left in the transport's buffer. False: nothing was
        written, use ``send_bytes``. A broken connection raises ``TransportError``."""
        if (self._closed or self._send_lock.locked() or len(payload) > CHUNK_BYTES
                or self._writer.is_closing() or self._writer.transport.get_write_buffer_size() > 0):
            return False
        try:
            for frame in frames_of(payload, CHUNK_BYTES):
                self._writer.write(frame)
        except (ConnectionError, OSError, RuntimeError) as err:
            raise TransportError(f"stream to {self.peer_id} broke while sending: {err}") from None
        return True

    async def write_raw(self, data: bytes) -> None:
        """Write bytes with no framing at all (diagnostics and fuzz tests only)."""
        async with self._send_lock:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        if self._closed or self._writer.is_closing():
            raise TransportError(f"stream to {self.peer_id} is closed")
        try:
            self._writer.write(data)
            async with asyncio.timeout(self.settings.write_timeout):
                await self._writer.drain()
        except TimeoutError:
            raise TransportError(
                f"peer {self.peer_id} did not take data for {self.settings.write_timeout:g}s"
            ) from None
        except (ConnectionError, OSError, RuntimeError) as err:
            raise TransportError(f"stream to {self.peer_id} broke while sending: {err}") from None

    # --- receiving ----------------------------------------------------------------------------

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message. ``timeout`` overrides both ``idle_timeout`` and ``read_timeout``."""
        payload = await self.recv_bytes(timeout)
        return decode_message(payload, self.settings.limits)

    async def recv_bytes(self, timeout: float | None = None) -> bytes:
        """The next message payload, undecoded (still framed, size-limited and timed out)."""
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise StreamClosed(f"stream to {self.peer_id} is closed")
        settings = self.settings
        idle = settings.idle_timeout if timeout is None else timeout
        if idle is None:
            idle = settings.read_timeout
        limit = settings.read_timeout if timeout is None else timeout
        if self._awaiting_first and settings.first_timeout is not None:
            idle, limit = min(idle, settings.first_timeout), min(limit, settings.first_timeout)
        asm = Reassembler(settings.limits)
        waiting = "the next message"
        reserved = 0
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(idle):
                first = await self._reader.readexactly(1)
            self._mid_message = True
            waiting, header = "the rest of a frame", first
            check_magic(first[0])
            deadline = loop.time() + settings.message_timeout
            while True:
                frame_deadline = min(loop.time() + limit, deadline)
                async with asyncio.timeout_at(frame_deadline):
                    header += await self._reader.readexactly(HEADER_BYTES - len(header))
                    length, last = parse_header(header, settings.limits)
                    asm.reserve(length)
                    if self._admission is not None:
                        self._admission.reserve(self.peer_id, length)
                        reserved += length
                    body = await self._reader.readexactly(length)
                asm.add(body)
                if last:
                    self._awaiting_first = False
                    self._mid_message = False
                    return asm.take()
                header = b""
                if loop.time() >= deadline:
                    waiting = f"a message within {settings.message_timeout:g}s (message timeout)"
                    raise TimeoutError
        except asyncio.IncompleteReadError:
            if waiting == "the next message":
                raise StreamClosed(f"peer {self.peer_id} closed the stream") from None
            raise self._break(
                TransportError(f"stream from {self.peer_id} ended in the middle of a message")
            ) from None
        except TimeoutError:
            raise self._break(StreamTimeout(f"peer {self.peer_id} sent {waiting} too slowly (timeout)")) from None
        except WireError as err:
            raise self._break(err) from None
        except (ConnectionError, OSError) as err:
            raise self._break(TransportError(f"stream from {self.peer_id} broke: {err}")) from None
        finally:
            if reserved and self._admission is not None:
                self._admission.unreserve(self.peer_id, reserved)

    def _break(self, err: MeshinferError) -> MeshinferError:
        self._broken = err
        return err

    async def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and return the next message; an ``Error`` reply raises ``RemoteError``."""
        await self.send(msg)
        reply = await self.recv(timeout)
        if isinstance(reply, Error):
            raise RemoteError(reply.code, reply.message)
        return reply

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.recv()
            except StreamClosed:
                return

    # --- closing ------------------------------------------------------------------------------

    async def close(self, timeout: float = 2.0) -> None:
        """Close our side (idempotent, never raises)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._writer.close()
            async with asyncio.timeout(timeout):
                await self._writer.wait_closed()

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


StreamHandler = Callable[[MessageStream], Awaitable[None]]


async def run_handler(stream: MessageStream, handler: StreamHandler) -> None:
    """Serve one incoming stream with ``handler``; reply a typed ``Error`` on failure; always close."""
    try:
        await handler(stream)
    except StreamClosed:
        pass
    except StreamTimeout as err:
        log.debug("timeout on %r: %s", stream, err)
        await _reply_error(stream, Error(code=ErrorCode.TIMEOUT, message=str(err)))
    except WireError as err:
        log.debug("bad input on %r: %s", stream, err)
        await _reply_error(stream, error_message(err))
    except TransportError as err:
        log.debug("transport failure on %r: %s", stream, err)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("handler for %s failed", stream.protocol)
        await _reply_error(stream, Error(code=ErrorCode.INTERNAL, message="internal error in the peer"))
    finally:
        await stream.close()


async def _reply_error(stream: MessageStream, err: Error) -> None:
    with contextlib.suppress(MeshinferError, TimeoutError):
        async with asyncio.timeout(2.0):
            await stream.send(err)
