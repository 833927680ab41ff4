"""The direct plane's wire pieces: its addresses, its TLS contexts and the handshake hellos, framed and bounded.

Contract: what ``meshinfer.p2p.direct`` sends and checks during a handshake, without the connection logic.
``parse_address`` reads ``/ip4/H/tcp/P/tls`` (ip6, dns too) or loopback-only plain ``/ip4/127.0.0.1/tcp/P`` into a
``DirectAddress`` (anything else: ``ConfigError``). ``server_context`` makes a TLS 1.3 context with an ephemeral
self-signed certificate (and its DER, which the hellos bind); ``client_context`` accepts any certificate (the
listener's signed hello authenticates it). ``Hello`` is one handshake message; ``send_hello``/``read_hello`` frame
it as ``[u32 length][msgpack]``, at most ``HELLO_MAX_BYTES`` and of version ``DIRECT_VERSION`` (else ``WireError``);
``binding`` is the bytes a hello signs (context, role, both nonces, the certificate hash); ``peer_id_of`` the peer id
of a hello's key (unusable: ``WireError``). Knows nothing of admission, handlers, streams, sessions or hivemind.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import os
import ssl
import struct
import tempfile
from dataclasses import dataclass
from typing import Annotated

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshinfer.errors import ConfigError, TransportError, WireError
from meshinfer.p2p.identity import MAX_PUBLIC_KEY_BYTES, peer_id_of_public_key
from meshinfer.p2p.membership import KEY_ID_BYTES, MAC_BYTES

DIRECT_VERSION = 2
HELLO_MAX_BYTES = 4096
HANDSHAKE_TIMEOUT_S = 5.0
"""Seconds a connection may take from accept to the end of its handshake (TLS, then hellos)."""
_CONTEXT = b"meshinfer-direct/2"
NONCE_BYTES = 32


class DirectRefused(TransportError):
    """The intended peer answered and refused the connection (its reason is in the message)."""


class Hello(msgspec.Struct, frozen=True, array_like=True):
    """One handshake message (see the module docstring for who sends what)."""

    v: int
    public_key: Annotated[bytes, msgspec.Meta(max_length=MAX_PUBLIC_KEY_BYTES)]
    signature: Annotated[bytes, msgspec.Meta(max_length=1024)] = b""
    protocol: Annotated[str, msgspec.Meta(max_length=128)] = ""
    nonce: Annotated[bytes, msgspec.Meta(max_length=64)] = b""
    error: Annotated[str, msgspec.Meta(max_length=256)] = ""
    """Set by a listener that refuses the connection (and then closes it)."""
    swarm: Annotated[bytes, msgspec.Meta(max_length=KEY_ID_BYTES)] = b""
    """Hello 1: the dialer's swarm key id (empty: a public swarm)."""
    member: Annotated[bytes, msgspec.Meta(max_length=MAC_BYTES)] = b""
    """Hellos 2 and 3 in a private swarm: the sender's membership proof (``SwarmKey.direct_proof``)."""


_hello_decoder = msgspec.msgpack.Decoder(Hello)
_encoder = msgspec.msgpack.Encoder()


def binding(role: bytes, dialer_nonce: bytes, listener_nonce: bytes, cert_der: bytes) -> bytes:
    """The bytes a hello signs: context, role, both nonces and the TLS certificate hash (b"" if plain)."""
    return b"|".join((_CONTEXT, role, dialer_nonce, listener_nonce, hashlib.sha256(cert_der).digest()))


@dataclass(frozen=True)
class DirectAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        kind = "ip6" if ":" in self.host else ("ip4" if self.host.replace(".", "").isdigit() else "dns")
        return f"/{kind}/{self.host}/tcp/{self.port}" + ("/tls" if self.tls else "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str) -> DirectAddress:
    """``/ip4/H/tcp/P/tls`` or loopback ``/ip4/127.0.0.1/tcp/P`` (ip6, dns, dns4, dns6 too) -> address;
    ``ConfigError`` otherwise (also for a plain address that is not loopback)."""
    parts = text.split("/")
    tls = len(parts) == 6 and parts[5] == "tls"
    if (len(parts) != (6 if tls else 5) or parts[0] or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6")
            or parts[3] != "tcp"):
        raise ConfigError(f"not a direct address: {text[:100]!r} (expected /ip4/HOST/tcp/PORT/tls)")
    try:
        port = int(parts[4])
    except ValueError:
        raise ConfigError(f"bad port in direct address {text[:100]!r}") from None
    if not 0 < port <= 65535 or not parts[2]:
        raise ConfigError(f"bad host or port in direct address {text[:100]!r}")
    if not tls and not is_loopback(parts[2]):
        raise ConfigError(f"direct address {text[:100]!r} is plain TCP but not loopback (add /tls)")
    return DirectAddress(parts[2], port, tls)


def self_signed() -> tuple[bytes, bytes]:
    """An ephemeral EC P-256 key and a self-signed certificate for it (PEM each)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshinfer-direct")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def server_context() -> tuple[ssl.SSLContext, bytes]:
    key_pem, cert_pem = self_signed()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory(prefix="meshinfer-tls-") as tmp:  # load_cert_chain reads files only
        os.chmod(tmp, 0o700)
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return ctx, der


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the certificate is authenticated by the listener's signed hello instead
    return ctx


async def send_hello(writer: asyncio.StreamWriter, hello: Hello) -> None:
    data = _encoder.encode(hello)
    writer.write(struct.pack(">I", len(data)) + data)
    await writer.drain()


async def read_hello(reader: asyncio.StreamReader) -> Hello:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    if length > HELLO_MAX_BYTES:
        raise WireError(f"direct hello of {length} bytes exceeds {HELLO_MAX_BYTES}")
    try:
        hello = _hello_decoder.decode(await reader.readexactly(length))
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise WireError(f"malformed direct hello: {str(err)[:200]}") from None
    if hello.v != DIRECT_VERSION:
        raise WireError(f"direct plane version {hello.v}; this peer speaks {DIRECT_VERSION}")
    return hello


def peer_id_of(public_key: bytes) -> str:
    try:
        return peer_id_of_public_key(public_key)
    except Exception as err:  # any malformed key: only this connection is refused
        raise WireError(f"direct hello: unusable public key ({str(err)[:100]})") from None


def peer_cert(writer: asyncio.StreamWriter) -> bytes:
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return b""
    return ssl_object.getpeercert(binary_form=True) or b""
