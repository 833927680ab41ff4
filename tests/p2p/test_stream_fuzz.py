"""Session streams against a real echo peer process: round trips, limits, timeouts, fuzzing, death.

The echo peer (``python -m meshinfer.p2p.echo``) runs as a separate process for the whole module with
a 2 s read timeout; the client is an in-process ``PeerNode`` on a ``LoopThread``. A "bystander"
stream stays open from the first test to the last and must keep working while other streams are
fed garbage.
"""

from __future__ import annotations

import asyncio
import signal
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from swarm_helpers import stop_all

from fuzzing import budget
from meshinfer.config import P2PConfig
from meshinfer.errors import LimitExceededError, TransportError, WireError
from meshinfer.loopthread import LoopThread
from meshinfer.p2p import ECHO_PROTOCOL, MessageStream, PeerNode, StreamClosed
from meshinfer.p2p.stream import StreamTimeout
from meshinfer.testing.procs import ManagedProcess, python_argv, wait_gone
from meshinfer.types import BlockRange
from meshinfer.wire.framing import HEADER, MAGIC, check_magic, frames_of, parse_header
from meshinfer.wire.messages import (
    ERROR_CODES,
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    Open,
    Opened,
    Ping,
    Pong,
    Step,
    StepResult,
    encode_message,
)
from meshinfer.wire.tensor import decode_tensor, encode_tensor

pytestmark = pytest.mark.slow

SERVER_READ_TIMEOUT = 2.0


def start_echo() -> tuple[ManagedProcess, dict[str, Any]]:
    proc = ManagedProcess(python_argv("meshinfer.p2p.echo", "--read-timeout", str(SERVER_READ_TIMEOUT)),
                          name="echo peer")
    try:
        return proc, proc.read_json(timeout=90)
    except BaseException:
        proc.stop()
        raise


@dataclass
class Client:
    runner: LoopThread
    node: PeerNode
    echo: ManagedProcess
    peer_id: str
    maddrs: list[str]
    bystander: MessageStream
    direct: list[str]

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return self.runner.run(coro, timeout)

    def open(self, plane: str = "libp2p") -> MessageStream:
        """A stream to the echo peer over libp2p, or the direct plane's "tls" or "plain" endpoint."""
        if plane == "libp2p":
            return self.run(self.node.open_stream(self.peer_id, ECHO_PROTOCOL, maddrs=self.maddrs))
        address = next(a for a in self.direct if a.endswith("/tls") == (plane == "tls"))
        return self.run(self.node._direct.dial(self.peer_id, address, ECHO_PROTOCOL,  # type: ignore[union-attr]
                                               settings=self.node.settings.stream, timeout=10))

    def bystander_round_trip(self, seq: int) -> None:
        reply = self.run(self.bystander.request(Ping(seq=seq, payload=b"still here"), timeout=10))
        assert isinstance(reply, Pong) and reply.seq == seq and reply.payload == b"still here"


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    echo, info = start_echo()
    runner = LoopThread().start()
    node = None
    try:
        node = runner.run(PeerNode.start(P2PConfig()), 60)
        bystander = runner.run(node.open_stream(info["peer_id"], ECHO_PROTOCOL, maddrs=info["maddrs"]), 30)
        yield Client(runner, node, echo, info["peer_id"], info["maddrs"], bystander, info["direct_addresses"])
        assert echo.alive(), f"echo peer died:\n{echo.stderr_tail()}"
        assert "Traceback" not in echo.stderr_tail(200), echo.stderr_tail(200)
    finally:
        if node is not None:
            runner.run(node.close(), 30)
        runner.stop()
        stop_all([echo])


async def exchange(stream: MessageStream, data: bytes, quiet: float) -> list[Any]:
    """Write raw ``data``, then collect what comes back until the peer closes or stays ``quiet`` s."""
    out: list[Any] = []
    try:
        await stream.write_raw(data)
    except TransportError:
        return ["closed-before-write"]
    while True:
        try:
            out.append(await stream.recv(timeout=quiet))
        except StreamClosed:
            out.append("closed")
            return out
        except StreamTimeout:
            out.append("quiet")
            return out
        except TransportError:
            out.append("broken")
            return out
    # a WireError here (the peer sent us garbage) propagates and fails the test


def check_outcome(data: bytes, outcome: list[Any]) -> None:
    *messages, end = outcome
    assert end in ("closed", "quiet", "broken", "closed-before-write"), outcome
    for i, msg in enumerate(messages):
        assert isinstance(msg, Error | Pong | Opened | StepResult), outcome
        if isinstance(msg, Error):
            assert msg.code in ERROR_CODES, msg
            assert i == len(messages) - 1 and end in ("closed", "broken"), outcome  # an Error ends the stream
    if data[0] != MAGIC or len(data) >= 6:
        try:
            check_magic(data[0])
            parse_header(data[:6])
        except WireError as err:  # the very first header is bad: a typed reply must say so
            assert messages and isinstance(messages[-1], Error), outcome
            want = ErrorCode.LIMIT_EXCEEDED if isinstance(err, LimitExceededError) else ErrorCode.BAD_REQUEST
            assert messages[-1].code == want, (messages[-1], err)


