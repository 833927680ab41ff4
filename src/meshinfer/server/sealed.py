"""Sealed requests on a full node (``/meshinfer/sealed/1``) and their relay (``/meshinfer/sealed-relay/1``), issue 22.

Contract: ``SealedService`` is served by a server started with ``--sealed`` while it serves every block of its
model (``FullNode``: its step loop's span [0, n) plus the embeddings and LM head, loaded once on the same device in
the same dtype). One stream is one request: the server reads one ``SealedOpen`` and refuses in the clear, before
computing anything, a request that is not for this model and key (``not_served``), does not open
(``cannot_open``: ``wire.sealing.open_request`` failed; the server stays up and the stream is closed), is malformed,
is a replay (``replayed``: ``wire.sealing.ReplayGuard``, id and ephemeral key remembered for ``--sealed-window``
s either side of the server's clock) or finds ``--max-sealed`` generations running (``overloaded``). Then it
reserves the generation's KV tokens in the server's ``MemoryBudget`` (as one session of the opening peer), and
generates WHOLE, here, with the same loop as ``LocalModel`` (``models.engine.agenerate_scored``: the prefill and
each decode step run on the step loop's compute thread between its turns, ``StepLoop.call``, never batched with
other sessions: a non-goal), sending the tokens back in ``SealedFrame``s sealed by ``ResponseSealer`` (the last one
flagged; a failure, e.g. a context overflow, travels sealed in the last frame).

What the server keeps: nothing of a request after its stream ends (the unsealed body, the ids, the KV cache and
the keys are dropped with the handler's frame; the replay memory holds only the random request id and ephemeral
public key); nothing of it is logged beyond counts at debug level. What it cannot promise: it computes on the
plaintext in its own memory (its operator, or anyone controlling that machine, can read prompts and answers) and
Python cannot wipe freed memory; the privacy is against everyone BETWEEN the client and the full node (relays,
gateway hosts, DHT peers, the network), who see only ciphertext, sizes and timing.

``SealedRelay`` (served by every server unless ``--no-sealed-relay``): reads one ``RelayOpen``, opens a
``/meshinfer/sealed/1`` stream to its target and copies the target's messages back unchanged until the last frame or a
refusal; it never holds a key, so it sees only the target's peer id, ciphertext, sizes and timing. Bounded:
``MAX_RELAYS`` at once, ``MAX_RELAYS_PER_PEER`` per asking peer, ``FRAME_TIMEOUT_S`` between two messages, and the
sealed messages' own size limits. ``capture`` (``--sealed-relay-capture``, for tests and audits of what a relay
sees) appends every payload it forwards, length-prefixed, to a file. Logs, never prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from meshinfer.config import SamplingConfig
from meshinfer.errors import MeshinferError, TransportError, WireError
from meshinfer.models.engine import agenerate_scored, check_prompt
from meshinfer.models.generator import GenerationParams
from meshinfer.p2p.stream import MessageStream, StreamSettings
from meshinfer.server.memory import MemoryBudget, Overloaded, short_peer
from meshinfer.types import BlockRange
from meshinfer.wire.messages import error_code_for
from meshinfer.wire.sealed import (
    SEALED_PROTOCOL,
    SEALED_RELAY_PROTOCOL,
    RelayOpen,
    RequestBody,
    SealedCode,
    SealedFrame,
    SealedOpen,
    SealedRefusal,
    TokensOut,
    decode_body,
    decode_sealed,
    encode_body,
    encode_sealed,
    pack_ids,
    unpack_ids,
)
from meshinfer.wire.sealing import (
    ENC_BYTES,
    LAST,
    ReplayError,
    ReplayGuard,
    ResponseSealer,
    SealingError,
    SealingKey,
    open_request,
    response_key,
    same_key,
    transcript,
)

if TYPE_CHECKING:
    import torch

    from meshinfer.models.checkpoint import Checkpoint
    from meshinfer.models.head import ClientHead
    from meshinfer.models.kv_cache import KVCache
    from meshinfer.models.spec import ModelSpec
    from meshinfer.p2p.node import PeerNode
    from meshinfer.server.config import ServerConfig
    from meshinfer.server.runtime import StepLoop

log = logging.getLogger(__name__)

FRAME_TIMEOUT_S: Final = 300.0
"""Most seconds a relay (or a client) waits for the next message of a sealed stream (a long prefill)."""
MAX_RELAYS: Final = 64
MAX_RELAYS_PER_PEER: Final = 8
RELAY_SETTINGS: Final = StreamSettings(idle_timeout=FRAME_TIMEOUT_S, message_timeout=FRAME_TIMEOUT_S)


@dataclass(frozen=True)
class FullNode:
    """What a sealed generation runs on: the served span [0, n) (through its step loop) and the head."""

    spec: ModelSpec
    steps: StepLoop
    head: ClientHead


def _forward(node: FullNode, chunk: list[int], cache: KVCache) -> torch.Tensor:  # ids [T] -> logits [V] float32
    import torch

    hidden = node.steps.span(node.head.embed(torch.tensor([chunk])), cache)  # [1, T, H]
    return node.head.logits(hidden[0, -1])  # [V]


async def _refuse(stream: MessageStream, code: SealedCode, message: str) -> None:
    with contextlib.suppress(MeshinferError, TimeoutError):
        async with asyncio.timeout(2.0):
            await stream.send_bytes(encode_sealed(SealedRefusal(code=code, message=message[:1024])))


class SealedService:
    """The full node's side of ``/meshinfer/sealed/1`` (see the module docstring)."""

    def __init__(self, *, peer_id: str, model_id: str, key: SealingKey, full: Callable[[], FullNode | None],
                 budget: Callable[[], MemoryBudget | None], max_active: int, window_s: float) -> None:
        self.peer_id = peer_id
        self.model_id = model_id
        self.key = key
        self.full = full
        """The full node now (None while the server does not serve every block, or is not online)."""
        self.budget = budget
        self.max_active = max_active
        self.replay = ReplayGuard(window_s=window_s)
        self.context = transcript(peer_id, model_id, key.public_bytes)
        self.active = 0
        self.counts: Counter[str] = Counter()
        """Requests by outcome (``done``, ``failed`` and each refusal code), for tests and metrics."""

    async def handle(self, stream: MessageStream) -> None:
        msg = decode_sealed(await stream.recv_bytes())
        if not isinstance(msg, SealedOpen):
            await self._refuse(stream, SealedCode.BAD_REQUEST, "expected a SealedOpen")
            return
        full = self.full()
        if full is None or msg.model_id != self.model_id or not same_key(msg.server_key, self.key.public_bytes):
            await self._refuse(stream, SealedCode.NOT_SERVED, "this peer takes no sealed requests of that model "
                                                              "under that key now; re-read the swarm's records")
            return
        try:
            payload, secret = open_request(msg.blob, self.key, self.context)
            body = decode_body(payload)
        except SealingError as err:
            log.info("refused a sealed request from %s: %s", short_peer(stream.peer_id), err)
            await self._refuse(stream, SealedCode.UNSEALED, str(err))
            return
        except WireError:
            await self._refuse(stream, SealedCode.BAD_REQUEST, "the sealed request body is malformed")
            return
        del payload
        enc = msg.blob[:ENC_BYTES]
        if body.model_id != self.model_id:
            await self._refuse(stream, SealedCode.NOT_SERVED, "the sealed request names another model")
            return
        try:
            self.replay.check(body.request_id, enc, body.timestamp)
        except ReplayError as err:
            log.info("refused a sealed request from %s: %s", short_peer(stream.peer_id), err)
            await self._refuse(stream, SealedCode.REPLAYED, str(err))
            return
        if self.active >= self.max_active:
            await self._refuse(stream, SealedCode.OVERLOADED, f"{self.max_active} sealed generations running "
                                                              "(limit --max-sealed); try another full node")
            return
        sealer = ResponseSealer(response_key(secret, enc, self.context), self.context)
        del secret
        self.active += 1
        try:
            await self._generate(stream, full, body, sealer)
        finally:
            self.active -= 1

    async def _refuse(self, stream: MessageStream, code: SealedCode, message: str) -> None:
        self.counts[code.value] += 1
        await _refuse(stream, code, message)

    async def _generate(self, stream: MessageStream, full: FullNode, body: RequestBody, sealer: ResponseSealer) -> None:
        """Generate ``body`` and send its tokens sealed; a failure goes back sealed in the last frame."""
        reservation = f"sealed:{os.urandom(8).hex()}"
        budget = self.budget()
        sent = 0
        try:
            ids = check_prompt(full.spec, unpack_ids(body.prompt), body.max_new_tokens)
            sampling = SamplingConfig(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                      repetition_penalty=body.repetition_penalty, seed=body.seed,
                                      presence_penalty=body.presence_penalty,
                                      frequency_penalty=body.frequency_penalty, min_p=body.min_p,
                                      logit_bias=tuple(body.logit_bias))
            stops = None if body.stop_ids is None else frozenset(unpack_ids(body.stop_ids))
            params = GenerationParams(body.max_new_tokens, sampling, stops)
            wanted = len(ids) + body.max_new_tokens
            if budget is not None:
                budget.reserve(reservation, wanted, stream.peer_id)
            cache = await full.steps.new_cache(BlockRange(0, full.spec.num_blocks), wanted)

            async def forward(chunk: list[int], position: int) -> torch.Tensor:
                return await full.steps.call(_forward, full, chunk, cache)

            batch: list[int] = []
            async for scored in agenerate_scored(forward, ids, params, full.spec.eos_token_ids):
                batch.append(scored.token)
                if len(batch) >= body.tokens_per_frame:
                    await self._send(stream, sealer, TokensOut(tokens=pack_ids(batch)))
                    sent += len(batch)
                    batch = []
            await self._send(stream, sealer, TokensOut(tokens=pack_ids(batch), done=True), last=True)
            sent += len(batch)
            self.counts["done"] += 1
        except (TransportError, asyncio.CancelledError):
            self.counts["failed"] += 1
            raise
        except Exception as err:  # the reason goes back sealed: it may describe the request
            self.counts["failed"] += 1
            if not isinstance(err, MeshinferError):
                log.exception("sealed generation failed")
            code = SealedCode.OVERLOADED.value if isinstance(err, Overloaded) else error_code_for(err).value
            with contextlib.suppress(MeshinferError, TimeoutError):
                await self._send(stream, sealer, TokensOut(done=True, error=(str(err) or type(err).__name__)[:1024],
                                                           error_code=code), last=True)
        finally:
            if budget is not None:
                budget.release(reservation)
            log.debug("sealed generation for %s ended after %d tokens", short_peer(stream.peer_id), sent)

    @staticmethod
    async def _send(stream: MessageStream, sealer: ResponseSealer, out: TokensOut, *, last: bool = False) -> None:
        await stream.send_bytes(encode_sealed(SealedFrame(data=sealer.seal(encode_body(out), last=last))))


