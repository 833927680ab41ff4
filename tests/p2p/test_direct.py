"""The direct data plane on 127.0.0.1, TLS and plain loopback: authentication both ways, refusals, bad peers."""

from __future__ import annotations

import asyncio
import ssl
import struct

import msgspec
import pytest

from meshinfer.errors import ConfigError, TransportError
from meshinfer.p2p.direct import DirectPlane
from meshinfer.p2p.directhello import (
    DIRECT_VERSION,
    HELLO_MAX_BYTES,
    NONCE_BYTES,
    DirectAddress,
    Hello,
    binding,
    parse_address,
)
from meshinfer.p2p.identity import Identity
from meshinfer.p2p.stream import DEFAULT_SETTINGS, MessageStream
from meshinfer.wire.messages import Ping, Pong

PROTO = "/meshinfer/test-echo/1"

IDS = [Identity.generate() for _ in range(3)]


async def _who_handler(stream: MessageStream) -> None:
    """Echo, with the payload replaced by the peer id the listener authenticated."""
    async for msg in stream:
        if isinstance(msg, Ping):
            await stream.send(Pong(seq=msg.seq, payload=stream.peer_id.encode()))


def run(coro_fn):
    """Run an async test body once per endpoint kind (TLS, plain loopback) against a fresh listener
    (IDS[0], serving PROTO) on a fresh loop."""
    async def main() -> None:
        plane = DirectPlane(IDS[0])
        await plane.listen("127.0.0.1", 0)
        plane.handle(PROTO, _who_handler, DEFAULT_SETTINGS)
        try:
            addresses = plane.addresses(["127.0.0.1"])
            assert addresses == [f"/ip4/127.0.0.1/tcp/{plane.plain_port}", f"/ip4/127.0.0.1/tcp/{plane.tls_port}/tls"]
            for addr in addresses:
                await coro_fn(plane, addr)
        finally:
            await plane.close()

    asyncio.run(main())


async def _ping(stream: MessageStream, seq: int = 1) -> bytes:
    reply = await stream.request(Ping(seq=seq, payload=b""), timeout=5.0)
    assert isinstance(reply, Pong) and reply.seq == seq
    return reply.payload


def test_round_trip_authenticates_both_ends() -> None:
    async def body(plane: DirectPlane, addr: str) -> None:
        dialer = DirectPlane(IDS[1])
        stream = await dialer.dial(IDS[0].peer_id, addr, PROTO, settings=DEFAULT_SETTINGS, timeout=5.0)
        assert stream.peer_id == IDS[0].peer_id
        assert (await _ping(stream)).decode() == IDS[1].peer_id  # the listener learned who dialled
        big = b"x" * (3 << 20)  # several frames
        reply = await stream.request(Ping(seq=2, payload=big), timeout=10.0)
        assert isinstance(reply, Pong) and reply.payload == IDS[1].peer_id.encode()
        await stream.close()

    run(body)


def test_wrong_peer_id_is_refused() -> None:
    async def body(plane: DirectPlane, addr: str) -> None:
        dialer = DirectPlane(IDS[1])
        with pytest.raises(TransportError, match="another key answered"):
            await dialer.dial(IDS[2].peer_id, addr, PROTO, settings=DEFAULT_SETTINGS, timeout=5.0)
        # dial_any tries the next address after a failure
        with pytest.raises(TransportError):
            await dialer.dial_any(IDS[0].peer_id, ["/ip4/127.0.0.1/tcp/1", "/bogus"], PROTO,
                                  settings=DEFAULT_SETTINGS, timeout=2.0)
        stream = await dialer.dial_any(IDS[0].peer_id, ["/ip4/127.0.0.1/tcp/1", addr], PROTO,
                                       settings=DEFAULT_SETTINGS, timeout=2.0)
        assert await _ping(stream)
        await stream.close()

    run(body)


def test_unknown_protocol_is_refused_with_the_reason() -> None:
    async def body(plane: DirectPlane, addr: str) -> None:
        with pytest.raises(TransportError, match="refused: protocol '/nope/1' is not served here"):
            await DirectPlane(IDS[1]).dial(IDS[0].peer_id, addr, "/nope/1", settings=DEFAULT_SETTINGS, timeout=5.0)

    run(body)


