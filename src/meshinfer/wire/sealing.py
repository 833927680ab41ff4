"""The cryptography of sealed requests (issue 22): HPKE to a full node's key, sealed token frames back, replays.

Contract: pure (no I/O, no torch, no network); every primitive comes from ``cryptography`` (no hand-rolled
crypto). A request is sealed with RFC 9180 HPKE, base mode, suite DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 +
ChaCha20-Poly1305 (``cryptography.hazmat.primitives.hpke``), to the server's X25519 ``SealingKey`` (its public half
announced in its signed ``ServerRecord.sealing_key``), with a fresh ephemeral client key per request (HPKE's
``enc``, the first ``ENC_BYTES`` of the blob). The HPKE ``info`` is the handshake transcript (``transcript``: the
protocol, the server's peer id, the model id and the server's public key, hashed): it enters the key schedule, so a
blob opens only for that server, model and key; ``enc`` is bound by the KEM itself. The sealed plaintext is a fresh
32-byte response secret, then the caller's payload, padded to a multiple of ``REQUEST_PAD`` bytes (sizes reveal
the prompt length only to that granularity).

Responses: ``ResponseSealer`` / ``ResponseOpener`` share a ChaCha20-Poly1305 key derived by HKDF-SHA256 from the
response secret (salt: ``enc``; info: a label and the transcript), so only the holder of the ephemeral request
(the client) and the server that opened it can read or forge them. Frame ``i`` (from 0) is ``flag || ciphertext``
with nonce = ``i`` and associated data = transcript || ``i`` || flag (``flag`` 1 marks the last frame): a frame
dropped, reordered, replayed, truncated, cut off before the last or altered fails to open (``SealingError``), and
nothing opens after the last. Payloads are padded to a multiple of ``FRAME_PAD`` bytes.

``ReplayGuard`` (pure, clock injected): the server's bounded, expiring memory of the request ids and ephemeral
keys it has opened: a request whose timestamp is more than ``window_s`` from the server's clock, or whose id or
``enc`` it has seen, is refused (``ReplayError``); an entry is forgotten once its timestamp has left the window (a
replay of it is refused by the window from then on); when ``max_entries`` are held new requests are refused
(``ReplayError``) rather than forgetting entries still in the window.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshinfer.errors import WireError

PROTOCOL_LABEL: Final = b"meshinfer/sealed/1"
KEY_BYTES: Final = 32
"""An X25519 public key, a response secret, a response key."""
ENC_BYTES: Final = 32
"""HPKE's ``enc`` for X25519: the ephemeral public key that starts every sealed request."""
TAG_BYTES: Final = 16
REQUEST_PAD: Final = 1024
FRAME_PAD: Final = 64
LAST: Final = 1
"""The flag byte of a stream's last frame (0: more follow)."""

_SUITE: Final = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
_RESPONSE_LABEL: Final = b"meshinfer/sealed/1 response key"


class SealingError(WireError):
    """A sealed request or frame failed to open: tampered, truncated, reordered, replayed within its stream, or
    sealed for another server, model or key."""


class ReplayError(WireError):
    """A sealed request was refused as a replay (id or ephemeral key seen, or a timestamp outside the window)."""


@dataclass(frozen=True)
class SealingKey:
    """A server's X25519 key for sealed requests (fresh per server process; its public half is announced)."""

    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> SealingKey:
        return cls(X25519PrivateKey.generate())

    @property
    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes_raw()


def transcript(server_peer_id: str, model_id: str, server_key: bytes) -> bytes:
    """The handshake transcript (32 bytes): what a sealed exchange is bound to."""
    h = hashlib.sha256(PROTOCOL_LABEL)
    for part in (server_peer_id.encode(), model_id.encode(), server_key):
        h.update(struct.pack(">I", len(part)))
        h.update(part)
    return h.digest()


def _pad(payload: bytes, unit: int) -> bytes:
    body = struct.pack(">I", len(payload)) + payload
    return body + bytes(-len(body) % unit)


def _unpad(padded: bytes) -> bytes:
    if len(padded) < 4:
        raise SealingError("sealed payload too short")
    (size,) = struct.unpack_from(">I", padded)
    if size > len(padded) - 4 or any(padded[4 + size:]):
        raise SealingError("sealed payload has a bad length or padding")
    return padded[4:4 + size]


def seal_request(payload: bytes, server_key: bytes, context: bytes) -> tuple[bytes, bytes]:
    """``(blob, response_secret)``: ``payload`` sealed to the X25519 public key ``server_key`` under ``context``
    (a ``transcript``), and the fresh response secret sealed with it (``response_key`` derives from it)."""
    if len(server_key) != KEY_BYTES:
        raise SealingError(f"a sealing key has {KEY_BYTES} bytes, got {len(server_key)}")
    secret = os.urandom(KEY_BYTES)
    public = X25519PublicKey.from_public_bytes(server_key)
    return _SUITE.encrypt(_pad(secret + payload, REQUEST_PAD), public, info=context), secret


