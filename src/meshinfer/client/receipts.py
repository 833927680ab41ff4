"""The client's usage receipts (issue 23): it signs, for each hop session, the work that server did for it.

Contract: a ``ReceiptSender`` belongs to one client peer (its ``PeerNode``: the identity that signs) and one model.
``opened(peer, session_id, blocks)`` starts the book of one hop session; ``computed(session_id, tokens)`` adds
the tokens that hop just computed (every token of every step it ran: replays and rejected speculative drafts are
work too); ``update(hops)``/``finish(hops)`` do the same from ``client.hops.HopSession``s (their ``work``
counters), as an ``InferenceSession`` calls them after each step and when it closes. Every ``every_tokens``
tokens, and once more at ``closed(session_id)``, a new cumulative receipt
(``wire.receipts.Receipt``: seq + 1, the total so far) is signed and queued for its server; ``flush()`` hands the
queued receipts to their servers over ``/meshinfer/receipts/1``, one stream per server kept open and reused. It
runs in the background: a server that does not speak the protocol, or refuses, costs one log line and that
server's receipts (never the generation). Signing is one RSA-2048 signature per receipt (~1 ms). Knows nothing
of routes, tensors or the model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshinfer.client.hops import HopSession
from meshinfer.errors import MeshinferError
from meshinfer.ledger.receipts import issue_receipt, next_receipt
from meshinfer.p2p.node import PeerNode
from meshinfer.p2p.stream import MessageStream
from meshinfer.wire.receipts import (
    MAX_RECEIPTS_PER_MESSAGE,
    RECEIPTS_PROTOCOL,
    Hand,
    Receipt,
    Taken,
    decode_receipts_message,
    encode_receipts_message,
    encode_signed,
)

log = logging.getLogger(__name__)

RECEIPT_EVERY_TOKENS = 64
MAX_QUEUED_PER_SERVER = 1024


@dataclass
class _Hop:
    peer: str
    blocks: int
    started: float
    tokens: int = 0
    last: Receipt | None = None
    """The newest receipt signed for this hop session (None: none yet)."""


class ReceiptSender:
    def __init__(self, node: PeerNode, model_id: str, *, every_tokens: int = RECEIPT_EVERY_TOKENS,
                 clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self.model_id = model_id
        self.every_tokens = every_tokens
        self.clock = clock
        self._hops: dict[str, _Hop] = {}
        self._queued: dict[str, dict[str, bytes]] = {}  # server peer -> session -> its newest signed receipt
        self._streams: dict[str, MessageStream] = {}
        self._refusing: set[str] = set()  # servers that do not take receipts (no protocol): not asked again
        self._flushing: asyncio.Task[None] | None = None
        self.signed = 0
        self.handed = 0
        self.refused = 0

    def opened(self, peer: str, session_id: str, blocks: int) -> None:
        if peer != self.node.peer_id:
            self._hops[session_id] = _Hop(peer, blocks, self.clock())

    def update(self, hops: Iterable[HopSession]) -> None:
        """Bring each hop's book up to its ``work`` (opening it on first sight)."""
        for hs in hops:
            book = self._hops.get(hs.session_id)
            if book is None:
                self.opened(hs.hop.peer_id, hs.session_id, len(hs.hop.span))
                book = self._hops.get(hs.session_id)
                if book is None:
                    continue
            self.computed(hs.session_id, hs.work - book.tokens)

    def finish(self, hops: Iterable[HopSession]) -> None:
        """The hops' sessions ended: their final receipts."""
        hops = list(hops)
        self.update(hops)
        for hs in hops:
            self.closed(hs.session_id)

    def computed(self, session_id: str, tokens: int) -> None:
        hop = self._hops.get(session_id)
        if hop is None or tokens <= 0:
            return
        hop.tokens += tokens
        if hop.tokens - (hop.last.tokens if hop.last else 0) >= self.every_tokens:
            self._sign(session_id, hop)

    def closed(self, session_id: str) -> None:
        hop = self._hops.pop(session_id, None)
        if hop is not None and hop.tokens > (hop.last.tokens if hop.last else 0):
            self._sign(session_id, hop)

    def _sign(self, session_id: str, hop: _Hop) -> None:
        now = self.clock()
        if hop.last is None:
            receipt = Receipt(model=self.model_id, client=self.node.peer_id, server=hop.peer, session=session_id,
                              seq=1, tokens=hop.tokens, blocks=hop.blocks, started=hop.started, issued=max(now,
                                                                                                         hop.started))
        else:
            receipt = next_receipt(hop.last, tokens=hop.tokens, issued=now)
        hop.last = receipt
        if hop.peer in self._refusing:
            return
        queue = self._queued.setdefault(hop.peer, {})
        # cumulative receipts: a newer one of the same session replaces a queued older one
        queue.pop(session_id, None)
        queue[session_id] = encode_signed(issue_receipt(self.node.identity, receipt))
        while len(queue) > MAX_QUEUED_PER_SERVER:
            del queue[next(iter(queue))]
        self.signed += 1
        self._kick()

    def _kick(self) -> None:
        if self._flushing is None or self._flushing.done():
            try:
                self._flushing = asyncio.get_running_loop().create_task(self.flush(), name="hand-receipts")
            except RuntimeError:
                pass

    async def flush(self) -> None:
        """Hand every queued receipt to its server (see the module docstring); never raises."""
        while self._queued:
            peer, queue = next(iter(self._queued.items()))
            sessions = list(queue)[:MAX_RECEIPTS_PER_MESSAGE]
            batch = [queue.pop(session) for session in sessions]
            if not queue:
                del self._queued[peer]
            try:
                taken = await self._hand(peer, batch)
            except (MeshinferError, OSError, TimeoutError) as err:
                log.info("could not hand %d receipts to %s: %s", len(batch), peer[:16], err)
                stream = self._streams.pop(peer, None)
                if stream is not None:
                    await stream.close()
                self._refusing.add(peer)
                continue
            self.handed += taken.counted
            self.refused += len(taken.refused)
            if taken.refused:
                log.info("server %s refused %d receipts (first: %s)", peer[:16], len(taken.refused), taken.refused[0])

    async def _hand(self, peer: str, batch: list[bytes]) -> Taken:
        stream = self._streams.get(peer)
        if stream is None or stream.closed:
            stream = await self.node.open_stream(peer, RECEIPTS_PROTOCOL, timeout=10.0)
            self._streams[peer] = stream
        await stream.send_bytes(encode_receipts_message(Hand(receipts=batch)))
        reply = decode_receipts_message(await stream.recv_bytes(timeout=30.0))
        if not isinstance(reply, Taken):
            raise MeshinferError(f"server answered {type(reply).__name__}: {getattr(reply, 'message', '')}")
        return reply

    async def close(self) -> None:
        """Sign what is left, hand it over, close the streams."""
        for session_id in list(self._hops):
            self.closed(session_id)
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self.flush()
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()
