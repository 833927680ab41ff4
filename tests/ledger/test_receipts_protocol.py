"""The receipts protocol over real peers (libp2p daemons on 127.0.0.1): a client's sender hands its signed
receipts to the server they name; the server keeps only valid, own ones; anyone can page through them and
compute the same balances; a peer's credit is learnt from the receipts it shows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from meshinfer.client.receipts import ReceiptSender
from meshinfer.config import P2PConfig
from meshinfer.ledger.book import Book
from meshinfer.ledger.fetch import fetch_receipts
from meshinfer.ledger.receipts import issue_receipt
from meshinfer.ledger.store import ReceiptStore
from meshinfer.loopthread import LoopThread
from meshinfer.p2p import NodeSettings, PeerNode
from meshinfer.server.receipts import ReceiptDesk
from meshinfer.wire.receipts import (
    RECEIPTS_PROTOCOL,
    Hand,
    Receipt,
    ReceiptsError,
    Taken,
    decode_receipts_message,
    encode_receipts_message,
    encode_signed,
)

pytestmark = pytest.mark.slow

MODEL = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopThread, list[PeerNode], list[ReceiptDesk]]]:
    """Two servers (each with a desk) and a client, all real peers."""
    runner = LoopThread("receipts-test").start()
    nodes: list[PeerNode] = []
    desks: list[ReceiptDesk] = []
    tmp: Path = tmp_path_factory.mktemp("receipts")

    async def start() -> None:
        first = await PeerNode.start(P2PConfig(host="127.0.0.1", mdns=False), NodeSettings())
        nodes.append(first)
        nodes.append(await PeerNode.start(P2PConfig(host="127.0.0.1", initial_peers=tuple(first.maddrs), mdns=False),
                                          NodeSettings()))
        nodes.append(await PeerNode.start(P2PConfig(initial_peers=tuple(first.maddrs), mdns=False),
                                          NodeSettings(client_mode=True)))
        for i, node in enumerate(nodes[:2]):
            desk = ReceiptDesk(node, ReceiptStore(tmp / f"server{i}.sqlite"))
            await desk.start()
            desks.append(desk)

    try:
        runner.run(start(), 120)
        yield runner, nodes, desks
    finally:
        async def stop() -> None:
            for desk in desks:
                await desk.close()
            for node in nodes:
                await node.close()

        runner.run(stop(), 60)
        runner.stop()


def _raw(runner: LoopThread, node: PeerNode, peer: str, payloads: list[bytes]) -> list[Any]:
    async def go() -> list[Any]:
        stream = await node.open_stream(peer, RECEIPTS_PROTOCOL)
        try:
            replies = []
            for payload in payloads:
                await stream.send_bytes(payload)
                replies.append(decode_receipts_message(await stream.recv_bytes(timeout=30)))
            return replies
        finally:
            await stream.close()

    return runner.run(go(), 60)


def test_a_client_hands_its_receipts_and_anyone_sees_the_same_balances(peers):
    runner, (server_a, server_b, client), (desk_a, desk_b) = peers
    sender = ReceiptSender(client, MODEL, every_tokens=16)

    async def use() -> None:
        sender.opened(server_a.peer_id, "a1" * 12, blocks=2)
        sender.opened(server_b.peer_id, "b1" * 12, blocks=3)
        for _ in range(40):  # 40 one-token steps through both hops
            sender.computed("a1" * 12, 1)
            sender.computed("b1" * 12, 1)
        sender.closed("a1" * 12)
        await sender.close()

    runner.run(use(), 60)
    assert sender.refused == 0 and sender.handed >= 2
    assert [(r.tokens, r.blocks) for r in desk_a.store.receipts()] == [(40, 2)]
    assert [(r.tokens, r.blocks) for r in desk_b.store.receipts()] == [(40, 3)]
    # two independent checkers (each server, asking both) compute the same balances
    seen = []
    for asker in (server_a, server_b):
        receipts: list[Receipt] = []
        for shower in (server_a, server_b):
            if shower is asker:
                receipts += (desk_a if shower is server_a else desk_b).store.receipts()
            else:
                receipts += runner.run(fetch_receipts(asker, shower.peer_id, now=time.time()), 60)
        seen.append(Book(receipts).balances())
    assert seen[0] == seen[1]
    assert seen[0][client.peer_id].used == 40 * 2 + 40 * 3 and seen[0][server_b.peer_id].served == 120


def test_forged_replayed_and_foreign_receipts_are_refused_and_the_stream_stays_usable(peers):
    runner, (server_a, server_b, client), (_desk_a, _) = peers
    now = time.time()
    mine = Receipt(model=MODEL, client=client.peer_id, server=server_a.peer_id, session="c7" * 12, seq=1, tokens=5,
                   blocks=1, started=now, issued=now)
    signed = issue_receipt(client.identity, mine)
    inflated = msgspec.structs.replace(mine, tokens=10**6)
    forged = encode_signed(msgspec.structs.replace(signed, body=msgspec.msgpack.encode(inflated)))
    for_b = issue_receipt(client.identity, msgspec.structs.replace(mine, server=server_b.peer_id))
    replies = _raw(runner, client, server_a.peer_id, [
        encode_receipts_message(Hand(receipts=[encode_signed(signed), forged, encode_signed(for_b)])),
        encode_receipts_message(Hand(receipts=[encode_signed(signed)])),  # the same receipt again
        b"\x93garbage",
        encode_receipts_message(Hand(receipts=[b"not a receipt"])),
    ])
    first, again, garbage, junk = replies
    assert isinstance(first, Taken) and first.counted == 1 and len(first.refused) == 2
    assert "signature" in first.refused[0] and "not this one" in first.refused[1]
    assert isinstance(again, Taken) and again.counted == 0 and again.refused == ["0: replay"]
    assert isinstance(garbage, ReceiptsError)
    assert isinstance(junk, Taken) and junk.counted == 0 and "malformed" in junk.refused[0]
    # the server cannot hand in receipts it signed for a client's name: it is not that client
    other = _raw(runner, server_b, server_a.peer_id, [encode_receipts_message(Hand(receipts=[encode_signed(signed)]))])
    assert isinstance(other[0], Taken) and "only the receipts it signed" in other[0].refused[0]


def test_a_servers_credit_is_learnt_from_the_receipts_it_shows(peers):
    runner, (_server_a, server_b, client), (desk_a, desk_b) = peers

    async def credit_of_b() -> int:
        desk_a.credit(server_b.peer_id)  # starts learning
        for _ in range(100):
            await asyncio.sleep(0.1)
            if server_b.peer_id not in desk_a._learning:
                break
        return desk_a.credit(server_b.peer_id)

    served_by_b = sum(r.work for r in desk_b.store.receipts() if r.server == server_b.peer_id)
    assert served_by_b > 0
    assert runner.run(credit_of_b(), 60) == served_by_b
    assert desk_a.credit(client.peer_id) <= -5  # the client used server a and serves nothing
