"""Private swarms: the swarm key file, sealed DHT values and membership proofs on streams.

Contract: everything a member needs to recognise another member, built on ``cryptography`` primitives only
(HKDF-SHA256, HMAC-SHA256, ChaCha20-Poly1305); no hand-rolled crypto, no network, no hivemind, no torch.

- **Key file** (``new_key_line`` / ``load_swarm_key``): one text line ``meshinfer-swarm-key/1 <base64 of 32 random
  bytes>``. A missing, unreadable or malformed file is a ``ConfigError`` naming ``--swarm-key``; a file others
  can read is used with a warning (it is a shared secret: anyone who reads it is a member).
- **Derived keys** (HKDF-SHA256 of the secret, one ``info`` each): a public 8-byte ``key_id`` (says which swarm a
  peer believes it is in, reveals nothing of the secret), a record key (AEAD), a DHT-key key (HMAC) and a stream
  key (HMAC). A leak of one derived key does not give the others.
- **Sealed DHT values** (``seal`` / ``unseal``): ``b"MSV1" | key_id | 12-byte random nonce |
  ChaCha20-Poly1305(value, aad = domain | DHT key | subkey)``. Outsiders can neither read a value nor make one a
  member accepts; a value moved to another key or subkey does not open. ``dht_key`` hides DHT key names
  (``model:<id>`` etc.) behind an HMAC so outsiders cannot look up or guess what a swarm serves.
- **Stream proofs** (``preamble`` / ``check_preamble``, ``direct_proof``): an HMAC by the stream key over a context,
  the protocol, both peer ids (the opener's and the listener's, each authenticated by the transport) and a fresh
  nonce, so a proof is useless to anyone but the peer that made it, on any other stream or peer. A libp2p stream of
  a private swarm starts with a 57-byte preamble (``PREAMBLE_MAGIC`` | key_id | nonce | mac) before its frames;
  its first byte is never a frame's (``0xE7``), so a listener tells a member from an outsider by one byte. The
  direct plane puts ``key_id`` in the first hello and a proof over both hello nonces in the next two. DHT RPCs carry
  ``rpc_mac`` over the whole request (with its time and nonce) and over the response (with the request's nonce).
- **Verdicts** (``refusal``): the one-line reason each side gives when keys differ (no key, another key, or a
  member reaching a public peer), identical on both planes and at join.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshinfer.errors import ConfigError

log = logging.getLogger(__name__)

KEY_HEADER: Final = "meshinfer-swarm-key/1"
SECRET_BYTES: Final = 32
KEY_ID_BYTES: Final = 8
PUBLIC_KEY_ID: Final = b"\x00" * KEY_ID_BYTES
"""The key id a peer without a swarm key sends where one is expected (a public swarm)."""
ALLOW_KEY_ID: Final = b"\xff" * KEY_ID_BYTES
"""The key id a peer of an allow-list swarm (``meshinfer.p2p.allowlist``) sends in a join check."""
NONCE_BYTES: Final = 16
MAC_BYTES: Final = 32
AEAD_NONCE_BYTES: Final = 12
SEAL_MAGIC: Final = b"MSV1"
SEAL_OVERHEAD: Final = len(SEAL_MAGIC) + KEY_ID_BYTES + AEAD_NONCE_BYTES + 16
PREAMBLE_MAGIC: Final = 0x5A
"""First byte of a member's libp2p stream (a frame starts with 0xE7, so one byte tells them apart)."""
PREAMBLE_BYTES: Final = 1 + KEY_ID_BYTES + NONCE_BYTES + MAC_BYTES  # 57
MAX_KEY_FILE_BYTES: Final = 4096
PRIVATE_HINT: Final = "this swarm is private"

_SEAL_DOMAIN: Final = b"meshinfer-swarm-record/1"
_STREAM_DOMAIN: Final = b"meshinfer-swarm-stream/1"
_DIRECT_DOMAIN: Final = b"meshinfer-swarm-direct/1"
_RPC_DOMAIN: Final = b"meshinfer-swarm-dht-rpc/1"


