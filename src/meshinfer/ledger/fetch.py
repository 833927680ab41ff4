"""Reading receipts from peers over ``/meshinfer/receipts/1`` (issue 23): what a peer shows, verified.

Contract: ``fetch_receipts(node, peer)`` pages through what ``peer`` shows (at most ``pages`` pages of
``MAX_RECEIPTS_PER_MESSAGE``), verifies every receipt (``ledger.receipts.verify_receipt``) and drops the ones that
fail; it raises ``MeshinferError``/``OSError``/``TimeoutError`` when the peer cannot be asked. ``collect(node,
peers)`` asks many peers at once (bounded concurrency) and returns a ``Book`` of everything they showed and, per
peer, how many receipts it showed or why it could not be asked: the input of ``meshinfer credits``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from meshinfer.errors import MeshinferError, WireError
from meshinfer.ledger.book import Book
from meshinfer.ledger.receipts import ReceiptError, verify_receipt
from meshinfer.p2p.node import PeerNode
from meshinfer.wire.receipts import (
    MAX_RECEIPTS_PER_MESSAGE,
    RECEIPTS_PROTOCOL,
    Receipt,
    Show,
    Shown,
    decode_receipts_message,
    decode_signed,
    encode_receipts_message,
)

MAX_PAGES = 16
MAX_CONCURRENT = 8


async def fetch_receipts(node: PeerNode, peer: str, *, pages: int = MAX_PAGES, now: float,
                         maddrs: tuple[str, ...] = (), timeout: float = 10.0) -> list[Receipt]:
    """The receipts ``peer`` shows (at most ``pages`` pages), each verified; bad ones are dropped."""
    stream = await node.open_stream(peer, RECEIPTS_PROTOCOL, maddrs=maddrs, timeout=timeout)
    out: list[Receipt] = []
    try:
        after: list[str] = []
        for _ in range(pages):
            await stream.send_bytes(encode_receipts_message(Show(after=after, limit=MAX_RECEIPTS_PER_MESSAGE)))
            reply = decode_receipts_message(await stream.recv_bytes(timeout=timeout))
            if not isinstance(reply, Shown):
                raise WireError(f"peer answered {type(reply).__name__} to Show")
            for blob in reply.receipts:
                try:
                    receipt = verify_receipt(decode_signed(blob), now=now)
                except (ReceiptError, WireError):
                    continue
                out.append(receipt)
                after = list(receipt.key)
            if not reply.more or not reply.receipts:
                break
    finally:
        await stream.close()
    return out


async def collect(node: PeerNode, peers: Sequence[tuple[str, tuple[str, ...]]], *, now: float, pages: int = MAX_PAGES,
                  timeout: float = 10.0) -> tuple[Book, dict[str, int | str]]:
    """Every receipt ``peers`` ((peer id, multiaddrs) pairs) show, in one ``Book``; per peer: the count shown, or
    why it could not be asked."""
    book = Book()
    shown: dict[str, int | str] = {}
    gate = asyncio.Semaphore(MAX_CONCURRENT)

    async def ask(peer: str, maddrs: tuple[str, ...]) -> None:
        async with gate:
            try:
                receipts = await fetch_receipts(node, peer, pages=pages, now=now, maddrs=maddrs, timeout=timeout)
            except (MeshinferError, OSError, TimeoutError) as err:
                shown[peer] = str(err) or type(err).__name__
                return
        shown[peer] = len(receipts)
        for receipt in receipts:
            book.offer(receipt)

    await asyncio.gather(*(ask(peer, maddrs) for peer, maddrs in peers))
    return book, shown
