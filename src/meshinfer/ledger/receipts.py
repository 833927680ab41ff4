"""Signing and verifying usage receipts (issue 23): the only place a receipt meets a key.

Contract: ``issue_receipt(identity, receipt)`` signs a ``wire.receipts.Receipt`` as its client (refusing to sign
for another peer or for the signer itself); ``verify_receipt(signed, now=...)`` returns the ``Receipt`` a
``SignedReceipt`` carries only if ALL hold, else raises ``ReceiptError`` naming the first failure:

- the body decodes as a well-formed receipt (``wire.receipts.decode_receipt``);
- the public key hashes to the receipt's ``client`` peer id, and the signature over
  ``SIGNING_DOMAIN + body`` verifies with it (so only the client can issue a receipt for its own usage);
- ``client != server`` (a server cannot issue receipts to itself: it would sign as client of its own work);
- ``issued`` is at most ``max_skew_s`` ahead of ``now`` (no receipts from the future).

What this does NOT stop (documented in docs/architecture.md, section 16): a peer that makes up a second
identity and runs real sessions through itself with it, or two peers that sign receipts for each other (Sybil,
collusion: a receipt proves that *some* key asked for the work, not that a distinct person did), nor a freeloader
who starts over with a fresh key (its balance returns to 0). Replays and stale copies are ``book``'s job: a
receipt is cumulative per (client, server, session), and a book keeps only the newest ``seq``.
"""

from __future__ import annotations

import msgspec

from meshinfer.errors import MeshinferError, UsageError, WireError
from meshinfer.p2p.identity import Identity, peer_id_of_public_key, verify_signature
from meshinfer.wire.receipts import Receipt, SignedReceipt, decode_receipt, encode_receipt, signed_bytes

DEFAULT_MAX_SKEW_S = 300.0


class ReceiptError(MeshinferError):
    """A receipt that does not verify: the message names why (bad signature, self-issued, ...)."""


def issue_receipt(identity: Identity, receipt: Receipt) -> SignedReceipt:
    """``receipt`` signed by ``identity``, which must be its client and not its server."""
    if receipt.client != identity.peer_id:
        raise UsageError(f"a receipt for client {receipt.client} cannot be signed by peer {identity.peer_id}")
    if receipt.server == receipt.client:
        raise UsageError("a peer cannot issue a receipt for work it did itself")
    body = encode_receipt(receipt)
    return SignedReceipt(body, identity.public_key, identity.sign(signed_bytes(body)))


def next_receipt(previous: Receipt, *, tokens: int, issued: float) -> Receipt:
    """The receipt that supersedes ``previous`` once the session has run ``tokens`` tokens in total."""
    if tokens < previous.tokens:
        raise UsageError(f"a session's tokens only grow ({previous.tokens} -> {tokens})")
    return msgspec.structs.replace(previous, seq=previous.seq + 1, tokens=tokens, issued=max(issued, previous.issued))


def verify_receipt(signed: SignedReceipt, *, now: float, max_skew_s: float = DEFAULT_MAX_SKEW_S) -> Receipt:
    """The receipt ``signed`` carries, once every check of the module docstring passed."""
    try:
        receipt = decode_receipt(signed.body)
    except WireError as exc:
        raise ReceiptError(str(exc)) from None
    if peer_id_of_public_key(signed.public_key) != receipt.client:
        raise ReceiptError(f"receipt of client {receipt.client} carries another peer's key")
    if not verify_signature(signed.public_key, signed_bytes(signed.body), signed.signature):
        raise ReceiptError(f"receipt of client {receipt.client}: the signature does not verify")
    if receipt.client == receipt.server:
        raise ReceiptError(f"self-issued receipt: {receipt.client} is both client and server")
    if receipt.issued > now + max_skew_s:
        raise ReceiptError(f"receipt issued {receipt.issued - now:.0f} s in the future (limit {max_skew_s:.0f} s)")
    return receipt
