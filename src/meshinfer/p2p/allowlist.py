"""Private swarms by an owner-signed allow-list of peer ids (instead of a shared swarm key).

Contract: the file format and its checks; no network, no hivemind. An owner (any peer identity) signs the list of
peer ids it admits; every member starts with ``--swarm-allow FILE`` and then admits, on every stream (both planes)
and every DHT RPC (``dhtauth.AllowListAuthorizer``), only the owner and the listed peers, each authenticated by its
own key (libp2p's and the direct plane's handshakes, RSA signatures on DHT RPCs): nothing is shared, so a leaked
file admits nobody new. The file is one line ``meshinfer-swarm-allow/1 <base64 of msgpack [owner public key,
issued unix time, peer ids, RSA-PSS signature by the owner over the rest]>``; a file that does not verify, or lists
more than ``MAX_ALLOWED`` peers, is a one-line ``ConfigError`` naming ``--swarm-allow``. Records are not sealed in
this mode (members simply never answer or store for others). To add a member the owner signs a new list and every
member restarts with it.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final

import msgspec

from meshinfer.errors import ConfigError
from meshinfer.p2p.identity import MAX_PUBLIC_KEY_BYTES, Identity, peer_id_of_public_key, verify_signature

ALLOW_HEADER: Final = "meshinfer-swarm-allow/1"
MAX_ALLOWED: Final = 4096
_DOMAIN: Final = b"meshinfer-swarm-allow/1"
_MAX_FILE_BYTES: Final = 1 << 20


class _Signed(msgspec.Struct, frozen=True, array_like=True):
    owner_key: Annotated[bytes, msgspec.Meta(max_length=MAX_PUBLIC_KEY_BYTES)]
    issued: float
    peers: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=128)]],
                     msgspec.Meta(max_length=MAX_ALLOWED)]
    signature: Annotated[bytes, msgspec.Meta(max_length=1024)]


_decoder = msgspec.msgpack.Decoder(_Signed)


def _signed_bytes(owner_key: bytes, issued: float, peers: list[str]) -> bytes:
    return msgspec.msgpack.encode((_DOMAIN, owner_key, float(issued), peers))


@dataclass(frozen=True)
class AllowList:
    """A verified allow-list: its owner's peer id and the peers admitted (the owner always is)."""

    owner: str
    peers: frozenset[str]
    issued: float

    def admits(self, peer_id: str) -> bool:
        return peer_id == self.owner or peer_id in self.peers

    @property
    def label(self) -> str:
        """The swarm's public name (LAN adverts): its owner's peer id."""
        return self.owner

    def refusal(self, peer_id: str) -> str:
        """Why ``peer_id`` is refused ("" when it is admitted)."""
        if self.admits(peer_id):
            return ""
        return f"this swarm is private: its owner {self.owner[:16]} has not listed peer {peer_id} (--swarm-allow)"


def make_allow_line(owner: Identity, peers: list[str], issued: float | None = None) -> str:
    """The one line of an allow-list file signed by ``owner`` admitting ``peers``."""
    listed = sorted(set(peers))
    if len(listed) > MAX_ALLOWED:
        raise ConfigError(f"an allow-list holds at most {MAX_ALLOWED} peers, got {len(listed)}")
    stamp = time.time() if issued is None else issued
    signature = owner.sign(_signed_bytes(owner.public_key, stamp, listed))
    data = msgspec.msgpack.encode(_Signed(owner.public_key, stamp, listed, signature))
    return f"{ALLOW_HEADER} {base64.b64encode(data).decode()}"


def parse_allow_line(text: str, where: str = "--swarm-allow") -> AllowList:
    parts = text.strip().split()
    if len(parts) != 2 or parts[0] != ALLOW_HEADER:
        raise ConfigError(f"{where}: not an allow-list file (expected '{ALLOW_HEADER} <base64>'); make one with "
                          "`meshinfer swarm-key allow`")
    try:
        signed = _decoder.decode(base64.b64decode(parts[1], validate=True))
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise ConfigError(f"{where}: the allow-list is malformed") from None
    try:
        owner = peer_id_of_public_key(signed.owner_key)
    except Exception:
        raise ConfigError(f"{where}: the owner's key is unusable") from None
    if not verify_signature(signed.owner_key, _signed_bytes(signed.owner_key, signed.issued, signed.peers),
                            signed.signature):
        raise ConfigError(f"{where}: the owner's signature does not verify (the list was altered)")
    return AllowList(owner, frozenset(signed.peers), signed.issued)


def load_allow_list(path: str | os.PathLike[str]) -> AllowList:
    p = Path(path)
    try:
        info = p.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_FILE_BYTES:
            raise ConfigError(f"--swarm-allow {p}: not an allow-list file")
        text = p.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(f"--swarm-allow {p}: no such file (its owner makes it with `meshinfer swarm-key allow`)") \
            from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--swarm-allow {p}: cannot read it ({type(err).__name__})") from None
    return parse_allow_line(text, f"--swarm-allow {p}")
