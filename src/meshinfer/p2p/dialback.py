"""Dial-back: a peer of the swarm tells a new peer whether it can be reached on its announced direct address.

Contract: ``DIALBACK_PROTOCOL`` is served (over libp2p) by every non-client ``PeerNode`` with a direct plane. The
asker sends one ``Ping`` whose payload is ``encode_addresses``: at most ``MAX_ADDRESSES`` TLS direct addresses
(``/ip4/H/tcp/P/tls``...), each at most ``MAX_ADDRESS_LEN`` characters. The server opens a FRESH TCP connection to
them with its direct plane and the asker's peer id, speaking ``PROBE_PROTOCOL`` (so only a listener holding the
asker's key counts: the handshake authenticates it), and answers one ``Pong`` whose payload is ``REACHED`` or
``NOT_REACHED``, nothing more (no error text: the server's view of other hosts and ports is not for askers).
Bounded: one dial-back per asker per ``MIN_INTERVAL_S`` (remembering at most ``MAX_REMEMBERED`` askers), at most
``MAX_PER_MINUTE`` in all per minute and ``MAX_CONCURRENT`` at once, each dial within ``DIAL_TIMEOUT_S``; anything
else gets an ``Error``. What it proves: that peer reached that address now; it says nothing about the libp2p plane
(a libp2p dial-back would reuse the asker's own connection) nor about other peers' networks. ``ask_dialback`` is the
asker's side (``meshinfer doctor``): it listens on the direct plane per ``P2PConfig`` (host, ``--direct-port``,
``--direct-announce``), asks one peer, and closes its listener.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import msgspec

from meshinfer.config import P2PConfig
from meshinfer.errors import ConfigError, MeshinferError
from meshinfer.p2p.allowlist import load_allow_list
from meshinfer.p2p.direct import DirectPlane, parse_address
from meshinfer.p2p.identity import Identity
from meshinfer.p2p.membership import load_swarm_key
from meshinfer.p2p.reachability import announced_direct
from meshinfer.p2p.stream import DEFAULT_SETTINGS, MessageStream
from meshinfer.wire.messages import Error, ErrorCode, Ping, Pong

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL: Final = "/meshinfer/dialback/1"
PROBE_PROTOCOL: Final = "/meshinfer/dialback-probe/1"
MAX_ADDRESSES: Final = 4
MAX_ADDRESS_LEN: Final = 200
MIN_INTERVAL_S: Final = 10.0
MAX_REMEMBERED: Final = 1024
MAX_CONCURRENT: Final = 2
MAX_PER_MINUTE: Final = 30
"""Dial-backs one server makes per minute, whoever asks (peer ids cost nothing to make)."""
DIAL_TIMEOUT_S: Final = 5.0
REACHED: Final = b"reached"
NOT_REACHED: Final = b"not reached"


def encode_addresses(addresses: Sequence[str]) -> bytes:
    return msgspec.msgpack.encode(list(addresses))


def decode_addresses(payload: bytes) -> list[str]:
    """The TLS direct addresses a dial-back request names; ``ConfigError`` when malformed or over the bounds."""
    try:
        items = msgspec.msgpack.decode(payload, type=list[str])
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise ConfigError("a dial-back request must be a list of direct addresses") from None
    if not items or len(items) > MAX_ADDRESSES or any(len(a) > MAX_ADDRESS_LEN for a in items):
        raise ConfigError(f"a dial-back request names 1..{MAX_ADDRESSES} addresses of <= {MAX_ADDRESS_LEN} chars")
    for text in items:
        if not parse_address(text).tls:
            raise ConfigError(f"dial-back address {text!r} is not a TLS address")
    return items


class DialBackService:
    """The server side: dials askers back on their direct addresses (bounded, see the module doc)."""

    def __init__(self, plane: DirectPlane, clock: Callable[[], float] = time.monotonic) -> None:
        self.plane = plane
        self.clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()
        self._running = 0
        self._recent: deque[float] = deque()

    def _admit(self, peer_id: str) -> str | None:
        now = self.clock()
        last = self._last.get(peer_id)
        if last is not None and now - last < MIN_INTERVAL_S:
            return f"one dial-back per {MIN_INTERVAL_S:g} s"
        if self._running >= MAX_CONCURRENT:
            return f"{MAX_CONCURRENT} dial-backs in progress"
        while self._recent and now - self._recent[0] >= 60.0:
            self._recent.popleft()
        if len(self._recent) >= MAX_PER_MINUTE:
            return f"{MAX_PER_MINUTE} dial-backs in the last minute"
        self._recent.append(now)
        self._last[peer_id] = now
        self._last.move_to_end(peer_id)
        while len(self._last) > MAX_REMEMBERED:
            self._last.popitem(last=False)
        return None

    async def handle(self, stream: MessageStream) -> None:
        msg = await stream.recv()
        if not isinstance(msg, Ping):
            await stream.send(Error(code=ErrorCode.BAD_REQUEST, message="expected a Ping naming direct addresses"))
            return
        try:
            addresses = decode_addresses(msg.payload)
        except ConfigError as err:
            await stream.send(Error(code=ErrorCode.BAD_REQUEST, message=str(err)[:200]))
            return
        refusal = self._admit(stream.peer_id)
        if refusal is not None:
            await stream.send(Error(code=ErrorCode.LIMIT_EXCEEDED, message=refusal))
            return
        self._running += 1
        try:
            probe = await self.plane.dial_any(stream.peer_id, addresses, PROBE_PROTOCOL, settings=DEFAULT_SETTINGS,
                                              timeout=DIAL_TIMEOUT_S)
            await probe.close(timeout=0.5)
            reached = True
        except MeshinferError as err:
            log.debug("dial-back of %s at %s failed: %s", stream.peer_id[:16], addresses, err)
            reached = False
        finally:
            self._running -= 1
        await stream.send(Pong(seq=msg.seq, payload=REACHED if reached else NOT_REACHED))


async def _probe_handler(stream: MessageStream) -> None:
    return  # the authenticated connection itself is the answer


OpenStream = Callable[[str, str], Awaitable[MessageStream]]


async def ask_dialback(identity: Identity, config: P2PConfig, peer_id: str, open_stream: OpenStream,
                       maddrs: Sequence[str] = (), *, timeout: float = 15.0) -> tuple[list[str], bool | None, str]:
    """Listen on the direct plane as ``config`` says (a wildcard host: on the hosts of ``maddrs``), ask
    ``peer_id`` (through ``open_stream(peer_id, protocol)``) to dial back: (the addresses asked, reached or not
    (None: no answer), why no answer)."""
    plane = DirectPlane(identity, swarm_key=load_swarm_key(config.swarm_key) if config.swarm_key else None,
                        allow=load_allow_list(config.swarm_allow) if config.swarm_allow else None)
    try:
        try:
            await plane.listen(config.host, config.direct_port)
        except (MeshinferError, OSError) as err:
            return [], None, f"cannot listen on {config.host} port {config.direct_port}: {str(err)[:150]}"
        plane.handle(PROBE_PROTOCOL, _probe_handler, DEFAULT_SETTINGS)
        addresses = [a for a in announced_direct(config.direct_announce_address, config.host, maddrs,
                                                 plane.plain_port, plane.tls_port) if a.endswith("/tls")]
        if not addresses:
            return [], None, "no address to announce: pass --direct-announce HOST:PORT"
        try:
            async with asyncio.timeout(timeout):
                stream = await open_stream(peer_id, DIALBACK_PROTOCOL)
                try:
                    await stream.send(Ping(seq=0, payload=encode_addresses(addresses[:MAX_ADDRESSES])))
                    reply = await stream.recv()
                finally:
                    await stream.close(timeout=0.5)
        except (MeshinferError, TimeoutError) as err:
            return addresses, None, f"the peer did not answer ({str(err)[:150] or 'timed out'}); it may be older"
        if isinstance(reply, Pong):
            return addresses, reply.payload == REACHED, ""
        if isinstance(reply, Error):
            return addresses, None, f"the peer refused: {reply.message[:150]}"
        return addresses, None, f"unexpected answer {type(reply).__name__}"
    finally:
        await plane.close()
