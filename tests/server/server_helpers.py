"""Helpers for block-server tests: start ``meshinfer serve`` processes, and a raw session client.

The client side is deliberately low level: a ``PeerNode`` on a ``LoopThread`` in the test process
speaking the wire messages of docs/architecture.md section 10 directly, so these tests check the
server against the protocol, not against the client package.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from meshinfer.loopthread import LoopThread
from meshinfer.p2p import SESSION_PROTOCOL, MessageStream, PeerNode
from meshinfer.p2p.announce import read_coverage
from meshinfer.readyline import parse_ready_line
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, wait_gone
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Error, Hop, Message, Open, Opened, Step, StepResult
from meshinfer.wire.tensor import decode_tensor, encode_tensor

T = TypeVar("T")

# The swarm fixture's full node (tests/server/conftest.py) runs with these limits.
FULL_CACHE_TOKENS = 512
FULL_MAX_SESSIONS = 4
FULL_MAX_STEP_TOKENS = 64
SERVER_THREADS = 1
"""torch threads of every test server (several share a small machine); local references use as many, since
the thread count changes the order of float sums and so the last bits of the results."""


@contextlib.contextmanager
def server_threads() -> Iterator[None]:
    """Compute in this block with the servers' torch thread count (bit-exact local references)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(SERVER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Server:
    proc: ManagedProcess
    info: dict[str, Any]

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    @property
    def maddrs(self) -> list[str]:
        return self.info["maddrs"]

    @property
    def model_id(self) -> str:
        return self.info["model_id"]

    @property
    def blocks(self) -> BlockRange:
        return BlockRange.parse(self.info["blocks"])


@dataclass
class Swarm:
    model_dir: Path
    dht: ManagedProcess
    bootstrap: list[str]
    full: Server
    head: Server
    tail: Server

    @property
    def servers(self) -> list[Server]:
        return [self.full, self.head, self.tail]


def launch_server(model: str, blocks: str, initial_peers: Sequence[str], *extra: str) -> ManagedProcess:
    argv = meshinfer_argv("serve", "--model", model, "--blocks", blocks, "--initial-peers", *initial_peers,
                          "--announce-ttl", "20", "--announce-refresh", "5", "--stop-on-stdin-eof",
                          "--torch-threads", str(SERVER_THREADS), *extra)
    return ManagedProcess(argv, name=f"meshinfer serve {blocks}")


def wait_ready(proc: ManagedProcess, timeout: float = 120.0) -> Server:
    """Read the server's stdout until its ready line (the multiaddr lines come first)."""
    deadline = time.monotonic() + timeout
    while True:
        line = proc.read_line(max(0.1, deadline - time.monotonic()))
        info = parse_ready_line(line)
        if info is not None:
            return Server(proc, info)


def start_servers(model: str, specs: Sequence[tuple[str, Sequence[str]]], initial_peers: Sequence[str]) -> list[Server]:
    """Start one server per (blocks, extra flags) in parallel; wait for all to be ready."""
    procs = [launch_server(model, blocks, initial_peers, *extra) for blocks, extra in specs]
    try:
        return [wait_ready(p) for p in procs]
    except BaseException:
        for p in procs:
            p.stop()
        raise


