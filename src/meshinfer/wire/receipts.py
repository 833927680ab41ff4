"""Usage receipts on the wire: what a client signs for the work a server did for it (issue 23).

Contract: the schema only, as frozen msgspec Structs with their bounds in the schema, and the exact bytes a
signature covers. A ``Receipt`` says: client ``client`` had server ``server`` run ``blocks`` blocks of model
``model`` over ``tokens`` tokens in total, so far, in its hop session ``session`` (the client's random id of that
session); ``seq`` grows by one per receipt of that session, so a newer receipt of the same session supersedes the
older one (cumulative, never additive). A ``SignedReceipt`` carries the encoded receipt, the client's public key
(the libp2p protobuf encoding, whose hash is the client's peer id) and its signature over
``SIGNING_DOMAIN + body``. Signing and verifying are ``meshinfer.ledger``'s job; this module never sees a key.
The receipts protocol's messages (``Hand``/``Taken``, ``Show``/``Shown``) are a ``wire.codec`` instance of their
own. Pure: no I/O, no torch, no network, never pickles.

The unit of work is the **block-token**: one token through one transformer block (``tokens * blocks``). It is
what a server's compute and KV memory scale with, and it is the same for every server of a model, so receipts
of different spans add up.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec

from meshinfer.errors import WireError
from meshinfer.wire.codec import Codec, failure_code, mismatch
from meshinfer.wire.limits import MAX_MODEL_BLOCKS

RECEIPT_VERSION: Final = 1
SIGNING_DOMAIN: Final = b"meshinfer-receipt-v1\x00"
MAX_RECEIPT_TOKENS: Final = 1 << 32
"""Most tokens one session's receipt may claim (far beyond any context length times any retry count)."""
MAX_SIGNED_RECEIPT_BYTES: Final = 4096
"""A signed receipt is at most this many bytes encoded (an RSA-2048 key and signature are ~550 bytes)."""

_SESSION = re.compile(r"[0-9a-f]{16,64}")
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{20,128}")  # base58
_MODEL = re.compile(r"[0-9a-f]{32}")

PeerText = Annotated[str, msgspec.Meta(min_length=20, max_length=128)]
HexText = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Time = Annotated[float, msgspec.Meta(ge=0.0, le=1e11)]


class Receipt(msgspec.Struct, frozen=True):
    """The work one server did for one client in one hop session, so far (cumulative)."""

    model: HexText
    client: PeerText
    server: PeerText
    session: HexText
    seq: Annotated[int, msgspec.Meta(ge=1, le=2**53)]
    tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_RECEIPT_TOKENS)]
    blocks: Annotated[int, msgspec.Meta(ge=1, le=MAX_MODEL_BLOCKS)]
    started: Time
    """When the session opened (the client's clock, unix seconds)."""
    issued: Time
    """When the client signed this receipt (the client's clock, unix seconds)."""
    v: int = RECEIPT_VERSION

    @property
    def work(self) -> int:
        """Block-tokens: ``tokens * blocks``."""
        return self.tokens * self.blocks

    @property
    def key(self) -> tuple[str, str, str]:
        """What a newer receipt supersedes: (client, server, session)."""
        return (self.client, self.server, self.session)


class SignedReceipt(msgspec.Struct, frozen=True, array_like=True):
    """An encoded ``Receipt``, the client's public key and its signature over ``signed_bytes(body)``."""

    body: Annotated[bytes, msgspec.Meta(max_length=1024)]
    public_key: Annotated[bytes, msgspec.Meta(max_length=1024)]
    signature: Annotated[bytes, msgspec.Meta(max_length=1024)]


_receipt_encoder = msgspec.msgpack.Encoder()
_receipt_decoder = msgspec.msgpack.Decoder(Receipt)
_signed_decoder = msgspec.msgpack.Decoder(SignedReceipt)


def check_receipt(receipt: Receipt) -> Receipt:
    """``receipt`` if its text fields have their exact forms, else ``WireError`` naming the field."""
    if receipt.v != RECEIPT_VERSION:
        raise WireError(f"receipt version {receipt.v}, this peer reads {RECEIPT_VERSION}")
    if not _MODEL.fullmatch(receipt.model):
        raise WireError("malformed receipt: model is not a 32-hex-digit model id")
    if not _SESSION.fullmatch(receipt.session):
        raise WireError("malformed receipt: session is not 16..64 hex digits")
    for name, peer in (("client", receipt.client), ("server", receipt.server)):
        if not _PEER_ID.fullmatch(peer):
            raise WireError(f"malformed receipt: {name} is not a base58 peer id")
    if receipt.issued + 1.0 < receipt.started:
        raise WireError("malformed receipt: issued before the session started")
    return receipt