OpenStream = Callable[..., Awaitable[MessageStream]]
"""``PeerNode.open_stream``: (peer_id, protocol, maddrs=..., direct=..., timeout=..., settings=...)."""


class SealedRelay:
    """Any peer's side of ``/meshinfer/sealed-relay/1``: forwards ciphertext (see the module docstring)."""

    def __init__(self, open_stream: OpenStream, *, peer_id: str, capture: Path | None = None,
                 max_relays: int = MAX_RELAYS, max_per_peer: int = MAX_RELAYS_PER_PEER) -> None:
        self.open_stream = open_stream
        self.peer_id = peer_id
        self.capture = capture
        self.max_relays = max_relays
        self.max_per_peer = max_per_peer
        self._active: Counter[str] = Counter()
        self.relayed_bytes = 0
        """Bytes forwarded in both directions (for tests and metrics)."""

    async def handle(self, stream: MessageStream) -> None:
        first = await stream.recv_bytes()
        msg = decode_sealed(first)
        if not isinstance(msg, RelayOpen):
            await _refuse(stream, SealedCode.BAD_REQUEST, "expected a RelayOpen")
            return
        if msg.target == self.peer_id:
            await _refuse(stream, SealedCode.BAD_REQUEST, "a relay does not relay to itself: open "
                                                          f"{SEALED_PROTOCOL} on it directly")
            return
        peer = stream.peer_id
        if sum(self._active.values()) >= self.max_relays or self._active[peer] >= self.max_per_peer:
            await _refuse(stream, SealedCode.OVERLOADED, f"relay busy ({self.max_relays} relayed requests at once, "
                                                         f"{self.max_per_peer} per peer)")
            return
        self._active[peer] += 1
        try:
            await self._relay(stream, msg, first)
        finally:
            self._active[peer] -= 1
            if not self._active[peer]:
                del self._active[peer]

    async def _relay(self, stream: MessageStream, msg: RelayOpen, first: bytes) -> None:
        request = encode_sealed(msg.open)
        self._record([first])
        try:
            upstream = await self.open_stream(msg.target, SEALED_PROTOCOL, maddrs=msg.maddrs[:16],
                                              direct=msg.direct[:8], timeout=15.0, settings=RELAY_SETTINGS)
        except MeshinferError as err:
            log.debug("cannot relay to %s: %s", msg.target[:16], err)
            await _refuse(stream, SealedCode.UNREACHABLE, f"the relay cannot reach {msg.target[:64]}")
            return
        async with upstream:
            await upstream.send_bytes(request)
            while True:
                try:
                    payload = await upstream.recv_bytes(timeout=FRAME_TIMEOUT_S)
                except TransportError as err:
                    log.debug("relayed stream from %s ended: %s", msg.target[:16], err)
                    return  # the client sees its stream end before the last frame
                self._record([payload])
                await stream.send_bytes(payload)
                if _is_end(payload):
                    return

    def _record(self, payloads: Sequence[bytes]) -> None:
        for payload in payloads:
            self.relayed_bytes += len(payload)
            if self.capture is not None:
                with self.capture.open("ab") as f:
                    f.write(struct.pack(">I", len(payload)) + payload)


