"""Receipts: signed by clients with real peer keys, verified by anyone; tampered, self-issued and replayed ones fail."""

from __future__ import annotations

import random

import msgspec
import pytest

from meshinfer.errors import UsageError
from meshinfer.ledger.book import Book, balances
from meshinfer.ledger.receipts import ReceiptError, issue_receipt, next_receipt, verify_receipt
from meshinfer.ledger.store import ReceiptStore
from meshinfer.p2p.identity import Identity
from meshinfer.wire.receipts import Receipt, SignedReceipt, decode_signed, encode_signed, signed_bytes

MODEL = "0123456789abcdef0123456789abcdef"
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def peers() -> list[Identity]:
    return [Identity.generate() for _ in range(4)]


def receipt(client: Identity, server: Identity, *, session: str = "a" * 32, seq: int = 1, tokens: int = 10,
            blocks: int = 4) -> Receipt:
    return Receipt(model=MODEL, client=client.peer_id, server=server.peer_id, session=session, seq=seq,
                   tokens=tokens, blocks=blocks, started=NOW - 10, issued=NOW)


def test_a_signed_receipt_verifies_and_survives_the_wire(peers):
    alice, bob = peers[:2]
    signed = issue_receipt(alice, receipt(alice, bob))
    again = decode_signed(encode_signed(signed))
    got = verify_receipt(again, now=NOW)
    assert got == receipt(alice, bob) and got.work == 40


def test_a_tampered_receipt_is_rejected(peers):
    alice, bob = peers[:2]
    signed = issue_receipt(alice, receipt(alice, bob, tokens=10))
    inflated = msgspec.msgpack.encode(msgspec.structs.replace(receipt(alice, bob), tokens=10_000))
    with pytest.raises(ReceiptError, match="signature"):
        verify_receipt(SignedReceipt(inflated, signed.public_key, signed.signature), now=NOW)
    flipped = bytearray(signed.signature)
    flipped[7] ^= 1
    with pytest.raises(ReceiptError, match="signature"):
        verify_receipt(SignedReceipt(signed.body, signed.public_key, bytes(flipped)), now=NOW)


def test_a_server_cannot_mint_a_receipt_under_a_client_name(peers):
    alice, bob = peers[:2]
    # bob (the server) signs a receipt that names alice as its client: alice's key is not his
    forged = receipt(alice, bob)
    body = msgspec.msgpack.encode(forged)
    with pytest.raises(ReceiptError, match="another peer's key"):
        verify_receipt(SignedReceipt(body, bob.public_key, bob.sign(signed_bytes(body))), now=NOW)
    with pytest.raises(UsageError):
        issue_receipt(bob, forged)


def test_a_self_issued_receipt_is_rejected(peers):
    bob = peers[1]
    body = msgspec.msgpack.encode(receipt(bob, bob))
    with pytest.raises(ReceiptError, match="self-issued"):
        verify_receipt(SignedReceipt(body, bob.public_key, bob.sign(signed_bytes(body))), now=NOW)
    with pytest.raises(UsageError):
        issue_receipt(bob, receipt(bob, bob))


def test_receipts_from_the_future_and_malformed_bodies_are_rejected(peers):
    alice, bob = peers[:2]
    late = msgspec.structs.replace(receipt(alice, bob), issued=NOW + 3600)
    with pytest.raises(ReceiptError, match="future"):
        verify_receipt(issue_receipt(alice, late), now=NOW)
    body = msgspec.msgpack.encode({"model": "x"})
    with pytest.raises(ReceiptError, match="malformed"):
        verify_receipt(SignedReceipt(body, alice.public_key, alice.sign(signed_bytes(body))), now=NOW)


