"""A server's receipt desk (issue 23): takes clients' receipts, shows them to anyone, knows each peer's credit.

Contract: ``ReceiptDesk.handle`` serves ``/meshinfer/receipts/1`` (``wire.receipts``): a ``Hand`` of signed
receipts is verified one by one (``ledger.receipts.verify_receipt``), and a receipt is kept only when it names this
server as its server and the peer on the other end of the stream as its client (a peer cannot hand in another's
receipts) and the book counts it (``ledger.book.judge``: newest per session, no replays); the answer says how many
counted and why the others did not. A ``Show`` pages through everything held, as the clients signed it, so whoever
asks can verify each receipt and compute balances themselves. ``credit(peer)`` is that peer's credit as this server
sees it, for the scheduler: work the peer served (from the receipts the peer itself shows, fetched in the
background with ``learn`` and cached for ``learn_ttl`` s; 0 until known) minus the work it used here (from this
server's own book); a client also gets the credit of every server whose record names it in ``credit_to`` (read from
the swarm every 30 s: a contributor's server and its client are two peers). It never blocks and never raises.
Malformed messages get a ``ReceiptsError`` and the stream stays usable; nothing here touches sessions or the model.
``open_desk(config, node)`` opens the desk of ``--credits`` (``--receipts-db``, else ``<cache>/receipts/<peer
id>.sqlite``) and serves its protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from meshinfer.config import cache_root
from meshinfer.errors import ConfigError, MeshinferError, TransportError, WireError
from meshinfer.ledger.book import Book
from meshinfer.ledger.fetch import fetch_receipts
from meshinfer.ledger.receipts import ReceiptError, verify_receipt
from meshinfer.ledger.store import ReceiptStore
from meshinfer.p2p.directory import read_swarm
from meshinfer.p2p.node import PeerNode
from meshinfer.p2p.stream import MessageStream
from meshinfer.server.config import ServerConfig
from meshinfer.wire.receipts import (
    RECEIPTS_PROTOCOL,
    Hand,
    ReceiptsError,
    Show,
    Shown,
    Taken,
    decode_receipts_message,
    decode_signed,
    encode_receipts_message,
    receipts_error_for,
)

log = logging.getLogger(__name__)

LEARN_TTL_S = 60.0
LINKS_EVERY_S = 30.0
LINKS_AGAIN_S = 5.0
MAX_ADDRESSES = 4096
MAX_LEARN_PAGES = 16
USED_REFRESH_S = 2.0


class ReceiptDesk:
    def __init__(self, node: PeerNode, store: ReceiptStore, *, clock: Callable[[], float] = time.time,
                 learn_ttl: float = LEARN_TTL_S) -> None:
        self.node = node
        self.store = store
        self.clock = clock
        self.learn_ttl = learn_ttl
        self._served: dict[str, tuple[int, float]] = {}  # peer -> (work it showed it served, when learned)
        self._learning: dict[str, asyncio.Task[None]] = {}
        self._used: dict[str, int] = {}
        self._used_at = -1e18
        self.links: dict[str, set[str]] = {}
        """Client peer -> servers that give it their credit (``ServerRecord.credit_to``), from the swarm's records."""
        self._links_task: asyncio.Task[None] | None = None
        self._links_wanted = asyncio.Event()
        self._addresses: dict[str, tuple[str, ...]] = {}  # server peer -> its announced libp2p addresses
        self._links_at = -1e18

    async def start(self, *, links_every: float = LINKS_EVERY_S) -> None:
        await self.node.handle(RECEIPTS_PROTOCOL, self.handle)
        self._links_task = asyncio.create_task(self._read_links(links_every), name="credit-links")

    async def _read_links(self, every: float) -> None:
        """Keep ``links`` current: which servers of the swarm name which client in ``credit_to``."""
        while True:
            try:
                snapshot = await read_swarm(self.node, timeout=10.0)
                links: dict[str, set[str]] = {}
                for coverage in snapshot.coverage.values():
                    for peer, record in coverage.servers.items():
                        self._addresses[peer] = tuple(record.addresses)
                        if record.credit_to and record.credit_to != peer:
                            links.setdefault(record.credit_to, set()).add(peer)
                self.links = links
                while len(self._addresses) > MAX_ADDRESSES:
                    del self._addresses[next(iter(self._addresses))]
            except (MeshinferError, OSError, TimeoutError) as err:
                log.debug("cannot read the swarm's credit links: %s", err)
            self._links_at = self.clock()
            self._links_wanted.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._links_wanted.wait()

    # ---- the protocol ----------------------------------------------------------------------------

    async def handle(self, stream: MessageStream) -> None:
        while True:
            try:
                payload = await stream.recv_bytes()
            except (TransportError, asyncio.IncompleteReadError, ConnectionError):
                return
            try:
                msg = decode_receipts_message(payload)
                if isinstance(msg, Hand):
                    reply: Taken | Shown | ReceiptsError = self.take(msg, stream.peer_id)
                elif isinstance(msg, Show):
                    reply = self.show(msg)
                else:
                    reply = ReceiptsError(code="bad_request", message=f"a server does not take {type(msg).__name__}")
            except WireError as err:
                reply = receipts_error_for(err)
            await stream.send_bytes(encode_receipts_message(reply))

    def take(self, msg: Hand, sender: str) -> Taken:
        counted, refused = 0, []
        now = self.clock()
        for i, blob in enumerate(msg.receipts):
            try:
                signed = decode_signed(blob)
                receipt = verify_receipt(signed, now=now)
                if receipt.server != self.node.peer_id:
                    raise ReceiptError(f"the receipt names server {receipt.server[:16]}…, not this one")
                if receipt.client != sender:
                    raise ReceiptError("a peer may hand in only the receipts it signed itself")
                verdict = self.store.put(signed, receipt)
            except (ReceiptError, WireError) as err:
                refused.append(f"{i}: {err}"[:256])
                continue
            if verdict in ("new", "newer"):
                counted += 1
                self._used_at = -1e18  # refresh the used-here totals on the next credit lookup
            else:
                refused.append(f"{i}: {verdict}")
        return Taken(counted=counted, refused=refused)

    def show(self, msg: Show) -> Shown:
        after = (msg.after[0], msg.after[1], msg.after[2]) if len(msg.after) == 3 else None
        page = self.store.signed_receipts(limit=msg.limit + 1, after=after)
        return Shown(receipts=page[:msg.limit], more=len(page) > msg.limit)

    # ---- credit ----------------------------------------------------------------------------------

    def credit(self, peer: str) -> int:
        """``peer``'s credit as this server sees it (see the module docstring); starts a background ``learn``."""
        now = self.clock()
        if now - self._used_at > USED_REFRESH_S:
            try:
                self._used = self.store.used_by_client()
            except sqlite3.Error:
                log.warning("cannot read the receipts' totals", exc_info=True)
            self._used_at = now
        if peer not in self.links and now - self._links_at > LINKS_AGAIN_S:
            self._links_wanted.set()  # a peer not seen before: read the links again now (at most every 5 s)
        served = sum(self._served_by(server, now) for server in {peer, *self.links.get(peer, ())})
        return served - self._used.get(peer, 0)

    def _served_by(self, server: str, now: float) -> int:
        """What ``server`` showed it served (0 until learnt); starts learning it again when stale."""
        served, when = self._served.get(server, (0, -1e18))
        if now - when > self.learn_ttl and server not in self._learning and server != self.node.peer_id:
            try:
                task = asyncio.get_running_loop().create_task(self.learn(server), name=f"learn-receipts:{server[:8]}")
            except RuntimeError:  # no loop: nothing to learn with
                return served
            self._learning[server] = task
            task.add_done_callback(lambda _t, p=server: self._learning.pop(p, None))
        return served

    async def learn(self, peer: str) -> None:
        """Fetch and verify the receipts ``peer`` shows; remember the work they say it served."""
        book = Book()
        try:
            for receipt in await fetch_receipts(self.node, peer, pages=MAX_LEARN_PAGES, now=self.clock(),
                                                maddrs=self._addresses.get(peer, ())):
                if receipt.server == peer:
                    book.offer(receipt)
        except (TimeoutError, MeshinferError, OSError) as err:
            linked = any(peer in servers for servers in self.links.values())
            log.log(logging.INFO if linked else logging.DEBUG, "cannot learn the receipts of %s: %s", peer[:16], err)
        self._served[peer] = (sum(r.work for r in book.receipts()), self.clock())
        if self._served[peer][0]:
            log.info("peer %s showed receipts for %d block-tokens it served", peer[:16], self._served[peer][0])

    async def close(self) -> None:
        for task in [*self._learning.values(), *([self._links_task] if self._links_task else [])]:
            task.cancel()
        self.store.close()


async def open_desk(config: ServerConfig, node: PeerNode) -> ReceiptDesk | None:
    """The receipt desk of ``--credits`` (its SQLite file opened, its protocol served), or None."""
    if not config.credits:
        return None
    path = Path(config.receipts_db) if config.receipts_db else cache_root() / "receipts" / f"{node.peer_id}.sqlite"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        store = await asyncio.to_thread(ReceiptStore, path)
    except (OSError, sqlite3.Error) as err:
        raise ConfigError(f"--receipts-db {path}: cannot open it ({err}); give a writable path or --no-credits") \
            from None
    desk = ReceiptDesk(node, store)
    await desk.start()
    log.info("keeping usage receipts in %s", path)
    return desk
