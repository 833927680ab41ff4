"""``bench.wan_relay``: real sockets through the relay: the delay and the cap as measured, and the relay child
starting and stopping cleanly (also when its parent's pipe closes). Bounds are generous (a loaded 2-core CI
machine): a lower bound the schedule guarantees, an upper bound that only a broken relay misses."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import pytest

from meshinfer.bench.wan_relay import Relay, RelayProcess
from meshinfer.errors import ConfigError
from meshinfer.testing.procs import wait_gone


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


def test_round_trips_take_two_delays_and_the_handshake_one_more_round_trip() -> None:
    delay = 0.05

    async def main() -> tuple[float, list[float], bool]:
        server, port = await _echo_server()
        relay = Relay(delay_s=delay)
        try:
            rport = await relay.listen("127.0.0.1", port)
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", rport)
            writer.write(b"x" * 100)
            assert await reader.readexactly(100) == b"x" * 100
            first = time.monotonic() - t0
            trips = []
            for i in range(5):
                t1 = time.monotonic()
                writer.write(bytes([i]) * 1000)
                await reader.readexactly(1000)
                trips.append(time.monotonic() - t1)
            writer.close()
            return first, trips, relay.nodelay_ok
        finally:
            await relay.close()
            server.close()

    first, trips, nodelay = asyncio.run(main())
    assert first >= 4 * delay - 0.002  # SYN, SYN-ACK, data, reply
    assert first < 4 * delay + 1.0
    for trip in trips:
        assert 2 * delay - 0.002 <= trip < 2 * delay + 1.0
    assert nodelay


def test_relay_forwards_to_loopback_only() -> None:
    async def main() -> None:
        relay = Relay()
        try:
            for host in ("10.0.0.1", "example.com", "0.0.0.0"):
                with pytest.raises(ConfigError, match="loopback"):
                    await relay.listen(host, 80)
        finally:
            await relay.close()

    asyncio.run(main())


def test_bandwidth_cap_holds_a_bulk_transfer_to_the_rate() -> None:
    rate, size = 2_000_000.0, 600_000

    async def main() -> float:
        received = asyncio.get_running_loop().create_future()

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got = 0
            while got < size and (data := await reader.read(65536)):
                got += len(data)
            received.set_result(time.monotonic())
            writer.close()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        relay = Relay(delay_s=0.0, rate_bytes_s=rate)
        try:
            rport = await relay.listen("127.0.0.1", int(server.sockets[0].getsockname()[1]))
            _, writer = await asyncio.open_connection("127.0.0.1", rport)
            t0 = time.monotonic()
            writer.write(b"\0" * size)
            await writer.drain()
            done = await asyncio.wait_for(received, 30)
            writer.close()
            return done - t0
        finally:
            await relay.close()
            server.close()

    elapsed = asyncio.run(main())
    assert elapsed >= (size - 16384) / rate - 0.002
    assert elapsed < size / rate + 2.0


@pytest.mark.slow
def test_relay_process_forwards_then_stops_leaving_nothing() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        target = listener.getsockname()[1]
        relay = RelayProcess()
        try:
            relay.configure(20, 0)
            port = relay.listen(target)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"ping")
                peer, _ = listener.accept()
                with peer:
                    peer.settimeout(10)
                    assert peer.recv(4) == b"ping"
            stats = relay.stats()
            assert stats["nodelay"] and stats["bytes"] >= 4
        finally:
            relay.stop()
        assert wait_gone([relay.pid], 10) == []
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


@pytest.mark.slow
def test_relay_process_exits_on_interrupt_and_on_stdin_eof() -> None:
    relay = RelayProcess()
    relay.listen(9)  # any target: nothing dials it
    relay.proc.kill(signal.SIGINT)  # Ctrl-C reaches the whole foreground group, the relay included
    assert wait_gone([relay.pid], 10) == []
    relay.stop()
    other = RelayProcess()
    try:
        assert other.proc.proc.stdin is not None
        other.proc.proc.stdin.close()  # its parent vanished
        assert wait_gone([other.pid], 10) == []
    finally:
        other.stop()
