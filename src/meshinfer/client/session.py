"""An inference session over a planned route: one server session per hop, steps pushed along the chain.

Contract (docs/architecture.md section 10): ``InferenceSession.open`` opens one ``meshinfer/session/1``
stream per hop and sends ``Open(session_id_i, model, span_i, max_length, dtype, route_tail=[hops after
i])``, all hops concurrently, each answered by ``Opened`` (the Open round trip is reported as that
peer's RTT). ``step(hidden[T, H])`` sends ``Step(position, hidden)`` to the FIRST hop only; every hop
returns its ``StepResult`` to the client while pushing its output to the next hop. The client keeps
each hop's input (the previous hop's output) as that span's history (``span_inputs``) for failover
replay, and returns the last hop's output. ``Error(next_hop_failed)`` from hop i makes the client
drive hop i+1 itself with hop i's output (so does ``push=False`` for every hop). Any other ``Error``
becomes a ``RemoteError`` naming the server and its blocks; a broken stream or a step that takes
longer than ``step_timeout`` is a ``TransportError``; after either the session is unusable. ``close``
sends ``Close`` on every hop and ends all streams (idempotent, never raises). Step results of earlier
step ids (pushes and client fallback may overlap) are ignored.

Async core, run on the ``PeerNode``'s loop; ``SyncInferenceSession`` wraps it for threads through a
``LoopThread``. Knows nothing of tokens, embeddings or sampling: hidden states in, hidden states out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from meshinfer.client.routing import RouteHop
from meshinfer.errors import ConfigError, ContextOverflowError, MeshinferError, RemoteError, TransportError, WireError
from meshinfer.p2p import SESSION_PROTOCOL
from meshinfer.p2p.node import PeerNode
from meshinfer.p2p.runner import LoopThread
from meshinfer.p2p.stream import MessageStream
from meshinfer.types import canonical_dtype
from meshinfer.wire.messages import (
    Close,
    Error,
    ErrorCode,
    Hop,
    Message,
    Open,
    Opened,
    Step,
    StepResult,
    encode_message,
)
from meshinfer.wire.tensor import ITEMSIZE, decode_tensor, encode_tensor

log = logging.getLogger(__name__)

IDLE_READ_S = 1e6
"""Per-message read timeout of the background readers: a session may sit idle between steps; every
step has its own deadline (``step_timeout``)."""

RttCallback = Callable[[str, float], None]


def short_peer(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


@dataclass
class HopSession:
    """The client's end of one server's session: the hop, its session id, stream and input history."""

    hop: RouteHop
    session_id: str
    stream: MessageStream | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)
    """Every hidden-state input this span received, step by step ([T_k, H] each)."""
    reader: asyncio.Task[None] | None = None

    def where(self) -> str:
        return f"server {short_peer(self.hop.peer_id)} (blocks {self.hop.span})"


class InferenceSession:
    """Hidden states through a chain of servers, keeping each server's KV cache alive between steps."""

    def __init__(self, node: PeerNode, route: Sequence[RouteHop], *, model_id: str, max_length: int,
                 dtype: str = "float32", push: bool = True, step_timeout: float = 60.0,
                 max_chunk_tokens: int = 2048) -> None:
        if not route:
            raise ConfigError("a session needs a route of at least one hop")
        for a, b in itertools.pairwise(route):
            if a.span.end != b.span.start:
                raise ConfigError(f"route hops {a.span} and {b.span} are not consecutive")
        if max_length <= 0:
            raise ConfigError(f"max_length must be > 0, got {max_length}")
        if max_chunk_tokens <= 0:
            raise ConfigError(f"max_chunk_tokens must be > 0, got {max_chunk_tokens}")
        self.node = node
        self.model_id = model_id
        self.max_length = max_length
        self.dtype = canonical_dtype(dtype)
        self.push = push
        self.step_timeout = step_timeout
        self.max_chunk_tokens = max_chunk_tokens
        self.hops = [HopSession(h, secrets.token_hex(12)) for h in route]
        self.position = 0
        self._next_step_id = 0
        self._events: asyncio.Queue[tuple[int, Message | MeshinferError]] = asyncio.Queue()
        self._broken: MeshinferError | None = None
        self._closed = False
        self._answered: dict[int, torch.Tensor] = {}

    @property
    def route(self) -> list[RouteHop]:
        return [h.hop for h in self.hops]

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    async def open(cls, node: PeerNode, route: Sequence[RouteHop], *, model_id: str, max_length: int,
                   dtype: str = "float32", push: bool = True, open_timeout: float = 15.0,
                   step_timeout: float = 60.0, max_chunk_tokens: int = 2048,
                   on_rtt: RttCallback | None = None) -> InferenceSession:
        """Open a session on every hop of ``route`` (all or nothing: a failure closes what was opened)."""
        session = cls(node, route, model_id=model_id, max_length=max_length, dtype=dtype, push=push,
                      step_timeout=step_timeout, max_chunk_tokens=max_chunk_tokens)
        tasks = [asyncio.create_task(session._open_hop(i, open_timeout, on_rtt)) for i in range(len(route))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # stop the other opens before closing what they opened
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.close()
            raise
        for i, hs in enumerate(session.hops):
            hs.reader = asyncio.create_task(session._read(i), name=f"session-read:{hs.session_id[:8]}")
        return session

    def _route_tail(self, i: int) -> list[Hop]:
        if not self.push:
            return []
        return [Hop(peer_id=h.hop.peer_id, span=h.hop.span, session_id=h.session_id,
                    maddrs=list(h.hop.record.addresses)[:16], direct=list(h.hop.record.direct_addresses)[:8])
                for h in self.hops[i + 1:]]

    async def _open_hop(self, i: int, timeout: float, on_rtt: RttCallback | None) -> None:
        hs = self.hops[i]
        hs.stream = await self.node.open_stream(hs.hop.peer_id, SESSION_PROTOCOL,
                                                maddrs=hs.hop.record.addresses,
                                                direct=hs.hop.record.direct_addresses, timeout=timeout)
        msg = Open(session_id=hs.session_id, model=self.model_id, span=hs.hop.span, max_length=self.max_length,
                   dtype=self.dtype, route_tail=self._route_tail(i))
        started = time.perf_counter()
        try:
            reply = await hs.stream.request(msg, timeout=timeout)
        except RemoteError as err:
            raise RemoteError(err.code, f"{err.remote_message} ({hs.where()})") from None
        except TransportError as err:
            raise TransportError(f"cannot open a session on {hs.where()}: {err}") from None
        if on_rtt is not None:
            on_rtt(hs.hop.peer_id, time.perf_counter() - started)
        if not isinstance(reply, Opened) or reply.session_id != hs.session_id:
            raise WireError(f"{hs.where()} answered Open with an unexpected {type(reply).__name__}")
        if reply.span != hs.hop.span or reply.max_length < self.max_length:
            raise WireError(f"{hs.where()} opened span {reply.span} for {reply.max_length} tokens; "
                            f"asked for {hs.hop.span} and {self.max_length}")

    async def _read(self, i: int) -> None:
        """Background reader of hop ``i``: every message (or the error that ended the stream) -> events."""
        stream = self.hops[i].stream
        assert stream is not None
        while True:
            try:
                msg = await stream.recv(timeout=IDLE_READ_S)
            except MeshinferError as err:
                self._events.put_nowait((i, err))
                return
            self._events.put_nowait((i, msg))

    # ---- steps ---------------------------------------------------------------------------------

    def span_inputs(self, i: int) -> torch.Tensor:
        """Everything hop ``i``'s span received so far, concatenated: [position, H] (for replay)."""
        inputs = self.hops[i].inputs
        if not inputs:
            raise ConfigError("this session has not run any step yet")
        return torch.cat(inputs, dim=0)

    async def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        """Run ``hidden`` through the route as one or more steps of at most ``max_chunk_tokens``."""
        if hidden.dim() != 2 or hidden.shape[0] == 0:
            raise ConfigError(f"expected hidden states [tokens, hidden], got {tuple(hidden.shape)}")
        per_step = max(1, min(self.max_chunk_tokens,
                              self.node.settings.stream.limits.max_tensor_bytes
                              // (hidden.shape[1] * ITEMSIZE[self.dtype])))
        outs = [await self.step(chunk) for chunk in torch.split(hidden, per_step, dim=0)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        """One step through every hop; returns the last hop's output in the session dtype."""
        if self._closed:
            raise ConfigError("this inference session is closed")
        if self._broken is not None:
            raise self._broken
        if hidden.dim() != 2 or hidden.shape[0] == 0:
            raise ConfigError(f"expected hidden states [tokens, hidden], got {tuple(hidden.shape)}")
        tokens = hidden.shape[0]
        if self.position + tokens > self.max_length:
            raise ContextOverflowError(f"this session holds {self.position} tokens; {tokens} more exceed "
                                       f"its max_length of {self.max_length}")
        x = hidden.detach().to(getattr(torch, self.dtype)).contiguous()  # [T, H]
        step_id = self._next_step_id
        self._next_step_id += 1
        try:
            async with asyncio.timeout(self.step_timeout):
                outputs = await self._run_step(step_id, x)
        except TimeoutError:
            err = TransportError(f"a step of {tokens} token(s) got no answer from "
                                 f"{self._laggards_text()} within {self.step_timeout:g}s")
            self._broken = err
            raise err from None
        except MeshinferError as err:
            self._broken = err
            raise
        self.hops[0].inputs.append(x)
        for i in range(1, len(self.hops)):
            self.hops[i].inputs.append(outputs[i - 1])
        self.position += tokens
        return outputs[len(self.hops) - 1]

    def _laggards_text(self) -> str:
        waiting = [h.where() for i, h in enumerate(self.hops) if i not in self._answered]
        return ", ".join(waiting) or "the route"

    async def _send_step(self, i: int, step_id: int, x: torch.Tensor) -> None:
        hs = self.hops[i]
        assert hs.stream is not None
        msg = Step(session_id=hs.session_id, step_id=step_id, position=self.position, hidden=encode_tensor(x))
        try:
            payload = encode_message(msg)
            if not hs.stream.send_nowait(payload):
                await hs.stream.send_bytes(payload)
        except TransportError as err:
            raise TransportError(f"cannot send a step to {hs.where()}: {err}") from None

    async def _run_step(self, step_id: int, x: torch.Tensor) -> dict[int, torch.Tensor]:
        n = len(self.hops)
        outputs: dict[int, torch.Tensor] = {}
        self._answered = outputs  # for the timeout message: who has not answered yet
        drive = set(range(1, n)) if not self.push else set()  # hops the client sends to itself
        sent = {0}
        await self._send_step(0, step_id, x)
        while len(outputs) < n:
            i, msg = await self._events.get()
            hs = self.hops[i]
            if isinstance(msg, MeshinferError):
                raise TransportError(f"lost the session on {hs.where()}: {msg}")
            if isinstance(msg, StepResult):
                if msg.session_id != hs.session_id or msg.step_id != step_id or i in outputs:
                    continue  # an answer to an earlier step (push and fallback overlapped)
                outputs[i] = self._check_output(hs, msg, x)
            elif isinstance(msg, Error):
                if msg.step_id is not None and msg.step_id < step_id:
                    continue  # about an earlier step that has completed anyway
                if msg.code == ErrorCode.NEXT_HOP_FAILED and i + 1 < n:
                    log.info("%s could not push to the next hop (%s); driving it directly", hs.where(), msg.message)
                    drive.add(i + 1)
                else:
                    raise RemoteError(msg.code, f"{msg.message} ({hs.where()})")
            else:
                raise WireError(f"{hs.where()} sent an unexpected {type(msg).__name__} during a step")
            for j in sorted(drive - sent):
                if j - 1 in outputs:
                    sent.add(j)
                    await self._send_step(j, step_id, outputs[j - 1])
        return outputs

    def _check_output(self, hs: HopSession, msg: StepResult, x: torch.Tensor) -> torch.Tensor:
        out = decode_tensor(msg.hidden, self.node.settings.stream.limits)
        if list(out.shape) != list(x.shape) or out.dtype != x.dtype:
            raise WireError(f"{hs.where()} returned {msg.hidden.dtype} {list(out.shape)}; expected "
                            f"{self.dtype} {list(x.shape)}")
        return out

    # ---- closing -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every hop's session and stream (idempotent, never raises)."""
        if self._closed:
            return
        self._closed = True
        for hs in self.hops:
            if hs.reader is not None:
                hs.reader.cancel()
        for hs in self.hops:
            if hs.stream is None:
                continue
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await hs.stream.send(Close(session_id=hs.session_id))
            await hs.stream.close(timeout=1.0)
        for hs in self.hops:
            if hs.reader is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await hs.reader

    async def __aenter__(self) -> InferenceSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SyncInferenceSession:
    """An ``InferenceSession`` for synchronous callers: each call runs on the node's ``LoopThread``."""

    def __init__(self, runner: LoopThread, session: InferenceSession) -> None:
        self._runner = runner
        self.session = session

    @property
    def position(self) -> int:
        return self.session.position

    @property
    def route(self) -> list[RouteHop]:
        return self.session.route

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self._runner.run(self.session.forward(hidden))

    def step(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self._runner.run(self.session.step(hidden))

    def span_inputs(self, i: int) -> torch.Tensor:
        return self.session.span_inputs(i)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._runner.run(self.session.close(), timeout=10.0)

    def __enter__(self) -> SyncInferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