def _is_end(payload: bytes) -> bool:
    """Whether a forwarded message ends the stream (a refusal, the last frame, or anything unreadable)."""
    try:
        msg = decode_sealed(payload)
    except WireError:
        return True
    return not isinstance(msg, SealedFrame) or (len(msg.data) > 0 and msg.data[0] == LAST)


async def start_sealed(cfg: ServerConfig, node: PeerNode, *, span: BlockRange, num_blocks: int, model_name: str,
                       model_id: str, ckpt: Checkpoint, device: Any, full: Callable[[], FullNode | None],
                       budget: Callable[[], MemoryBudget]) -> tuple[SealedRelay | None, SealedService | None, Any]:
    """Serve the sealed relay (unless ``--no-sealed-relay``) and, with ``--sealed`` on a full node, sealed
    requests: load the head and make a sealing key (announced with the record once online). Returns the relay, the
    service and the head (None where not served)."""
    relay: SealedRelay | None = None
    if cfg.sealed_relay:
        capture = Path(cfg.sealed_relay_capture) if cfg.sealed_relay_capture else None
        relay = SealedRelay(node.open_stream, peer_id=node.peer_id, capture=capture)
        await node.handle(SEALED_RELAY_PROTOCOL, relay.handle)
    if not cfg.sealed:
        return relay, None, None
    whole = BlockRange(0, num_blocks)
    if span != whole:
        log.warning("--sealed: this server serves blocks %s, not the whole model %s; it takes no sealed requests",
                    span, whole)
        return relay, None, None
    from meshinfer.models.quant import QuantConfig

    try:
        head = await asyncio.to_thread(ckpt.load_head, cfg.dtype, device,
                                       QuantConfig("none" if cfg.quant == "none" else "int8"))
    except MeshinferError as err:
        log.warning("--sealed: cannot load the embeddings and LM head (%s); this server takes no sealed requests", err)
        return relay, None, None
    service = SealedService(peer_id=node.peer_id, model_id=model_id, key=SealingKey.generate(), full=full,
                            budget=budget, max_active=cfg.max_sealed, window_s=cfg.sealed_window)
    await node.handle(SEALED_PROTOCOL, service.handle)
    log.info("taking sealed requests (%s) for %s", SEALED_PROTOCOL, model_name)
    return relay, service, head
