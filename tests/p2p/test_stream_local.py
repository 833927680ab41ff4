"""``MessageStream`` over a local Unix socket (no daemon): chunking, limits, timeouts, backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from meshinfer.errors import LimitExceededError, RemoteError, TransportError, WireError
from meshinfer.p2p.stream import MessageStream, StreamClosed, StreamSettings, StreamTimeout, run_handler
from meshinfer.wire.framing import HEADER, MAGIC, frames_of
from meshinfer.wire.limits import MIB, WireLimits
from meshinfer.wire.messages import Error, ErrorCode, Ping, Pong, Step, StepResult
from meshinfer.wire.tensor import decode_tensor, encode_tensor

Body = Callable[[MessageStream, MessageStream], Awaitable[Any]]


def with_pair(body: Body, *, server: StreamSettings | None = None, client: StreamSettings | None = None,
              limit: float = 30.0) -> Any:
    """Run ``body(client_stream, server_stream)`` over a fresh Unix socket pair."""

    async def main() -> Any:
        accepted: asyncio.Queue[MessageStream] = asyncio.Queue()

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put(MessageStream(reader, writer, peer_id="client", protocol="/t",
                                             settings=server or StreamSettings()))

        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "s.sock")
            srv = await asyncio.start_unix_server(on_conn, path=path)
            async with srv:
                reader, writer = await asyncio.open_unix_connection(path)
                c = MessageStream(reader, writer, peer_id="server", protocol="/t", settings=client or StreamSettings())
                s = await accepted.get()
                try:
                    async with asyncio.timeout(limit):
                        return await body(c, s)
                finally:
                    await c.close()
                    await s.close()

    return asyncio.run(main())


def test_5mib_tensor_round_trip() -> None:
    x = torch.randn(1280, 1024)  # 5 MiB float32

    async def body(c: MessageStream, s: MessageStream) -> Any:
        async def serve() -> None:
            msg = await s.recv()
            assert isinstance(msg, Step)
            await s.send(StepResult(session_id=msg.session_id, step_id=msg.step_id, hidden=msg.hidden))

        task = asyncio.create_task(serve())
        reply = await c.request(Step(session_id="s", step_id=1, position=0, hidden=encode_tensor(x)))
        await task
        return reply

    reply = with_pair(body)
    assert torch.equal(decode_tensor(reply.hidden), x)


def test_oversize_frame_header_fails_fast_not_by_timeout() -> None:
    async def body(c: MessageStream, s: MessageStream) -> Any:
        await c.write_raw(HEADER.pack(MAGIC, 1, 2**31))
        with pytest.raises(LimitExceededError):
            await s.recv(timeout=20)  # a limit error, not a timeout: no body was awaited
        with pytest.raises(LimitExceededError):  # the stream stays broken
            await s.recv()

    with_pair(body)


def test_message_size_limit() -> None:
    async def body(c: MessageStream, s: MessageStream) -> None:
        # the reader buffers at most ~2 MiB, so the sender waits for the receiver: send concurrently
        sender = asyncio.create_task(c.send(Ping(seq=1, payload=b"x" * (3 * MIB))))
        with pytest.raises(LimitExceededError, match="message of more than"):
            await s.recv()
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender

    with_pair(body, server=StreamSettings(limits=WireLimits(max_message_bytes=2 * MIB)))


def test_read_and_idle_timeouts() -> None:
    async def body(c: MessageStream, s: MessageStream) -> None:
        with pytest.raises(StreamTimeout, match="the next message"):
            await s.recv()  # idle: nothing sent at all
        with pytest.raises(StreamTimeout):  # broken from then on
            await s.recv()

    with_pair(body, server=StreamSettings(read_timeout=5, idle_timeout=0.2))

    async def stalled(c: MessageStream, s: MessageStream) -> None:
        frame = next(frames_of(b"\x81\xa4type\xa4ping"))
        await c.write_raw(frame[:3])  # a partial header, then silence
        with pytest.raises(StreamTimeout, match="the rest of a frame"):
            await s.recv()

    with_pair(stalled, server=StreamSettings(read_timeout=0.2, idle_timeout=30))


def test_clean_close_and_broken_close() -> None:
    async def body(c: MessageStream, s: MessageStream) -> None:
        await c.send(Ping(seq=1))
        await c.close()
        assert isinstance(await s.recv(), Ping)
        with pytest.raises(StreamClosed):
            await s.recv()
        with pytest.raises(TransportError):
            await c.send(Ping(seq=2))

    with_pair(body)

    async def mid_message(c: MessageStream, s: MessageStream) -> None:
        frame = next(frames_of(b"x" * 100))
        await c.write_raw(frame[:50])
        await c.close()
        with pytest.raises(TransportError, match="middle of a message"):
            await s.recv()

    with_pair(mid_message)


def test_backpressure_blocks_a_sender_whose_peer_does_not_read() -> None:
    async def body(c: MessageStream, s: MessageStream) -> None:
        with pytest.raises(TransportError, match="did not take data"):
            await c.send(Ping(seq=1, payload=b"x" * (16 * MIB)))  # the server never reads

    with_pair(body, client=StreamSettings(write_timeout=0.5))


def test_concurrent_senders_do_not_interleave_frames() -> None:
    async def body(c: MessageStream, s: MessageStream) -> list[int]:
        payloads = {i: bytes([i]) * (2 * MIB + i) for i in range(4)}
        await asyncio.gather(*(c.send(Ping(seq=i, payload=p)) for i, p in payloads.items()))
        seen = []
        for _ in payloads:
            msg = await s.recv()
            assert isinstance(msg, Ping) and msg.payload == payloads[msg.seq]
            seen.append(msg.seq)
        return sorted(seen)

    assert with_pair(body) == [0, 1, 2, 3]


@pytest.mark.parametrize(("exc", "code"), [
    (WireError("bad tensor"), ErrorCode.BAD_REQUEST),
    (LimitExceededError("too big"), ErrorCode.LIMIT_EXCEEDED),
    (RuntimeError("bug"), ErrorCode.INTERNAL),
])
def test_run_handler_replies_typed_errors(exc: Exception, code: str) -> None:
    async def handler(stream: MessageStream) -> None:
        await stream.recv()
        raise exc

    async def body(c: MessageStream, s: MessageStream) -> None:
        task = asyncio.create_task(run_handler(s, handler))
        with pytest.raises(RemoteError) as info:
            await c.request(Ping(seq=1))
        assert info.value.code == code
        if code == ErrorCode.INTERNAL:
            assert "bug" not in info.value.remote_message  # internals stay private
        with pytest.raises(StreamClosed):
            await c.recv()
        await task
        assert s.closed

    with_pair(body)


def test_run_handler_on_garbage_and_on_a_normal_end() -> None:
    async def echo(stream: MessageStream) -> None:
        async for msg in stream:
            assert isinstance(msg, Ping)
            await stream.send(Pong(seq=msg.seq))

    async def garbage(c: MessageStream, s: MessageStream) -> None:
        task = asyncio.create_task(run_handler(s, echo))
        assert isinstance(await c.request(Ping(seq=3)), Pong)
        await c.write_raw(b"\x00garbage")
        reply = await c.recv()
        assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_REQUEST and "magic" in reply.message
        await task

    with_pair(garbage)

    async def normal(c: MessageStream, s: MessageStream) -> None:
        task = asyncio.create_task(run_handler(s, echo))
        assert isinstance(await c.request(Ping(seq=4)), Pong)
        await c.close()
        await task  # ends quietly: no error on a clean close
        assert s.closed

    with_pair(normal)
