"""Attacks on a real server's direct plane (issue 17, findings 3, 6 and the slowloris part of 9).

One ``meshinfer serve`` of the demo model (every block, TLS direct port fixed, at most 4 streams per peer)
and its bootstrap run as processes on 127.0.0.1 for the module. A stranger with self-made keys floods
unfinished 1 MiB frames, cycles TCP connect/close on the TLS port, holds silent and trickling sockets, and
opens more streams than its cap; each attack must be contained (connections closed in bounded time, the
server's RSS within 10% of its baseline) while an honest client keeps getting exactly the local model's
tokens.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from meshinfer.p2p import SESSION_PROTOCOL
from meshinfer.p2p.direct import DirectPlane, DirectRefused
from meshinfer.p2p.identity import Identity
from meshinfer.p2p.stream import DEFAULT_SETTINGS, MessageStream
from meshinfer.wire.framing import HEADER, MAGIC

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
PROMPT = [5, 17, 42, 99, 7, 3]
NEW_TOKENS = 8
PER_PEER = 4


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@dataclass
class Target:
    pid: int
    peer_id: str
    tls: str
    plain: str
    client: object
    expected: list[int]

    def exact(self) -> bool:
        return self.client.generate(PROMPT, NEW_TOKENS, stop_token_ids=()) == self.expected  # type: ignore[attr-defined]

    def baseline(self) -> float:
        assert self.exact()
        time.sleep(0.5)
        return rss_mb(self.pid)


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    from meshinfer.client.model import DistributedModel
    from meshinfer.models.engine import LocalModel
    from meshinfer.testing.checkpoints import demo_checkpoint, demo_config
    from meshinfer.testing.swarm import LocalSwarm

    path = demo_checkpoint()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    expected = LocalModel.from_pretrained(path).generate(PROMPT, NEW_TOKENS, stop_token_ids=())
    args = ["--direct-port", str(port), "--max-streams-per-peer", str(PER_PEER)]
    with LocalSwarm(path, [(0, demo_config()["num_hidden_layers"])], server_args=args) as swarm:
        with DistributedModel.from_pretrained(path, swarm.initial_peers) as client:
            record = client.plan()[0].record
            plain = next(a for a in record.direct_addresses if not a.endswith("/tls"))
            server = swarm.servers[0]
            yield Target(server.pid, server.peer_id, f"/ip4/127.0.0.1/tcp/{port}/tls", plain, client, expected)
            assert server.alive(), server.proc.stderr_tail()
            assert "Traceback" not in server.proc.stderr_tail(300), server.proc.stderr_tail(300)


async def _dial(target: Target, address: str) -> MessageStream:
    return await DirectPlane(Identity.generate()).dial(target.peer_id, address, SESSION_PROTOCOL,
                                                       settings=DEFAULT_SETTINGS, timeout=10)


def test_unfinished_messages_cannot_grow_the_server(target: Target) -> None:
    """6 connections x 60 frames of 1 MiB of a message never finished (was: +400 MB, held for an hour)."""
    base = target.baseline()
    frame = HEADER.pack(MAGIC, 0, MIB) + bytes(MIB)

    async def flood() -> tuple[int, float]:
        stream = await _dial(target, target.tls)
        started, sent = time.monotonic(), 0
        try:
            for _ in range(60):
                await stream.write_raw(frame)
                sent += 1
            await stream.recv_bytes(timeout=10)  # the typed refusal, if it came before we noticed
            await stream.recv_bytes(timeout=10)
        except Exception:
            pass
        finally:
            await stream.close()
        return sent, time.monotonic() - started

    async def all_of_them() -> list[tuple[int, float]]:
        return await asyncio.gather(*(flood() for _ in range(6)))

    peak = [base]
    outcomes = asyncio.run(_sampling(target.pid, peak, all_of_them()))
    # closed early (a write to a TLS transport already lost is dropped without an error, so time tells)
    assert all(seconds < 10 for _, seconds in outcomes) and any(sent < 60 for sent, _ in outcomes), outcomes
    assert peak[0] < base * 1.10, (base, peak[0])
    assert target.exact()
    assert rss_mb(target.pid) < base * 1.10


async def _sampling(pid: int, peak: list[float], coro):  # type: ignore[no-untyped-def]
    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_mb(pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        return await coro
    finally:
        sampler.cancel()


def test_tls_connect_close_cycles_do_not_grow_the_server(target: Target) -> None:
    """TCP connect/close on the TLS port (was: ~+150 MB per 1,000 cycles, never given back)."""
    base = target.baseline()
    host, port = "127.0.0.1", int(target.tls.split("/")[4])

    async def cycles(n: int) -> None:
        sem = asyncio.Semaphore(20)

        async def one() -> None:
            async with sem:
                try:
                    _, writer = await asyncio.open_connection(host, port)
                    writer.close()
                    await writer.wait_closed()
                except OSError:
                    pass

        await asyncio.gather(*(one() for _ in range(n)))

    after = []
    for _ in range(3):
        asyncio.run(cycles(800))
        time.sleep(0.5)
        after.append(rss_mb(target.pid))
    assert max(after) < base * 1.10 and after[-1] < after[0] + 0.03 * base, (base, after)
    assert len(os.listdir(f"/proc/{target.pid}/fd")) < 64
    assert target.exact()


def test_slow_and_silent_sockets_are_closed(target: Target) -> None:
    """Silent TLS sockets, half a hello on the plain port, 3 bytes of a frame after the handshake: each is
    closed by the server within a few seconds (was: never, for the first two)."""
    tls_port, plain_port = int(target.tls.split("/")[4]), int(target.plain.split("/")[4])

    async def raw(port: int, data: bytes) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(data)
        try:
            async with asyncio.timeout(12):
                while await reader.read(4096):
                    pass
        except OSError:
            pass
        finally:
            writer.close()
        return time.monotonic() - started

    async def trickle() -> float:
        stream = await _dial(target, target.plain)
        started = time.monotonic()
        await stream.write_raw(b"\xe7\x00\x00")
        try:
            while True:
                await stream.recv_bytes(timeout=12)
        except Exception:
            return time.monotonic() - started
        finally:
            await stream.close()

    async def all_of_them() -> list[float]:
        return await asyncio.gather(*[raw(tls_port, b"") for _ in range(10)],
                                    *[raw(plain_port, b"\x00\x00") for _ in range(10)],
                                    *[trickle() for _ in range(PER_PEER)])

    times = asyncio.run(all_of_them())
    assert max(times) < 10, times
    assert target.exact()


def test_streams_per_peer_are_capped_and_others_still_served(target: Target) -> None:
    async def attempt() -> str:
        plane = DirectPlane(Identity.generate())
        held = [await plane.dial(target.peer_id, target.plain, SESSION_PROTOCOL, settings=DEFAULT_SETTINGS,
                                 timeout=10) for _ in range(PER_PEER)]
        try:
            with pytest.raises(DirectRefused) as refused:
                await plane.dial(target.peer_id, target.plain, SESSION_PROTOCOL, settings=DEFAULT_SETTINGS,
                                 timeout=10)
            other = await _dial(target, target.plain)  # another peer is not affected
            await other.close()
            return str(refused.value)
        finally:
            for stream in held:
                await stream.close()

    message = asyncio.run(attempt())
    assert f"has {PER_PEER} open streams (limit --max-streams-per-peer {PER_PEER})" in message
    assert target.exact()