def open_request(blob: bytes, key: SealingKey, context: bytes) -> tuple[bytes, bytes]:
    """``(payload, response_secret)`` of a ``seal_request`` blob; ``SealingError`` when it does not open."""
    if len(blob) < ENC_BYTES + TAG_BYTES:
        raise SealingError("sealed request too short")
    try:
        plain = _SUITE.decrypt(blob, key.private, info=context)
    except (InvalidTag, ValueError):
        raise SealingError("sealed request failed authentication (tampered, or sealed for another server, model "
                           "or key)") from None
    body = _unpad(plain)
    if len(body) < KEY_BYTES:
        raise SealingError("sealed request too short")
    return body[KEY_BYTES:], body[:KEY_BYTES]


def response_key(secret: bytes, enc: bytes, context: bytes) -> bytes:
    """The response stream's ChaCha20-Poly1305 key: HKDF-SHA256(secret, salt=enc, info=label || context)."""
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=enc, info=_RESPONSE_LABEL + context).derive(secret)


def _nonce(seq: int) -> bytes:
    return seq.to_bytes(12, "big")


def _aad(context: bytes, seq: int, flag: int) -> bytes:
    return context + seq.to_bytes(8, "big") + bytes([flag])


class ResponseSealer:
    """The server's side of one response stream: frames numbered from 0, the last one flagged."""

    def __init__(self, key: bytes, context: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._context = context
        self._seq = 0
        self._done = False

    def seal(self, payload: bytes, *, last: bool = False) -> bytes:
        if self._done:
            raise SealingError("the response stream already ended")
        flag = LAST if last else 0
        frame = bytes([flag]) + self._aead.encrypt(_nonce(self._seq), _pad(payload, FRAME_PAD),
                                                   _aad(self._context, self._seq, flag))
        self._seq += 1
        self._done = last
        return frame


class ResponseOpener:
    """The client's side of one response stream: opens frames in order; ``done`` once the last one opened."""

    def __init__(self, key: bytes, context: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._context = context
        self._seq = 0
        self.done = False

    def open(self, frame: bytes) -> bytes:
        """The payload of the next frame; ``SealingError`` if it is not exactly the next frame of this stream."""
        if self.done:
            raise SealingError("a sealed frame arrived after the last one")
        if len(frame) < 1 + TAG_BYTES or frame[0] not in (0, LAST):
            raise SealingError("malformed sealed frame")
        flag = frame[0]
        try:
            plain = self._aead.decrypt(_nonce(self._seq), frame[1:], _aad(self._context, self._seq, flag))
        except InvalidTag:
            raise SealingError(f"sealed frame {self._seq} failed authentication (tampered, dropped, reordered or "
                               "replayed)") from None
        self._seq += 1
        self.done = flag == LAST
        return _unpad(plain)


def same_key(a: bytes, b: bytes) -> bool:
    """Constant-time equality of two keys."""
    return hmac.compare_digest(a, b)


@dataclass
class ReplayGuard:
    """Request ids and ephemeral keys seen within the timestamp window (see the module docstring)."""

    window_s: float = 300.0
    max_entries: int = 65536
    clock: Callable[[], float] = time.time
    _seen: dict[bytes, float] = field(default_factory=dict[bytes, float])
    """Request id or enc -> when it may be forgotten."""
    _expiry: list[tuple[float, bytes]] = field(default_factory=list[tuple[float, bytes]])
    """The same entries as a heap, soonest forgotten first."""

    def check(self, request_id: bytes, enc: bytes, timestamp: float) -> None:
        """Admit a request once: ``ReplayError`` for a timestamp outside the window, a seen id or ``enc``, or a
        full memory; else remember both until the timestamp leaves the window."""
        now = self.clock()
        while self._expiry and self._expiry[0][0] <= now:
            del self._seen[heapq.heappop(self._expiry)[1]]
        if not abs(now - timestamp) <= self.window_s:  # also refuses nan
            raise ReplayError(f"sealed request timestamp is {timestamp - now:+.0f} s from this server's clock "
                              f"(accepted: +-{self.window_s:g} s)")
        if request_id in self._seen or enc in self._seen:
            raise ReplayError("sealed request refused: this request was already received (replay)")
        if len(self._seen) + 2 > self.max_entries:
            raise ReplayError(f"sealed request refused: {self.max_entries} recent requests remembered (limit); "
                              "try again shortly")
        forget = max(now, timestamp) + self.window_s
        for item in (request_id, enc):
            self._seen[item] = forget
            heapq.heappush(self._expiry, (forget, item))

    def __len__(self) -> int:
        return len(self._seen)