def encode_receipt(receipt: Receipt) -> bytes:
    return _receipt_encoder.encode(check_receipt(receipt))


def decode_receipt(body: bytes) -> Receipt:
    """Untrusted bytes -> a checked ``Receipt``; ``WireError`` on anything else."""
    try:
        return check_receipt(_receipt_decoder.decode(body))
    except WireError:
        raise
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, OverflowError) as exc:
        raise WireError(f"malformed receipt: {exc}") from None


def encode_signed(signed: SignedReceipt) -> bytes:
    return _receipt_encoder.encode(signed)


def decode_signed(data: bytes) -> SignedReceipt:
    """Untrusted bytes -> a ``SignedReceipt`` (not yet verified); ``WireError`` past the size bound or malformed."""
    if len(data) > MAX_SIGNED_RECEIPT_BYTES:
        raise WireError(f"signed receipt of {len(data)} bytes (limit {MAX_SIGNED_RECEIPT_BYTES})")
    try:
        return _signed_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, OverflowError) as exc:
        raise WireError(f"malformed signed receipt: {exc}") from None


def signed_bytes(body: bytes) -> bytes:
    """Exactly what the client's signature covers."""
    return SIGNING_DOMAIN + body


# ---- the receipts protocol (``/meshinfer/receipts/1``) -------------------------------------------------------
#
# A client hands the receipts of its sessions to the server they name; anyone may ask a server for the receipts
# it holds (to check a balance themselves), one stream, any number of requests in turn:
#
#     Hand(receipts)               -> Taken(counted, refused)   (each refusal: "<index>: <why>")
#     Show(after, limit)           -> Shown(receipts, more)     (ordered by (client, server, session))
#     anything wrong               -> ReceiptsError(code, message)  (the stream stays usable)

RECEIPTS_PROTOCOL: Final = "/meshinfer/receipts/1"
MAX_RECEIPTS_PER_MESSAGE: Final = 256

SignedBytes = Annotated[bytes, msgspec.Meta(max_length=MAX_SIGNED_RECEIPT_BYTES)]


class _Msg(msgspec.Struct, frozen=True, tag_field="type"):
    pass


class Hand(_Msg, frozen=True, tag="hand"):
    receipts: Annotated[list[SignedBytes], msgspec.Meta(max_length=MAX_RECEIPTS_PER_MESSAGE)]
    v: int = RECEIPT_VERSION


class Taken(_Msg, frozen=True, tag="taken"):
    counted: Annotated[int, msgspec.Meta(ge=0, le=MAX_RECEIPTS_PER_MESSAGE)]
    refused: Annotated[list[Annotated[str, msgspec.Meta(max_length=256)]],
                       msgspec.Meta(max_length=MAX_RECEIPTS_PER_MESSAGE)]
    v: int = RECEIPT_VERSION


class Show(_Msg, frozen=True, tag="show"):
    after: Annotated[list[Annotated[str, msgspec.Meta(max_length=128)]], msgspec.Meta(max_length=3)] = []
    """The (client, server, session) of the last receipt already seen; empty: from the start."""
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_RECEIPTS_PER_MESSAGE)] = MAX_RECEIPTS_PER_MESSAGE
    v: int = RECEIPT_VERSION


class Shown(_Msg, frozen=True, tag="shown"):
    receipts: Annotated[list[SignedBytes], msgspec.Meta(max_length=MAX_RECEIPTS_PER_MESSAGE)]
    more: bool
    v: int = RECEIPT_VERSION


class ReceiptsError(_Msg, frozen=True, tag="error"):
    code: Annotated[str, msgspec.Meta(max_length=64)]
    message: Annotated[str, msgspec.Meta(max_length=4096)]
    v: int = RECEIPT_VERSION


ReceiptsMessage = Hand | Taken | Show | Shown | ReceiptsError
RECEIPTS_MESSAGE_TYPES: Final = (Hand, Taken, Show, Shown, ReceiptsError)

_codec: Codec[ReceiptsMessage] = Codec(
    ReceiptsMessage, RECEIPTS_MESSAGE_TYPES, version=RECEIPT_VERSION, kind="receipts-protocol message",
    label="receipts message", version_error=mismatch("receipts ", RECEIPT_VERSION), probe_version=True,
    length_limits=True,
)


def encode_receipts_message(msg: ReceiptsMessage) -> bytes:
    return _codec.encode(msg)


def decode_receipts_message(data: bytes | memoryview) -> ReceiptsMessage:
    """Decode and validate one message; ``WireError`` (or a subclass) for anything malformed."""
    return _codec.decode(data)


def receipts_error_for(err: BaseException) -> ReceiptsError:
    return ReceiptsError(code=failure_code(err), message=(str(err) or type(err).__name__)[:4096])