def test_a_book_keeps_the_newest_receipt_of_a_session_and_refuses_replays(peers):
    alice, bob = peers[:2]
    first = receipt(alice, bob, seq=1, tokens=10)
    second = next_receipt(first, tokens=25, issued=NOW + 1)
    book = Book()
    assert book.offer(first) == "new"
    assert book.offer(first) == "replay"
    assert book.offer(second) == "newer"
    assert book.offer(first) == "replay"  # the older one shown after the newer one
    assert book.offer(msgspec.structs.replace(second, seq=3, tokens=5)) == "shrunk"
    assert book.offer(msgspec.structs.replace(second, seq=3, blocks=8)) == "changed"
    assert len(book) == 1 and book.balances()[bob.peer_id].served == 25 * 4


def test_balances_from_two_independent_peers_agree(peers, tmp_path):
    a, b, c, d = peers
    receipts: list[Receipt] = []
    for i, (client, server) in enumerate([(a, b), (a, c), (b, c), (c, d), (d, b), (a, b)]):
        r = receipt(client, server, session=f"{i:032x}", tokens=5 + i, blocks=1 + i % 3)
        receipts += [r, next_receipt(r, tokens=r.tokens * 3, issued=NOW + 1)]
    signed = {r: issue_receipt(r_client, r) for r, r_client in
              ((r, next(p for p in peers if p.peer_id == r.client)) for r in receipts)}
    shuffled = receipts[:]
    random.Random(3).shuffle(shuffled)
    one = Book(receipts).balances()
    # the second peer learns them in another order, through a server's SQLite store and the wire
    store = ReceiptStore(tmp_path / "receipts.sqlite")
    for r in shuffled:
        store.put(signed[r], r)
    store.close()
    reopened = ReceiptStore(tmp_path / "receipts.sqlite")
    shown = [verify_receipt(decode_signed(blob), now=NOW) for blob in reopened.signed_receipts()]
    two = balances(Book(shown).receipts())
    assert one == two
    assert sum(x.served for x in one.values()) == sum(x.used for x in one.values())
    # a's usage: sessions 0, 1, 5 at their newest receipts
    assert one[a.peer_id].used == sum((5 + i) * 3 * (1 + i % 3) for i in (0, 1, 5))
    assert len(reopened) == 6


def test_a_full_store_refuses_new_sessions_but_updates_held_ones(peers, tmp_path):
    alice, bob = peers[:2]
    store = ReceiptStore(tmp_path / "r.sqlite", max_rows=1)
    first = receipt(alice, bob, session="1" * 32)
    assert store.put(issue_receipt(alice, first), first) == "new"
    other = receipt(alice, bob, session="2" * 32)
    assert store.put(issue_receipt(alice, other), other) == "full"
    newer = next_receipt(first, tokens=99, issued=NOW)
    assert store.put(issue_receipt(alice, newer), newer) == "newer"
    assert store.put(issue_receipt(alice, newer), newer) == "replay"
    assert [r.tokens for r in store.receipts()] == [99]


def test_the_credits_document_counts_receipts_only_and_labels_the_rate(peers):
    from meshinfer.ledger.report import credits_doc

    a, b = peers[:2]
    old = msgspec.structs.replace(receipt(a, b, session="1" * 32, tokens=100, blocks=2), issued=NOW - 7200)
    new = receipt(a, b, session="2" * 32, tokens=50, blocks=2)
    doc = credits_doc([old, new], {b.peer_id: 2, "12D3KooWdead": "timed out"}, {b.peer_id: "bob"}, NOW)
    rows = {p["peer_id"]: p for p in doc["peers"]}
    assert rows[b.peer_id]["served"] == 300 and rows[b.peer_id]["credit"] == 300 and rows[b.peer_id]["name"] == "bob"
    assert rows[a.peer_id]["used"] == 300 and rows[a.peer_id]["credit"] == -300
    assert rows[b.peer_id]["served_per_hour_measured"] == 100  # only the receipt of the last hour
    assert doc["peers"][0]["peer_id"] == b.peer_id and doc["asked"]["12D3KooWdead"] == "timed out"
    assert "measured" not in doc["source"] and "block-tokens" in doc["unit"]