async def _raw(addr: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A connection to ``addr`` with no handshake yet, and the listener's certificate (b"" if plain)."""
    a = parse_address(addr)
    if not a.tls:
        reader, writer = await asyncio.open_connection(a.host, a.port)
        return reader, writer, b""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(a.host, a.port, ssl=ctx, server_hostname="")
    cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return reader, writer, cert


def _frame(hello: Hello) -> bytes:
    data = msgspec.msgpack.encode(hello)
    return struct.pack(">I", len(data)) + data


async def _listener_hello(reader: asyncio.StreamReader) -> Hello:
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    return msgspec.msgpack.decode(await reader.readexactly(n), type=Hello)


async def _closed_by_listener(reader: asyncio.StreamReader) -> bool:
    """Read what the listener sends until it closes the connection."""
    try:
        async with asyncio.timeout(5.0):
            while await reader.read(65536):
                pass
        return True
    except (ConnectionError, ssl.SSLError):
        return True


def test_forged_or_oversized_hellos_and_garbage_are_dropped_and_the_listener_keeps_serving() -> None:
    async def body(plane: DirectPlane, addr: str) -> None:
        # 1. a proof claiming IDS[1]'s key but signed by IDS[2]
        reader, writer, cert = await _raw(addr)
        nonce = b"n" * NONCE_BYTES
        writer.write(_frame(Hello(DIRECT_VERSION, IDS[1].public_key, protocol=PROTO, nonce=nonce)))
        theirs = await _listener_hello(reader)
        assert not theirs.error and len(theirs.nonce) == NONCE_BYTES
        writer.write(_frame(Hello(DIRECT_VERSION, IDS[1].public_key,
                                  IDS[2].sign(binding(b"dialer", nonce, theirs.nonce, cert)))))
        assert await _closed_by_listener(reader)
        writer.close()
        # 2. a signature replayed from another connection (other nonces) is refused
        reader, writer, cert = await _raw(addr)
        writer.write(_frame(Hello(DIRECT_VERSION, IDS[1].public_key, protocol=PROTO, nonce=nonce)))
        await _listener_hello(reader)
        writer.write(_frame(Hello(DIRECT_VERSION, IDS[1].public_key,
                                  IDS[1].sign(binding(b"dialer", nonce, b"m" * NONCE_BYTES, cert)))))
        assert await _closed_by_listener(reader)
        writer.close()
        # 3. a hello over the size limit, and one with no nonce
        for data in (struct.pack(">I", HELLO_MAX_BYTES + 1) + b"\0" * 16,
                     _frame(Hello(DIRECT_VERSION, IDS[1].public_key, protocol=PROTO))):
            reader, writer, _ = await _raw(addr)
            writer.write(data)
            assert await _closed_by_listener(reader)
            writer.close()
        # 4. garbage bytes instead of a handshake (or of TLS)
        a = parse_address(addr)
        r2, w2 = await asyncio.open_connection(a.host, a.port)
        w2.write(b"GET / HTTP/1.0\r\n\r\n" * 10)
        assert await _closed_by_listener(r2)
        w2.close()
        # the listener still serves honest peers
        stream = await DirectPlane(IDS[1]).dial(IDS[0].peer_id, addr, PROTO, settings=DEFAULT_SETTINGS, timeout=5.0)
        assert (await _ping(stream)).decode() == IDS[1].peer_id
        await stream.close()

    run(body)


@pytest.mark.parametrize("text", ["", "/ip4/1.2.3.4/udp/5/tls", "/ip4/1.2.3.4/tcp/0/tls", "/ip4//tcp/5/tls",
                                  "/ip4/1.2.3.4/tcp/x/tls", "/ip4/1.2.3.4/tcp/70000/tls", "ip4/1.2.3.4/tcp/5/tls",
                                  "/ip4/1.2.3.4/tcp/5", "/dns/example.org/tcp/5", "/ip4/1.2.3.4/tcp/5/quic"])
def test_bad_addresses_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


def test_address_round_trip() -> None:
    """Plain TCP only to loopback addresses; anything else must be TLS."""
    for text in ("/ip4/127.0.0.1/tcp/4000", "/ip6/::1/tcp/4000", "/dns/localhost/tcp/4000",
                 "/ip4/10.0.0.2/tcp/4000/tls", "/dns/example.org/tcp/4000/tls"):
        assert str(parse_address(text)) == text
    assert not parse_address("/ip4/127.0.0.1/tcp/4000").tls and parse_address("/ip4/127.0.0.1/tcp/1/tls").tls
    assert str(DirectAddress("::1", 5, True)) == "/ip6/::1/tcp/5/tls"
