"""Peer identity: a persistent RSA key file, the libp2p peer id derived from it, and signatures.

Contract: the key file holds a libp2p-format private key (protobuf ``PrivateKey{Type=RSA, Data=DER}``,
exactly what ``p2pd -id`` reads); it is created on first use with mode 0600 and refused if others may
read it. ``Identity.peer_id`` is the base58 libp2p peer id (multihash sha2-256 of the protobuf
``PublicKey``), so it equals the id the daemon announces. ``Identity.sign`` and
``verify_signature`` (RSA-PSS, SHA-256) are what record signing uses; ``peer_id_of_public_key`` maps
a public key blob to its peer id. ``IdentityLock`` stops two processes on one machine from using the
same key at once. Errors are ``PeerIdentityError``. Knows nothing of streams, the DHT or hivemind's
daemon (it only borrows hivemind's generated protobuf classes for the key format).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# isort: split
from meshinfer.p2p import _hivemind_logging  # noqa: F401 - first: before hivemind is imported

# isort: split
from hivemind.proto import crypto_pb2

from meshinfer.errors import PeerIdentityError

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_SHA256 = hashes.SHA256()
_MULTIHASH_SHA256 = b"\x12\x20"
# crypto_pb2's messages are built from a descriptor at import, so the type checker sees none of its names.
_PublicKeyProto: Any = crypto_pb2.PublicKey  # pyright: ignore[reportAttributeAccessIssue]
_PrivateKeyProto: Any = crypto_pb2.PrivateKey  # pyright: ignore[reportAttributeAccessIssue]
_RSA: int = crypto_pb2.RSA  # pyright: ignore[reportAttributeAccessIssue]
RSA_BITS = 2048
MAX_PUBLIC_KEY_BYTES = 1024


def peer_id_of_public_key(public_key_proto: bytes) -> str:
    """The base58 libp2p peer id of a protobuf-encoded public key (RSA keys hash with sha2-256)."""
    return base58.b58encode(_MULTIHASH_SHA256 + hashlib.sha256(public_key_proto).digest()).decode()


def _public_key_proto(key: rsa.RSAPublicKey) -> bytes:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _PublicKeyProto(key_type=_RSA, data=der).SerializeToString()


@dataclass(frozen=True)
class Identity:
    """A peer's private key, its public key blob and peer id. ``path`` is None for ephemeral keys."""

    private_key: rsa.RSAPrivateKey = field(repr=False)
    public_key: bytes = field(repr=False)
    peer_id: str
    path: Path | None = None
    created: bool = False
    """True when ``load_or_create_identity`` just created the key (so it cannot be live elsewhere)."""

    @classmethod
    def generate(cls) -> Identity:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        public = _public_key_proto(key.public_key())
        return cls(key, public, peer_id_of_public_key(public))

    @classmethod
    def from_bytes(cls, data: bytes, path: Path | None = None) -> Identity:
        where = f" in {path}" if path else ""
        try:
            proto = _PrivateKeyProto.FromString(data)
            if proto.key_type != _RSA:
                raise PeerIdentityError(
                    f"unsupported key type {proto.key_type}{where}; meshinfer uses RSA keys"
                )
            key = serialization.load_der_private_key(proto.data, password=None)
        except PeerIdentityError:
            raise
        except Exception:
            raise PeerIdentityError(f"unreadable peer key{where}: not a libp2p RSA private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise PeerIdentityError(f"unreadable peer key{where}: not an RSA key")
        public = _public_key_proto(key.public_key())
        return cls(key, public, peer_id_of_public_key(public), path)

    def to_bytes(self) -> bytes:
        der = self.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return _PrivateKeyProto(key_type=_RSA, data=der).SerializeToString()

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, _PSS, _SHA256)


def verify_signature(public_key_proto: bytes, data: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid RSA-PSS/SHA-256 signature of ``data`` by that public key."""
    if len(public_key_proto) > MAX_PUBLIC_KEY_BYTES:
        return False
    try:
        proto = _PublicKeyProto.FromString(public_key_proto)
        if proto.key_type != _RSA:
            return False
        key = serialization.load_der_public_key(proto.data)
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < RSA_BITS:
            return False
        key.verify(signature, data, _PSS, _SHA256)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
    except Exception:
        return False


def write_identity(identity: Identity, path: str | os.PathLike[str]) -> None:
    """Write ``identity`` to a new file ``path`` with mode 0600 (refuses to overwrite)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PeerIdentityError(f"peer key file {p} already exists") from None
    except OSError as err:
        raise PeerIdentityError(f"cannot create peer key file {p}: {err.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(identity.to_bytes())
    os.chmod(p, 0o600)


def load_or_create_identity(path: str | os.PathLike[str]) -> Identity:
    """Load the key at ``path``; create it (mode 0600) if it does not exist yet."""
    p = Path(path).expanduser()
    if not p.exists():
        if not p.parent.is_dir():
            raise PeerIdentityError(f"cannot create peer key {p}: directory {p.parent} does not exist")
        identity = Identity.generate()
        try:
            write_identity(identity, p)
        except PeerIdentityError:
            if not p.exists():  # lost a creation race: fall through and load the winner's key
                raise
        else:
            return Identity(identity.private_key, identity.public_key, identity.peer_id, p, created=True)
    if not p.is_file():
        raise PeerIdentityError(f"peer key {p} is not a regular file")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise PeerIdentityError(f"peer key {p} is accessible by others (mode {mode:04o}); run: chmod 600 {p}")
    try:
        data = p.read_bytes()
    except OSError as err:
        raise PeerIdentityError(f"cannot read peer key {p}: {err.strerror}") from None
    return Identity.from_bytes(data, p)


class IdentityLock:
    """An exclusive advisory lock on a key file, held while a peer runs with that identity.

    A second process on the same machine with the same key gets ``PeerIdentityError`` at once; the
    lock is released when the process exits, however it exits.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, peer_id: str) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PeerIdentityError(
                f"identity {peer_id} ({self.path}) is already in use by another meshinfer process"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