def fuzz(client: Client, data: bytes, seq: int, plane: str = "libp2p") -> list[Any]:
    stream = client.open(plane)
    try:
        outcome = client.run(exchange(stream, data, quiet=0.3))
    finally:
        client.run(stream.close())
    check_outcome(data, outcome)
    client.bystander_round_trip(seq)
    return outcome


def test_ping_and_open_round_trip(client: Client) -> None:
    client.bystander_round_trip(1)
    stream = client.open()
    try:
        opened = client.run(stream.request(Open(session_id="s1", model="m", span=BlockRange(0, 4), max_length=64,
                                                dtype="float16")))
        assert opened == Opened(session_id="s1", span=BlockRange(0, 4), max_length=64)
    finally:
        client.run(stream.close())


def test_5mib_tensor_round_trips_in_chunks(client: Client) -> None:
    x = torch.randn(640, 2048)  # 5 MiB of float32: six 1 MiB frames each way
    stream = client.open()
    try:
        reply = client.run(stream.request(Step(session_id="s", step_id=3, position=0, hidden=encode_tensor(x))))
    finally:
        client.run(stream.close())
    assert isinstance(reply, StepResult) and reply.step_id == 3
    assert torch.equal(decode_tensor(reply.hidden), x)


def test_oversized_frame_header_is_refused_before_reading_a_body(client: Client) -> None:
    stream = client.open()
    try:  # announces 2 GiB, sends none of it: the answer must come at once, not after a timeout
        out = client.run(exchange(stream, HEADER.pack(MAGIC, 1, 2**31), quiet=SERVER_READ_TIMEOUT / 2))
    finally:
        client.run(stream.close())
    assert isinstance(out[0], Error) and out[0].code == ErrorCode.LIMIT_EXCEEDED and out[1] == "closed", out


@pytest.mark.parametrize(("payload", "code"), [
    (msgspec.msgpack.encode({"type": "ping", "seq": 1, "v": PROTOCOL_VERSION + 1}), ErrorCode.VERSION_MISMATCH),
    (msgspec.msgpack.encode({"type": "nonsense", "v": PROTOCOL_VERSION}), ErrorCode.BAD_REQUEST),
    (encode_message(Step(session_id="s", step_id=0, position=0,
                         hidden=encode_tensor(torch.zeros(1, 40000, dtype=torch.float16)))), ErrorCode.LIMIT_EXCEEDED),
])
def test_bad_messages_get_typed_errors(client: Client, payload: bytes, code: str) -> None:
    stream = client.open()
    try:
        out = client.run(exchange(stream, b"".join(frames_of(payload)), quiet=SERVER_READ_TIMEOUT / 2))
    finally:
        client.run(stream.close())
    assert isinstance(out[0], Error) and out[0].code == code and out[1] == "closed", out


def test_stalled_sender_times_out_while_others_are_served(client: Client) -> None:
    stream = client.open()
    try:
        frame = b"".join(frames_of(encode_message(Ping(seq=1, payload=b"abc"))))
        client.run(stream.write_raw(frame[:-2]))  # most of a frame, then silence
        for seq in range(10, 15):  # meanwhile the bystander is answered
            client.bystander_round_trip(seq)
        reply = client.run(stream.recv(timeout=SERVER_READ_TIMEOUT + 5))
        assert isinstance(reply, Error) and reply.code == ErrorCode.TIMEOUT
        with pytest.raises(StreamClosed):
            client.run(stream.recv(timeout=5))
    finally:
        client.run(stream.close())


def test_client_read_timeout(client: Client) -> None:
    stream = client.open()
    try:
        with pytest.raises(StreamTimeout):
            client.run(stream.recv(timeout=0.3))
        with pytest.raises(TransportError):  # the stream is broken from then on
            client.run(stream.recv(timeout=5))
    finally:
        client.run(stream.close())


FUZZ = budget(40)


@FUZZ
@given(data=st.binary(min_size=1, max_size=4096))
def test_fuzz_random_bytes(client: Client, data: bytes) -> None:
    fuzz(client, data, seq=100)