def stop_and_check(procs: Sequence[ManagedProcess], timeout: float = 15.0) -> list[int | None]:
    """SIGTERM each process (by PID), wait, and assert nothing they started (p2pd) survives."""
    tree = {p.pid: p.descendants() for p in procs}
    for p in procs:  # signal all first, so they drain in parallel; signal each once only
        p.kill(signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(timeout=timeout)
    codes = [p.stop(timeout=5) for p in procs]  # SIGKILL what did not exit; close pipes
    leftovers = wait_gone([pid for kids in tree.values() for pid in kids], timeout=10)
    assert not leftovers, f"processes left behind: {leftovers}"
    return codes


def wait_until(fn: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    """Poll ``fn()`` until truthy (returned) or ``timeout`` s pass (last value returned)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def new_session_id() -> str:
    return uuid.uuid4().hex


class RemoteSession:
    """One ``meshinfer/session/1`` stream to a server, driven synchronously from a test."""

    def __init__(self, client: Client, stream: MessageStream, session_id: str) -> None:
        self.client, self.stream, self.session_id = client, stream, session_id

    def send(self, msg: Message) -> None:
        self.client.run(self.stream.send(msg))

    def recv(self, timeout: float = 30.0) -> Message:
        return self.client.run(self.stream.recv(timeout), timeout + 5)

    def step(self, step_id: int, position: int, hidden: torch.Tensor) -> None:
        self.send(Step(session_id=self.session_id, step_id=step_id, position=position, hidden=encode_tensor(hidden)))

    def result(self, step_id: int, timeout: float = 30.0) -> torch.Tensor:
        """The next message, which must be the ``StepResult`` of ``step_id``."""
        msg = self.recv(timeout)
        assert isinstance(msg, StepResult), msg
        assert (msg.session_id, msg.step_id) == (self.session_id, step_id), msg
        return decode_tensor(msg.hidden)

    def error(self, timeout: float = 30.0) -> Error:
        msg = self.recv(timeout)
        assert isinstance(msg, Error), msg
        return msg

    def write_raw(self, data: bytes) -> None:
        self.client.run(self.stream.write_raw(data))

    def close_stream(self) -> None:
        self.client.run(self.stream.close())


class Client:
    """A client-mode peer in the test process."""

    def __init__(self, initial_peers: Sequence[str]) -> None:
        from meshinfer.config import P2PConfig
        from meshinfer.p2p.node import NodeSettings

        self.runner = LoopThread(name="test-client").start()
        self.node: PeerNode = self.runner.run(
            PeerNode.start(P2PConfig(initial_peers=tuple(initial_peers)), NodeSettings(client_mode=True)), 60
        )

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return self.runner.run(coro, timeout)

    def connect(self, server: Server) -> MessageStream:
        return self.run(self.node.open_stream(server.peer_id, SESSION_PROTOCOL, maddrs=server.maddrs))

    def open(self, server: Server, span: BlockRange | None = None, *, max_length: int = 64, dtype: str = "float32",
             model: str | None = None, route_tail: Sequence[Hop] = (), session_id: str | None = None,
             prev_peer: str | None = None) -> RemoteSession:
        """Open a session (pushes into it taken from ``prev_peer`` too); asserts the server answered ``Opened``."""
        sess = self.try_open(server, span, max_length=max_length, dtype=dtype, model=model,
                             route_tail=route_tail, session_id=session_id, prev_peer=prev_peer)
        reply = sess.recv()
        assert isinstance(reply, Opened), reply
        assert reply.session_id == sess.session_id
        return sess

    def try_open(self, server: Server, span: BlockRange | None = None, *, max_length: int = 64,
                 dtype: str = "float32", model: str | None = None, route_tail: Sequence[Hop] = (),
                 session_id: str | None = None, prev_peer: str | None = None) -> RemoteSession:
        """Send ``Open`` and return without reading the reply."""
        sid = session_id or new_session_id()
        sess = RemoteSession(self, self.connect(server), sid)
        sess.send(Open(session_id=sid, model=model or server.model_id, span=span or server.blocks,
                       max_length=max_length, dtype=dtype, route_tail=list(route_tail), prev_peer=prev_peer))
        return sess

    def cache_tokens_left(self, server: Server, num_blocks: int) -> int | None:
        """``cache_tokens_left`` as ``server`` announces it in the DHT right now (None: not found)."""
        cov = self.run(read_coverage(self.node, server.model_id, num_blocks, timeout=5.0), 30)
        record = cov.servers.get(server.peer_id)
        return None if record is None else record.cache_tokens_left

    def close(self) -> None:
        try:
            self.run(self.node.close(), 30)
        finally:
            self.runner.stop()


def hop_of(server: Server, session_id: str, span: BlockRange | None = None) -> Hop:
    """The route-tail entry that makes a previous hop push to ``session_id`` on ``server``."""
    return Hop(peer_id=server.peer_id, span=span or server.blocks, session_id=session_id, maddrs=server.maddrs)
