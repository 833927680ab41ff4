"""The client side of the session/push protocol (architecture.md section 10) against scripted servers.

Unit tests of the protocol logic only: each fake server is a real ``MessageStream`` over loopback TCP
(no libp2p), computing ``output = input + offset`` for its span, pushing to the next hop in-process
the way a real server would, and misbehaving on demand (failed pushes, errors, silence). The real
end-to-end runs against ``meshinfer serve`` processes are in ``test_distributed.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from meshinfer.client.config import ClientConfig
from meshinfer.client.routing import RouteHop
from meshinfer.client.session import InferenceSession
from meshinfer.errors import ConfigError, ContextOverflowError, RemoteError, TransportError, UsageError
from meshinfer.p2p.node import NodeSettings
from meshinfer.p2p.stream import MessageStream
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Close, Error, ErrorCode, Open, Opened, Retarget, Step, StepResult
from meshinfer.wire.records import ServerRecord
from meshinfer.wire.tensor import decode_tensor, encode_tensor

H = 8


def hidden(tokens: int) -> torch.Tensor:  # [T, H], small integers: sums are exact in any order
    return torch.randint(-50, 50, (tokens, H)).float()


@dataclass
class FakeServer:
    """A scripted block server: adds ``offset`` to every hidden state; pushes along its route tail."""

    peer_id: str
    span: BlockRange
    offset: float
    fail_push: bool = False
    error_on_step: str | None = None
    silent: bool = False
    hung: bool = False
    """Read everything, answer nothing (not even Open): a stopped process whose kernel still takes the bytes."""
    refuse_open: str | None = None
    """Answer every Open (and the Steps sent after it) with this error code, as a full server would."""
    sessions: dict[str, tuple[MessageStream, list]] = field(default_factory=dict)
    steps_seen: list[tuple[str, int, int, str]] = field(default_factory=list)
    """(session id, step id, position, "client" | "push") for every step received."""
    closed: list[str] = field(default_factory=list)

    def record(self) -> ServerRecord:
        return ServerRecord(peer_id=self.peer_id, model_id="m", span=self.span, state="online", throughput=100.0,
                            cache_tokens_left=1000, addresses=[], software_version="fake")


class FakeSwarm:
    """In-process fake servers reachable by peer id, standing in for ``PeerNode.open_stream``."""

    def __init__(self, servers: list[FakeServer]) -> None:
        self.settings = NodeSettings()
        self.by_peer = {s.peer_id: s for s in servers}
        self.tcp: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def open_stream(self, peer_id: str, protocol: str, *, maddrs=(), direct=(),
                          timeout: float = 10.0, reuse: bool = False) -> MessageStream:
        assert self.tcp is not None
        port = self.tcp.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(peer_id.encode() + b"\n")  # tells the fake which server this stream is for
        return MessageStream(reader, writer, peer_id=peer_id, protocol=protocol)

    async def release_stream(self, stream: MessageStream) -> None:
        await stream.close()

    async def drop_idle(self, peer_id: str) -> None:
        pass

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = self.by_peer[(await reader.readline()).decode().strip()]
        stream = MessageStream(reader, writer, peer_id="client", protocol="test")
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        with contextlib.suppress(Exception, asyncio.CancelledError):  # teardown cancels: end quietly
            await self._serve(server, stream)
        await stream.close()

    async def _serve(self, server: FakeServer, stream: MessageStream) -> None:
        async for msg in stream:
            if server.hung:
                continue
            if isinstance(msg, Open) and server.refuse_open:
                await stream.send(Error(code=server.refuse_open, message="scripted refusal", session_id=msg.session_id))
            elif isinstance(msg, Step) and server.refuse_open:
                await stream.send(Error(code=server.refuse_open, message="scripted refusal", session_id=msg.session_id,
                                        step_id=msg.step_id))
            elif isinstance(msg, Open):
                if msg.model != "m":
                    await stream.send(Error(code=ErrorCode.UNKNOWN_MODEL, message=f"no model {msg.model}"))
                    return
                server.sessions[msg.session_id] = (stream, list(msg.route_tail))
                await stream.send(Opened(session_id=msg.session_id, span=msg.span, max_length=msg.max_length))
            elif isinstance(msg, Step):
                await self.compute(server, msg, "client")
            elif isinstance(msg, Retarget):
                server.sessions[msg.session_id] = (stream, list(msg.route_tail))
            elif isinstance(msg, Close):
                server.closed.append(msg.session_id)

    async def compute(self, server: FakeServer, msg: Step, via: str) -> None:
        for _ in range(200):  # a push may overtake its session's Open (the client does not wait for Opened)
            if msg.session_id in server.sessions:
                break
            await asyncio.sleep(0.01)
        server.steps_seen.append((msg.session_id, msg.step_id, msg.position, via))
        stream, tail = server.sessions[msg.session_id]
        if server.silent:
            return
        if server.error_on_step:
            await stream.send(Error(code=server.error_on_step, message="scripted failure",
                                    session_id=msg.session_id, step_id=msg.step_id))
            return
        out = decode_tensor(msg.hidden) + server.offset  # [T, H]
        result = StepResult(session_id=msg.session_id, step_id=msg.step_id, hidden=encode_tensor(out))
        if tail and not server.fail_push:
            nxt = self.by_peer[tail[0].peer_id]
            pushed = Step(session_id=tail[0].session_id, step_id=msg.step_id, position=msg.position,
                          hidden=encode_tensor(out))
            task = asyncio.create_task(self.compute(nxt, pushed, "push"))
            self.tasks.add(task)
        await stream.send(result)
        if tail and server.fail_push:
            await stream.send(Error(code=ErrorCode.NEXT_HOP_FAILED, message="push failed",
                                    session_id=msg.session_id, step_id=msg.step_id))


@contextlib.asynccontextmanager
async def fake_swarm(servers: list[FakeServer]) -> AsyncIterator[FakeSwarm]:
    swarm = FakeSwarm(servers)
    swarm.tcp = await asyncio.start_server(swarm._on_connect, "127.0.0.1", 0)
    try:
        yield swarm
    finally:
        swarm.tcp.close()
        for task in list(swarm.tasks):
            task.cancel()


def route_of(servers: list[FakeServer]) -> list[RouteHop]:
    return [RouteHop(s.peer_id, s.span, s.record()) for s in servers]


def chain(*flags: dict) -> list[FakeServer]:
    spans = [(0, 1), (1, 3), (3, 4)][: len(flags)]
    return [FakeServer(f"P{i}", BlockRange(*spans[i]), offset=10.0 ** i, **f) for i, f in enumerate(flags)]


async def open_session(swarm: FakeSwarm, servers: list[FakeServer], **kw) -> InferenceSession:
    config = ClientConfig(step_timeout=kw.pop("step_timeout", 5.0), push=kw.pop("push", True),
                          open_timeout=kw.pop("open_timeout", 15.0))
    return await InferenceSession.open(swarm, route_of(servers), model_id="m", max_length=16,  # type: ignore[arg-type]
                                       config=config, **kw)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def test_push_route_returns_last_output_and_keeps_every_span_input() -> None:
    async def body() -> None:
        servers = chain({}, {}, {})
        async with fake_swarm(servers) as swarm:
            rtts: dict[str, float] = {}
            session = await open_session(swarm, servers, on_rtt=rtts.__setitem__)
            with pytest.raises(UsageError, match="not run any step"):
                session.span_inputs(0)
            x = hidden(5)
            out = await session.step(x)  # prefill
            assert torch.equal(out, x + 111.0)
            assert set(rtts) == {"P0", "P1", "P2"}  # each hop's Opened came with the first step (pipelined Open)
            y = hidden(1)
            assert torch.equal(await session.step(y), y + 111.0)
            assert session.position == 6
            # each span's input history: what it received, step by step
            assert torch.equal(session.span_inputs(0), torch.cat([x, y]))
            assert torch.equal(session.span_inputs(1), torch.cat([x, y]) + 1.0)
            assert torch.equal(session.span_inputs(2), torch.cat([x, y]) + 11.0)
            # the client sent to the first hop only; the others got pushed steps
            assert [v for *_, v in servers[0].steps_seen] == ["client", "client"]
            assert [v for *_, v in servers[1].steps_seen] == ["push", "push"]
            assert [(p, s) for _, s, p, _ in servers[2].steps_seen] == [(0, 0), (5, 1)]
            await session.close()
            await asyncio.sleep(0.1)
            assert all(len(s.closed) == 1 for s in servers)
            with pytest.raises(UsageError, match="closed"):
                await session.step(y)

    run(body())


def test_next_hop_failed_makes_the_client_drive_the_next_hop() -> None:
    async def body() -> None:
        servers = chain({"fail_push": True}, {}, {})
        async with fake_swarm(servers) as swarm:
            session = await open_session(swarm, servers)
            x = hidden(3)
            assert torch.equal(await session.step(x), x + 111.0)
            assert [v for *_, v in servers[1].steps_seen] == ["client"]  # driven by the client
            assert [v for *_, v in servers[2].steps_seen] == ["push"]  # hop 1 still pushed onward
            await session.close()

    run(body())


def test_without_push_the_client_drives_every_hop() -> None:
    async def body() -> None:
        servers = chain({}, {}, {})
        async with fake_swarm(servers) as swarm:
            session = await open_session(swarm, servers, push=False)
            x = hidden(2)
            assert torch.equal(await session.step(x), x + 111.0)
            assert all([v for *_, v in s.steps_seen] == ["client"] for s in servers)
            await session.close()

    run(body())


def test_server_error_surfaces_with_code_and_server() -> None:
    async def body() -> None:
        servers = chain({}, {"error_on_step": ErrorCode.LIMIT_EXCEEDED})
        async with fake_swarm(servers) as swarm:
            session = await open_session(swarm, servers)
            with pytest.raises(RemoteError, match=r"limit_exceeded: scripted failure \(server P1 \(blocks 1:3\)\)"):
                await session.step(hidden(2))
            with pytest.raises(RemoteError):  # the session is broken from then on
                await session.step(hidden(1))
            await session.close()

    run(body())


def test_open_error_closes_everything_and_names_the_server() -> None:
    async def body() -> None:
        servers = chain({}, {})
        async with fake_swarm(servers) as swarm:
            # Open and the first step go back to back: the refusal comes with the step (no replan: raised as is)
            session = await InferenceSession.open(swarm, route_of(servers), model_id="other", max_length=8)  # type: ignore[arg-type]
            with pytest.raises(RemoteError, match="unknown_model") as info:
                await session.step(hidden(2))
            assert info.value.code == ErrorCode.UNKNOWN_MODEL
            assert "P0" in str(info.value) or "P1" in str(info.value)  # names the server
            with pytest.raises(RemoteError):
                await session.step(hidden(1))  # the session stays unusable
            await session.close()

    run(body())


def test_silent_server_times_out_naming_it() -> None:
    async def body() -> None:
        servers = chain({}, {"silent": True})
        async with fake_swarm(servers) as swarm:
            session = await open_session(swarm, servers, step_timeout=0.5)
            with pytest.raises(TransportError, match=r"no answer from server P1 \(blocks 1:3\) within 0.5s"):
                await session.step(hidden(1))
            await session.close()

    run(body())


def test_limits_checked_before_sending() -> None:
    async def body() -> None:
        servers = chain({})
        async with fake_swarm(servers) as swarm:
            session = await open_session(swarm, servers)
            with pytest.raises(ContextOverflowError, match="max_length of 16"):
                await session.step(hidden(17))
            with pytest.raises(ConfigError, match="tokens, hidden"):
                await session.step(hidden(1)[0])
            assert servers[0].steps_seen == []
            # forward() splits long inputs into steps of max_chunk_tokens
            session.max_chunk_tokens = 4
            x = hidden(10)
            assert torch.equal(await session.forward(x), x + 1.0)
            assert [(p, s) for _, s, p, _ in servers[0].steps_seen] == [(0, 0), (4, 1), (8, 2)]
            await session.close()

    run(body())


def test_route_must_be_consecutive() -> None:
    servers = [FakeServer("A", BlockRange(0, 2), 1.0), FakeServer("B", BlockRange(3, 4), 1.0)]
    with pytest.raises(ConfigError, match="not consecutive"):
        InferenceSession(FakeSwarm(servers), route_of(servers), model_id="m", max_length=4)  # type: ignore[arg-type]


def test_a_refused_open_is_failed_over_during_the_first_step() -> None:
    async def body() -> None:
        servers = chain({"refuse_open": ErrorCode.OVERLOADED}, {})
        spare = FakeServer("S0", BlockRange(0, 1), offset=1.0)
        async with fake_swarm([*servers, spare]) as swarm:
            async def replan(blocks: BlockRange, exclude: frozenset[str]) -> list[RouteHop]:
                assert blocks == BlockRange(0, 1) and "P0" in exclude
                return route_of([spare])

            session = await open_session(swarm, servers, replan=replan)  # Open sent, not answered yet: no wait
            x = hidden(3)
            assert torch.equal(await session.step(x), x + 11.0)  # the refusal came with the step: replaced
            assert [f.peer_id for f in session.failovers] == ["P0"]
            assert [h.hop.peer_id for h in session.hops] == ["S0", "P1"]
            y = hidden(1)
            assert torch.equal(await session.step(y), y + 11.0)
            await session.close()

    run(body())


def test_a_server_that_never_answers_the_pipelined_open_fails_at_the_open_timeout() -> None:
    async def body() -> None:
        servers = chain({}, {"hung": True})
        spare = FakeServer("S1", BlockRange(1, 3), offset=10.0)
        async with fake_swarm([*servers, spare]) as swarm:
            async def replan(blocks: BlockRange, exclude: frozenset[str]) -> list[RouteHop]:
                return route_of([spare])

            session = await open_session(swarm, servers, replan=replan, open_timeout=1.0, step_timeout=30.0)
            x = hidden(2)
            assert torch.equal(await session.step(x), x + 11.0)  # not the 30 s step deadline: the open timeout
            assert [f.peer_id for f in session.failovers] == ["P1"]
            assert "no answer to Open" in session.failovers[0].reason
            await session.close()

    run(body())