def _valid_frames() -> st.SearchStrategy[bytes]:
    messages = st.sampled_from([
        Ping(seq=5, payload=b"p" * 40),
        Open(session_id="s", model="m", span=BlockRange(0, 2), max_length=8, dtype="bfloat16"),
        Step(session_id="s", step_id=1, position=2, hidden=encode_tensor(torch.ones(2, 8))),
    ])
    return st.lists(messages, min_size=1, max_size=3).map(
        lambda msgs: b"".join(frame for m in msgs for frame in frames_of(encode_message(m)))
    )


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(_valid_frames()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and len(data) > 1:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "truncate" and len(data) > 1:
            del data[max(1, pos):]
    return bytes(data) or b"\x00"


@FUZZ
@given(data=mutated_frames())
def test_fuzz_mutated_frames(client: Client, data: bytes) -> None:
    fuzz(client, data, seq=200)


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    """A valid message's frames, then headers declaring any length (far past every limit included) with
    bodies cut short, and a cut anywhere."""
    data = bytearray(draw(_valid_frames()))
    for _ in range(draw(st.integers(1, 3))):
        declared = draw(st.one_of(st.integers(1, 64), st.integers(2**20 - 2, 2**20 + 2), st.integers(0, 2**32 - 1)))
        data += HEADER.pack(MAGIC, draw(st.sampled_from([0, 1])), declared)
        data += draw(st.binary(max_size=min(declared, 64)))
    return bytes(data[:draw(st.integers(1, len(data)))])


@FUZZ
@given(data=st.one_of(mutated_frames(), hostile_frames()), plane=st.sampled_from(["tls", "plain"]))
def test_fuzz_direct_plane_frames(client: Client, data: bytes, plane: str) -> None:
    """The same fuzzing over the direct plane (TLS and plain loopback endpoints) after a real handshake."""
    fuzz(client, data, seq=300, plane=plane)


@budget(40)
@given(body=st.one_of(st.binary(max_size=300), st.builds(
    lambda key, proto, nonce: msgspec.msgpack.encode([2, key, b"", proto, nonce, ""]),
    st.binary(max_size=600), st.text(max_size=40), st.binary(max_size=70))),
    declared=st.one_of(st.none(), st.just(0), st.integers(4097, 2**32 - 1)))
def test_fuzz_direct_hellos(client: Client, body: bytes, declared: int | None) -> None:
    """Raw first hellos on the plain direct port (any bytes, or msgpack hellos with any key, protocol and
    nonce; any declared length): the echo peer closes the connection and keeps serving."""
    address = next(a for a in client.direct if not a.endswith("/tls")).split("/")
    length = len(body) if declared is None else declared

    async def attempt() -> bytes:
        reader, writer = await asyncio.open_connection(address[2], int(address[4]))
        try:
            writer.write(struct.pack(">I", length) + body)
            async with asyncio.timeout(8.0):  # the handshake timeout (5 s) at the latest
                return await reader.read()
        finally:
            writer.close()

    reply = client.run(attempt())
    assert len(reply) < 4096  # at most a refusal hello, then the end
    client.bystander_round_trip(400)


def test_echo_peer_survived_the_fuzzing(client: Client) -> None:
    client.bystander_round_trip(999)
    stream = client.open()  # and new clients are still welcome
    try:
        assert isinstance(client.run(stream.request(Ping(seq=1000))), Pong)
    finally:
        client.run(stream.close())


def test_peer_death_is_a_transport_error_not_a_hang(client: Client) -> None:
    echo, info = start_echo()
    try:
        stream = client.run(client.node.open_stream(info["peer_id"], ECHO_PROTOCOL, maddrs=info["maddrs"]))
        assert isinstance(client.run(stream.request(Ping(seq=1))), Pong)
        children = echo.descendants()
        echo.kill(signal.SIGKILL)
        echo.proc.wait(timeout=10)

        async def after_death() -> BaseException | None:
            try:
                await stream.send(Ping(seq=2))
                await stream.recv(timeout=10)
            except TransportError as err:
                return err
            return None

        assert isinstance(client.run(after_death()), TransportError)
        client.run(stream.close())
        assert wait_gone(children, timeout=10) == []
    finally:
        stop_all([echo])


def test_streams_are_independent_under_concurrency(client: Client) -> None:
    async def many() -> list[int]:
        streams = [await client.node.open_stream(client.peer_id, ECHO_PROTOCOL) for _ in range(8)]
        try:
            async def talk(i: int, s: MessageStream) -> int:
                for j in range(5):
                    reply = await s.request(Ping(seq=i * 100 + j, payload=bytes([i]) * 1000))
                    assert isinstance(reply, Pong) and reply.seq == i * 100 + j and reply.payload[0] == i
                return i

            return await asyncio.gather(*(talk(i, s) for i, s in enumerate(streams)))
        finally:
            for s in streams:
                await s.close()

    assert client.run(many()) == list(range(8))
