"""The direct data plane: session streams over plain TCP sockets between peers, authenticated by their keys.

Contract: a second way to carry ``MessageStream``s between two peers, beside libp2p, for the hot path
(hidden states of every token). libp2p streams go through two ``p2pd`` daemons (app -> unix socket ->
daemon -> TCP -> daemon -> unix socket -> app), which costs 0.4-1.3 ms per message on loopback; a
direct connection costs a fraction of that. Security matches libp2p's: both ends are identified by
their peer keys, bound to the connection, and traffic between machines is encrypted (TLS 1.3 with an
ephemeral self-signed certificate per process). Two kinds of endpoint:

- ``/ip4/H/tcp/P/tls`` (also ip6, dns): TLS 1.3; the dialer reads the listener's certificate instead
  of validating it, and the signed hellos below bind that certificate's hash;
- ``/ip4/127.0.0.1/tcp/P``: plain TCP on the loopback interface only (the listener binds 127.0.0.1 and
  the dialer refuses a plain address that is not loopback). Bytes on loopback never leave the kernel,
  so encryption there protects nothing (a local attacker able to read them could read the processes'
  memory too) and costs about 0.2 ms per message; authentication is kept.

Handshake (``[u32 length][msgpack Hello]`` each; every read bounded in time and size):

1. dialer -> listener: its public key, the protocol it wants and a fresh nonce;
2. listener -> dialer: its public key, its nonce and an RSA-PSS signature by its key of
   ``"meshinfer-direct/2" | "listener" | dialer nonce | listener nonce | sha256(certificate or b"")``,
   or ``error`` set when it refuses (unknown protocol); the dialer checks that the key hashes to the
   peer id it meant to reach and the signature;
3. dialer -> listener: the same key and its signature of the same bytes with role ``"dialer"``; the
   listener checks it and learns the dialer's peer id. Fresh nonces on both sides make every
   signature single-use, and with TLS a man in the middle presents another certificate, so it can
   neither reuse nor forward signatures.

Private swarms (``meshinfer.p2p.membership``, a node started with a swarm key): hello 1 also carries the
dialer's swarm ``key_id`` (empty: public); a listener whose key differs refuses in hello 2 with the one-line
reason of ``membership.refusal`` ("this swarm is private: ..."). Hellos 2 and 3 each carry an HMAC by the swarm's
stream key over that hello's signed bytes (role, both nonces, certificate hash) and both peer ids; the dialer
checks the listener's before answering, the listener checks the dialer's before dispatching. Public peers send
them empty and check neither; older peers ignore the two trailing fields, and their hellos decode with them empty.
In an allow-list swarm (``meshinfer.p2p.allowlist``) the listener refuses, in hello 2, a dialer whose (signed) key
is not listed, and the dialer refuses a listener that is not.

The connection then carries one ``MessageStream`` of that protocol (``meshinfer.wire.framing``), whose
``dial_rtt_s`` is the round trip of hellos 1-2 as the dialer timed it (a latency figure for route planning
before any session ran). A connection is never multiplexed: the node keeps a finished one idle for the next
stream of the same protocol to the same peer (``meshinfer.p2p.pool``, ``PeerNode.release_stream``), which
fits the framing as it is (one ordered message stream, no stream ids) and keeps a slow session from blocking
another's frames. A
refusal reaches the dialer as a ``TransportError`` naming the reason. Handshakes (TLS, then hellos) are
bounded in number (``max_handshakes`` at once each) and time; established connections count as streams
of their peer in the node's ``Admission`` (checked against the key of the first hello, so a peer over
``--max-streams-per-peer`` or a node over ``--max-streams`` is refused with a hello naming the limit),
and the bytes of their messages in progress against its buffer caps; the first message must come within
``StreamSettings.first_timeout``. Refusals are logged at a bounded rate. Connections are accepted by
``meshinfer.p2p.listener`` (leak-free TLS handshakes). A bad peer only ever loses its own connection.
The wire pieces (addresses, TLS contexts, hellos and their framing) are ``meshinfer.p2p.directhello``'s (the
public ones re-exported here); this module runs the handshakes and the connections.
Knows nothing of sessions, models, the DHT or hivemind (it uses ``identity`` for keys and signatures).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence

from meshinfer.errors import ConfigError, MeshinferError, TransportError, WireError
from meshinfer.p2p.admission import Admission, RefusalLog
from meshinfer.p2p.allowlist import AllowList
from meshinfer.p2p.directhello import (
    DIRECT_VERSION,
    HANDSHAKE_TIMEOUT_S,
    HELLO_MAX_BYTES,
    NONCE_BYTES,
    DirectAddress,
    DirectRefused,
    Hello,
    binding,
    client_context,
    is_loopback,
    parse_address,
    peer_cert,
    peer_id_of,
    read_hello,
    send_hello,
    server_context,
)
from meshinfer.p2p.identity import Identity, peer_id_of_public_key, verify_signature
from meshinfer.p2p.listener import Listener
from meshinfer.p2p.membership import PUBLIC_KEY_ID, SwarmKey, refusal
from meshinfer.p2p.stream import MessageStream, StreamSettings, run_handler

log = logging.getLogger(__name__)

__all__ = [
    "DIRECT_VERSION", "HANDSHAKE_TIMEOUT_S", "HELLO_MAX_BYTES", "NONCE_BYTES", "DirectAddress", "DirectPlane",
    "DirectRefused", "Hello", "binding", "is_loopback", "parse_address",
]

Handler = Callable[[MessageStream], Awaitable[None]]


class DirectPlane:
    """This peer's direct listeners (optional) and dialer."""

    def __init__(self, identity: Identity, admission: Admission | None = None,
                 refusals: RefusalLog | None = None, swarm_key: SwarmKey | None = None,
                 allow: AllowList | None = None) -> None:
        self.identity = identity
        self.swarm_key = swarm_key
        self.allow = allow
        self.admission = admission or Admission()
        self._refusals = refusals or RefusalLog(log, time.monotonic)
        self._client_ctx = client_context()
        self._listeners: list[Listener] = []
        self._cert_der = b""
        self._handlers: dict[str, tuple[Handler, StreamSettings]] = {}
        self._streams: set[MessageStream] = set()
        self._handshakes = 0
        self.tls_port = 0
        self.plain_port = 0
        self.dials = 0
        """Connections this plane dialled successfully (tests check that sessions reuse them)."""

    # ---- listening ---------------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> None:
        """Accept TLS connections on ``host:port`` (0: a free port) and plain ones on 127.0.0.1."""
        server_ctx, self._cert_der = await asyncio.to_thread(server_context)

        async def on_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._on_connection(reader, writer, self._cert_der)

        async def on_plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._on_connection(reader, writer, b"")

        max_handshakes = self.admission.limits.max_handshakes
        tls = Listener(on_tls, ssl_context=server_ctx, handshake_timeout=HANDSHAKE_TIMEOUT_S,
                       max_handshakes=max_handshakes, refusals=self._refusals, name="direct TLS")
        plain = Listener(on_plain, ssl_context=None, handshake_timeout=HANDSHAKE_TIMEOUT_S,
                         max_handshakes=max_handshakes, refusals=self._refusals, loopback_only=True,
                         name="direct plain")
        self.tls_port = await tls.start(host, port)
        self._listeners.append(tls)
        try:
            self.plain_port = await plain.start("127.0.0.1", 0)
        except BaseException:
            await tls.close()
            self._listeners.clear()
            raise
        self._listeners.append(plain)

    def addresses(self, tls_hosts: Sequence[str]) -> list[str]:
        """What to announce: the plain loopback endpoint first, then the TLS one on each of ``tls_hosts``."""
        if not self._listeners:
            return []
        out = [str(DirectAddress("127.0.0.1", self.plain_port, False))]
        out += [str(DirectAddress(h, self.tls_port, True)) for h in tls_hosts]
        return out

    def handle(self, protocol: str, handler: Handler, settings: StreamSettings) -> None:
        self._handlers[protocol] = (handler, settings)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cert: bytes) -> None:
        limit = self.admission.limits.max_handshakes
        if self._handshakes >= limit:
            self._refusals.refused("direct-hellos", f"a direct connection: {self._handshakes} handshakes in "
                                                    f"progress (limit {limit})")
            writer.close()
            return
        self._handshakes += 1
        admitted: str | None = None
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                first = await read_hello(reader)
                if len(first.nonce) != NONCE_BYTES:
                    raise WireError("direct hello: bad nonce")
                claimed = peer_id_of(first.public_key)
                refused = refusal(self.swarm_key, first.swarm or PUBLIC_KEY_ID) if self.allow is None else \
                    self.allow.refusal(claimed)
                if refused:
                    self._refusals.refused("direct-members", f"a direct connection from {claimed[:16]}: {refused}")
                elif first.protocol not in self._handlers:
                    refused = f"protocol {first.protocol[:128]!r} is not served here"
                if not refused:
                    refused = self.admission.admit(claimed) or ""
                    if refused:
                        self._refusals.refused("direct-streams", refused)
                    else:
                        admitted = claimed
                nonce = secrets.token_bytes(NONCE_BYTES)
                signed = binding(b"listener", first.nonce, nonce, cert)
                signature = await asyncio.to_thread(self.identity.sign, signed) if not refused else b""
                member = b"" if refused or self.swarm_key is None else \
                    self.swarm_key.direct_proof(signed, claimed, self.identity.peer_id)
                await send_hello(writer, Hello(DIRECT_VERSION, self.identity.public_key, signature,
                                                nonce=nonce, error=refused, member=member))
                if refused:
                    raise WireError(refused)
                proof = await read_hello(reader)
            dialer_signed = binding(b"dialer", first.nonce, nonce, cert)
            if proof.public_key != first.public_key or not verify_signature(
                    first.public_key, dialer_signed, proof.signature):
                raise WireError("direct hello: bad signature")
            if self.swarm_key is not None and not self.swarm_key.check_direct_proof(
                    proof.member, dialer_signed, claimed, self.identity.peer_id):
                raise WireError("direct hello: bad membership proof")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, WireError,
                ssl.SSLError) as err:
            log.debug("direct handshake failed: %s", err)
            if admitted is not None:
                self.admission.release(admitted)
            writer.close()
            return
        except BaseException:
            if admitted is not None:
                self.admission.release(admitted)
            raise
        finally:
            self._handshakes -= 1
        peer_id = claimed
        handler, settings = self._handlers[first.protocol]
        stream = MessageStream(reader, writer, peer_id=peer_id, protocol=first.protocol, settings=settings,
                               accepted=True, admission=self.admission)
        self._streams.add(stream)
        try:
            await run_handler(stream, handler)
        finally:
            self._streams.discard(stream)
            self.admission.release(peer_id)

    # ---- dialling ----------------------------------------------------------------------------

    async def dial(self, peer_id: str, address: str, protocol: str, *, settings: StreamSettings,
                   timeout: float) -> MessageStream:
        """A ``MessageStream`` of ``protocol`` to ``peer_id`` at ``address``; ``TransportError`` on failure."""
        addr = parse_address(address)
        writer: asyncio.StreamWriter | None = None
        rtt: float | None = None
        try:
            async with asyncio.timeout(timeout):
                if addr.tls:
                    reader, writer = await asyncio.open_connection(addr.host, addr.port, ssl=self._client_ctx,
                                                                   server_hostname="")
                    cert = peer_cert(writer)
                    if not cert:
                        raise TransportError("the listener sent no certificate")
                else:
                    reader, writer = await asyncio.open_connection(addr.host, addr.port)
                    cert = b""
                nonce = secrets.token_bytes(NONCE_BYTES)
                sent_at = time.perf_counter()
                swarm = b"" if self.swarm_key is None else self.swarm_key.key_id
                await send_hello(writer, Hello(DIRECT_VERSION, self.identity.public_key, protocol=protocol,
                                                nonce=nonce, swarm=swarm))
                hello = await read_hello(reader)
                rtt = time.perf_counter() - sent_at  # one round trip (and the listener's signature)
                if hello.error:
                    raise DirectRefused(f"refused: {hello.error}")
                if peer_id_of_public_key(hello.public_key) != peer_id:
                    raise TransportError(f"{address} is not peer {peer_id} (another key answered)")
                listener_signed = binding(b"listener", nonce, hello.nonce, cert)
                if len(hello.nonce) != NONCE_BYTES or not verify_signature(
                        hello.public_key, listener_signed, hello.signature):
                    raise TransportError(f"{address} failed to prove it holds the key of {peer_id}")
                if self.allow is not None and not self.allow.admits(peer_id):
                    raise TransportError(f"{address} ({peer_id}) is not on this swarm's allow-list")
                if self.swarm_key is not None and not self.swarm_key.check_direct_proof(
                        hello.member, listener_signed, self.identity.peer_id, peer_id):
                    raise TransportError(f"{address} ({peer_id}) is not a member of this private swarm")
                signed = binding(b"dialer", nonce, hello.nonce, cert)
                signature = self.identity.sign(signed)
                member = b"" if self.swarm_key is None else \
                    self.swarm_key.direct_proof(signed, self.identity.peer_id, peer_id)
                await send_hello(writer, Hello(DIRECT_VERSION, self.identity.public_key, signature, member=member))
        except BaseException as err:
            if writer is not None:
                writer.close()
            if isinstance(err, TimeoutError):
                raise TransportError(f"direct connection to {address} timed out after {timeout:g}s") from None
            if isinstance(err, MeshinferError):
                kind = DirectRefused if isinstance(err, DirectRefused) else TransportError
                raise kind(f"direct connection to {address}: {err}") from None
            if isinstance(err, Exception):
                raise TransportError(f"direct connection to {address} failed: {str(err)[:200]}") from None
            raise
        self.dials += 1
        stream = MessageStream(reader, writer, peer_id=peer_id, protocol=protocol, settings=settings)
        stream.dial_rtt_s = rtt
        return stream

    async def dial_any(self, peer_id: str, addresses: Sequence[str], protocol: str, *, settings: StreamSettings,
                       timeout: float) -> MessageStream:
        """Try each usable address in turn (loopback ones only when the peer may be on this machine);
        the last failure's ``TransportError`` if none works."""
        last: MeshinferError = TransportError(f"no usable direct address for {peer_id}")
        for address in addresses:
            try:
                return await self.dial(peer_id, address, protocol, settings=settings, timeout=timeout)
            except (TransportError, ConfigError) as err:
                last = err
                if isinstance(err, DirectRefused):
                    break  # the right peer said no: another of its addresses will say the same
        raise last if isinstance(last, TransportError) else TransportError(str(last))

    # ---- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        for listener in self._listeners:
            await listener.close()
        self._listeners.clear()
        for stream in list(self._streams):
            await stream.close(timeout=0.5)