def _derive(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def _mac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod=sha256)
    for part in parts:  # length-prefixed: no two part lists give the same bytes
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


@dataclass(frozen=True)
class SwarmKey:
    """The keys derived from one swarm secret (never holds or shows the secret itself in ``repr``)."""

    key_id: bytes
    _record_key: bytes = field(repr=False)
    _name_key: bytes = field(repr=False)
    _stream_key: bytes = field(repr=False)

    @classmethod
    def from_secret(cls, secret: bytes) -> SwarmKey:
        if len(secret) != SECRET_BYTES:
            raise ConfigError(f"a swarm key is {SECRET_BYTES} bytes, got {len(secret)}")
        key_id = _derive(secret, b"meshinfer swarm key id", KEY_ID_BYTES)
        if key_id in (PUBLIC_KEY_ID, ALLOW_KEY_ID):  # 2^-64: never in practice, but the public id must stay unambiguous
            raise ConfigError("unusable swarm key: make another with `meshinfer swarm-key new`")
        return cls(key_id, _derive(secret, b"meshinfer swarm records"), _derive(secret, b"meshinfer swarm dht keys"),
                   _derive(secret, b"meshinfer swarm streams"))

    @property
    def label(self) -> str:
        """A short public name of this swarm (the key id in hex): safe to log and advertise."""
        return self.key_id.hex()

    # --- DHT ------------------------------------------------------------------------------------

    def dht_key(self, key: str) -> str:
        """The DHT key a member stores ``key`` under (outsiders cannot compute it)."""
        return "swarm:" + _mac(self._name_key, key.encode()).hex()[:40]

    def seal(self, value: bytes, key: bytes, subkey: bytes) -> bytes:
        nonce = secrets.token_bytes(AEAD_NONCE_BYTES)
        sealed = ChaCha20Poly1305(self._record_key).encrypt(nonce, value, _aad(key, subkey))
        return SEAL_MAGIC + self.key_id + nonce + sealed

    def unseal(self, value: bytes, key: bytes, subkey: bytes) -> bytes | None:
        """The plaintext of a value this swarm sealed for ``key``/``subkey``; None for anything else."""
        head = len(SEAL_MAGIC) + KEY_ID_BYTES
        if len(value) < SEAL_OVERHEAD or value[:len(SEAL_MAGIC)] != SEAL_MAGIC or value[len(SEAL_MAGIC):head] != \
                self.key_id:
            return None
        nonce = value[head:head + AEAD_NONCE_BYTES]
        try:
            return ChaCha20Poly1305(self._record_key).decrypt(nonce, value[head + AEAD_NONCE_BYTES:],
                                                              _aad(key, subkey))
        except InvalidTag:
            return None

    # --- streams --------------------------------------------------------------------------------

    def preamble(self, protocol: str, opener: str, listener: str) -> bytes:
        """What a member writes first on a libp2p stream it opens to ``listener``."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        mac = _mac(self._stream_key, _STREAM_DOMAIN, protocol.encode(), opener.encode(), listener.encode(), nonce)
        return bytes([PREAMBLE_MAGIC]) + self.key_id + nonce + mac

    def check_preamble(self, data: bytes, protocol: str, opener: str, listener: str) -> bool:
        if len(data) != PREAMBLE_BYTES or data[0] != PREAMBLE_MAGIC or data[1:1 + KEY_ID_BYTES] != self.key_id:
            return False
        nonce = data[1 + KEY_ID_BYTES:1 + KEY_ID_BYTES + NONCE_BYTES]
        mac = _mac(self._stream_key, _STREAM_DOMAIN, protocol.encode(), opener.encode(), listener.encode(), nonce)
        return hmac.compare_digest(mac, data[-MAC_BYTES:])

    def rpc_mac(self, role: bytes, message: bytes) -> bytes:
        """An HMAC over one DHT RPC (``role``: request or response; ``message``: its bytes with the MAC blank)."""
        return _mac(self._stream_key, _RPC_DOMAIN, role, message)

    def check_rpc_mac(self, mac: bytes, role: bytes, message: bytes) -> bool:
        return hmac.compare_digest(self.rpc_mac(role, message), mac)

    def direct_proof(self, binding: bytes, dialer: str, listener: str) -> bytes:
        """A direct-plane proof over the hello ``binding`` (role, both nonces, certificate) and both peer ids."""
        return _mac(self._stream_key, _DIRECT_DOMAIN, binding, dialer.encode(), listener.encode())

    def check_direct_proof(self, proof: bytes, binding: bytes, dialer: str, listener: str) -> bool:
        return hmac.compare_digest(self.direct_proof(binding, dialer, listener), proof)


def _aad(key: bytes, subkey: bytes) -> bytes:
    return b"|".join((_SEAL_DOMAIN, len(key).to_bytes(4, "big") + key, subkey))


def key_id_of(key: SwarmKey | None) -> bytes:
    return PUBLIC_KEY_ID if key is None else key.key_id


def preamble_key_id(data: bytes) -> bytes:
    """The key id a preamble claims (``PUBLIC_KEY_ID`` when ``data`` is too short to hold one)."""
    return data[1:1 + KEY_ID_BYTES] if len(data) >= 1 + KEY_ID_BYTES else PUBLIC_KEY_ID


def refusal(own: SwarmKey | None, claimed: bytes) -> str:
    """Why a peer whose swarm key id is ``own`` refuses one that claims ``claimed`` ("" when they match)."""
    if own is not None and claimed == own.key_id:
        return ""
    if own is None:
        if claimed == PUBLIC_KEY_ID:
            return ""
        flag = "--swarm-allow" if claimed == ALLOW_KEY_ID else "--swarm-key"
        return f"this peer is in a public swarm (no swarm key): drop {flag} to join it"
    if claimed in (PUBLIC_KEY_ID, ALLOW_KEY_ID):
        return f"{PRIVATE_HINT}: join it with --swarm-key FILE (its key file)"
    return f"{PRIVATE_HINT}: your --swarm-key is not its key"


# --- the key file ---------------------------------------------------------------------------------

def new_key_line() -> str:
    """A new swarm key as the one line its file holds (without the newline)."""
    return f"{KEY_HEADER} {base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()}"


def parse_key_line(text: str, where: str = "--swarm-key") -> SwarmKey:
    parts = text.strip().split()
    if len(parts) != 2 or parts[0] != KEY_HEADER:
        got = parts[0][:40] if parts else "an empty file"
        raise ConfigError(f"{where}: not a swarm key file (expected '{KEY_HEADER} <base64>', got {got!r}); "
                          "make one with `meshinfer swarm-key new --out FILE`")
    try:
        secret = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: the key is not valid base64; make one with `meshinfer swarm-key new`") from None
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"{where}: the key holds {len(secret)} bytes, expected {SECRET_BYTES}")
    return SwarmKey.from_secret(secret)


def load_swarm_key(path: str | os.PathLike[str]) -> SwarmKey:
    """Read a swarm key file; ``ConfigError`` (one line naming ``--swarm-key``) when it is unusable."""
    p = Path(path)
    try:
        info = p.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"--swarm-key {p}: not a regular file")
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"--swarm-key {p}: {info.st_size} bytes is not a swarm key file")
        text = p.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(f"--swarm-key {p}: no such file (make one with `meshinfer swarm-key new --out {p}`)") \
            from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--swarm-key {p}: cannot read it ({type(err).__name__})") from None
    if info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("swarm key file %s is readable by other users (mode %o): anyone who reads it can join the "
                    "swarm; chmod 600 it", p, stat.S_IMODE(info.st_mode))
    return parse_key_line(text, f"--swarm-key {p}")


def swarm_label(path: str | None, allow_path: str | None = None) -> str:
    """The swarm name LAN adverts carry for a ``--swarm-key`` file (its public id) or a ``--swarm-allow`` file (its
    owner's peer id); "" without either: public."""
    if allow_path:
        from meshinfer.p2p.allowlist import load_allow_list  # the allow-list module imports identity (RSA)

        return load_allow_list(allow_path).label
    return load_swarm_key(path).label if path else ""
