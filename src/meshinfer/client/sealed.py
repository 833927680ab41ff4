"""Sealed generation: a client sends one generation end-to-end encrypted to a full node (issue 22).

Contract: ``agenerate_sealed(view, model, ids, params, config)`` picks a full node from the swarm view
(``full_nodes``, pure: an online record of the model whose span is [0, n) and that announces a 32-byte
``sealing_key``, bound to its peer id by the record's signature; the fastest first, banned peers last), seals a
``wire.sealed.RequestBody`` (prompt ids, sampling settings, max tokens, stop ids, a random request id and the
time) to that key (``wire.sealing.seal_request``: HPKE, a fresh ephemeral key per request), sends it over
``/meshinfer/sealed/1`` (or, with ``config.sealed_relay``, through a relaying peer over
``/meshinfer/sealed-relay/1``: ``auto`` picks another online server of the model at random, else the peer id or
multiaddr given)
and yields each token as its sealed frame opens (``ResponseOpener``: frames in order, the last one flagged). A
frame that does not open raises ``SealingError`` and drops the stream; a stream that ends before its last frame
raises ``TransportError``. Before the first token, a refusal that another full node may not give (``not_served``,
``overloaded``, ``unreachable``, a failed dial) moves on to the next full node (the peer backs off in the view's
bans), and when every one answered ``not_served`` (keys change when a server restarts) the records are read again
and each tried once more; after it, errors are raised (no failover mid-generation: the full node holds the only KV
cache). The tokens are those of ``LocalModel`` on the node's weights: the node runs the same generation loop (every
``SamplingConfig`` field travels: penalties, ``min_p``, ``logit_bias``; an empty stop set, ``ignore_eos``, too). Not
available: ``top_logprobs`` and constraints (grammars; each a ``ConfigError``). Knows nothing of torch beyond
``ScoredToken``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, Collection, Iterable
from typing import Final

from meshinfer.client.config import ClientConfig
from meshinfer.client.swarm import ModelRef, SwarmView
from meshinfer.errors import ConfigError, MeshinferError, RemoteError, TransportError, WireError
from meshinfer.models.generator import GenerationParams
from meshinfer.models.sampling import ScoredToken
from meshinfer.p2p.stream import StreamSettings
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Error, decode_message
from meshinfer.wire.records import ServerRecord
from meshinfer.wire.sealed import (
    BODY_SAMPLING_VERSION,
    MAX_STOP_IDS,
    REQUEST_ID_BYTES,
    SEALED_PROTOCOL,
    SEALED_RELAY_PROTOCOL,
    SEALED_VERSION,
    RelayOpen,
    RequestBody,
    SealedCode,
    SealedFrame,
    SealedOpen,
    SealedRefusal,
    decode_out,
    decode_sealed,
    encode_body,
    encode_sealed,
    pack_ids,
    unpack_ids,
)
from meshinfer.wire.sealing import ENC_BYTES, KEY_BYTES, ResponseOpener, response_key, seal_request, transcript

log = logging.getLogger(__name__)

NO_FULL_NODE: Final = ("no online full node of {model} takes sealed requests (a server started with --sealed and "
                       "--blocks 0:{n}); start one, or generate without --sealed")
RETRY_CODES: Final = frozenset({SealedCode.NOT_SERVED.value, SealedCode.OVERLOADED.value,
                                SealedCode.UNREACHABLE.value, "limit_exceeded"})
"""Refusals (or sealed errors) another full node may not give: the next one is tried (before the first token)."""


def full_nodes(records: Iterable[ServerRecord], model_id: str, num_blocks: int,
               avoid: Collection[str] = ()) -> list[ServerRecord]:
    """The online full nodes of ``model_id`` that take sealed requests: fastest first, ``avoid`` ones last."""
    whole = BlockRange(0, num_blocks)
    found = [r for r in records if r.model_id == model_id and r.state == "online" and r.span == whole
             and len(r.sealing_key) == 2 * KEY_BYTES]
    return sorted(found, key=lambda r: (r.peer_id in avoid, -r.throughput, r.sessions, r.peer_id))


Relay = tuple[str, list[str], list[str]]
"""A relaying peer: its peer id, libp2p multiaddrs and direct-plane addresses (either list may be empty)."""


def _relay_for(config: ClientConfig, records: dict[str, ServerRecord], target: str) -> Relay | None:
    """The relay to go through (None: straight to the full node): ``auto`` picks another online server of the model,
    a peer id is looked up among them (else found by the swarm's routing), a multiaddr is dialled as given."""
    wanted = config.sealed_relay
    if not wanted:
        return None
    if wanted == "auto":
        others = sorted(p for p, r in records.items() if p != target and r.state == "online")
        if not others:
            raise ConfigError("--sealed-relay auto: no other online server of the model to relay through")
        wanted = random.choice(others)
    if wanted.startswith("/"):
        return wanted.rsplit("/p2p/", 1)[-1], [wanted], []
    record = records.get(wanted)
    return (wanted, [], []) if record is None else (wanted, record.addresses, record.direct_addresses)


def request_body(ids: list[int], params: GenerationParams, model_id: str) -> RequestBody:
    """The generation as the full node will read it (a fresh random request id, the time now)."""
    if params.top_logprobs is not None:
        raise ConfigError("top_logprobs are not available for sealed requests (--sealed)")
    if params.constraint is not None:
        raise ConfigError("constrained decoding (a grammar, response_format, tools) is not available for sealed "
                          "requests (--sealed)")
    if params.stop_token_ids is not None and len(params.stop_token_ids) > MAX_STOP_IDS:
        raise ConfigError(f"a sealed request takes at most {MAX_STOP_IDS} stop token ids, got "
                          f"{len(params.stop_token_ids)}")
    s = params.sampling
    stops = None if params.stop_token_ids is None else pack_ids(sorted(params.stop_token_ids))
    extended = bool(s.presence_penalty or s.frequency_penalty or s.min_p or s.logit_bias)  # see BODY_SAMPLING_VERSION
    return RequestBody(request_id=os.urandom(REQUEST_ID_BYTES), timestamp=time.time(), model_id=model_id,
                       prompt=pack_ids(ids), max_new_tokens=params.max_new_tokens, temperature=s.temperature,
                       top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty, seed=s.seed,
                       stop_ids=stops, presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                       min_p=s.min_p, logit_bias=list(s.logit_bias),
                       v=BODY_SAMPLING_VERSION if extended else SEALED_VERSION)


async def agenerate_sealed(view: SwarmView, model: ModelRef, ids: list[int], params: GenerationParams,
                           config: ClientConfig) -> AsyncGenerator[ScoredToken]:
    """One generation sealed to a full node (see the module docstring); ``ids`` already checked."""
    deadline = time.monotonic() + config.route_wait
    cov = await view.coverage(model)
    while not full_nodes(cov.servers.values(), model.model_id, model.num_blocks) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        cov = await view.coverage(model, refresh=True)
    last: MeshinferError | None = None
    for attempt in range(2):  # a second pass over freshly read records when every node said not_served (a stale key)
        if attempt:
            if not (isinstance(last, RemoteError) and last.code == SealedCode.NOT_SERVED.value):
                break
            cov = await view.coverage(model, refresh=True)
        now = time.monotonic()
        candidates = full_nodes(cov.servers.values(), model.model_id, model.num_blocks, view.bans.avoided(now))
        if not candidates:
            raise MeshinferError(NO_FULL_NODE.format(model=model.describe(), n=model.num_blocks))
        for record in candidates:
            started = False
            try:
                relay = _relay_for(config, cov.servers, record.peer_id)
                async with contextlib.aclosing(_one(view, record, relay, ids, params, model.model_id,
                                                    config)) as tokens:
                    async for token in tokens:
                        started = True
                        yield token
                return
            except (RemoteError, TransportError) as err:
                retry = isinstance(err, TransportError) or err.code in RETRY_CODES
                if started or not retry:
                    raise
                view.bans.fail(record.peer_id, time.monotonic())
                log.info("sealed request to %s failed (%s); trying the next full node", record.peer_id[:16], err)
                last = err
    assert last is not None
    raise last


async def _one(view: SwarmView, record: ServerRecord, relay: Relay | None, ids: list[int],
               params: GenerationParams, model_id: str, config: ClientConfig) -> AsyncGenerator[ScoredToken]:
    key = bytes.fromhex(record.sealing_key)
    context = transcript(record.peer_id, model_id, key)
    body = request_body(ids, params, model_id)
    blob, secret = seal_request(encode_body(body), key, context)
    opener = ResponseOpener(response_key(secret, blob[:ENC_BYTES], context), context)
    del secret
    request = SealedOpen(model_id=model_id, server_key=key, blob=blob)
    settings = StreamSettings(idle_timeout=config.step_timeout, message_timeout=config.step_timeout)
    if relay is None:
        stream = await view.node.open_stream(record.peer_id, SEALED_PROTOCOL, maddrs=record.addresses,
                                             direct=record.direct_addresses, timeout=config.open_timeout,
                                             settings=settings)
        first = encode_sealed(request)
    else:
        peer, maddrs, direct = relay
        stream = await view.node.open_stream(peer, SEALED_RELAY_PROTOCOL, maddrs=maddrs, direct=direct,
                                             timeout=config.open_timeout, settings=settings)
        first = encode_sealed(RelayOpen(target=record.peer_id, open=request, maddrs=record.addresses[:16],
                                        direct=record.direct_addresses[:8]))
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(stream.close)
        await stream.send_bytes(first)
        while not opener.done:
            try:
                payload = await stream.recv_bytes()
            except TransportError as err:
                raise TransportError(f"the sealed stream from {record.peer_id[:16]} ended before its last frame "
                                     f"({err})") from None
            msg = _decode(payload)
            if isinstance(msg, SealedRefusal):
                raise RemoteError(msg.code, msg.message)
            if not isinstance(msg, SealedFrame):
                raise WireError(f"unexpected {type(msg).__name__} on a sealed stream")
            out = decode_out(opener.open(msg.data))
            for token in unpack_ids(out.tokens):
                yield ScoredToken(token)
            if out.error:
                raise RemoteError(out.error_code or "internal", out.error)


def _decode(payload: bytes) -> SealedRefusal | SealedFrame | SealedOpen | RelayOpen:
    """A sealed-protocol message; a session ``Error`` (a transport-level refusal: stream limits) as ``RemoteError``."""
    try:
        return decode_sealed(payload)
    except WireError:
        try:
            msg = decode_message(payload)
        except WireError:
            raise WireError("malformed message on a sealed stream") from None
        if isinstance(msg, Error):
            raise RemoteError(msg.code, msg.message) from None
        raise
