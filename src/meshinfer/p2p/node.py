"""``PeerNode``: one process's presence in the swarm: identity, libp2p daemon, DHT and streams.

Contract: the only public face of the substrate (hivemind) to the rest of meshinfer; no hivemind type
appears in a public signature. ``PeerNode.start(P2PConfig)`` loads or creates the identity (locking
its key file), starts ``p2pd`` (dies with this process), joins the DHT in-process on the same asyncio
loop with the owner-signed record validator, and returns a node with ``peer_id`` and ``maddrs``.
Then:

- ``handle(protocol, handler)``: serve incoming streams; each runs ``handler(MessageStream)`` under
  ``run_handler`` (typed ``Error`` reply on bad input, always closed), concurrently, within the node's
  ``Admission`` (``meshinfer.p2p.admission``): streams per peer and in all, and the bytes their
  unfinished messages buffer, per peer and in all, over both planes; a stream past a cap gets an
  ``Error`` naming the limit and is closed; its first message must come within ``first_timeout``;
- ``open_stream(peer_id, protocol, maddrs=..., direct=...)``: a ``MessageStream`` to a peer (e.g. the
  next server of a route): over the direct data plane (``meshinfer.p2p.direct``) when the peer gave
  direct addresses, else (or when that fails) over libp2p, dialling the given multiaddrs first; with
  ``reuse=True`` an idle stream of that peer and protocol kept by ``release_stream`` is taken instead when one
  is still usable (``meshinfer.p2p.pool``: bounded per peer and in all, expiring after 15 s idle;
  ``drop_idle(peer)`` forgets a peer that failed). Only protocols whose handler serves several sessions in turn
  on one stream may be released (``meshinfer/session/1``); ``direct_dials`` counts direct connections dialled;
- a node started with ``P2PConfig.direct`` and not in client mode also listens on the direct plane
  (``direct_addresses``: what it announces, ``meshinfer.p2p.reachability.announced_direct``: the
  ``--direct-announce`` address alone when given) and serves dial-backs (``meshinfer.p2p.dialback``);
  ``handle`` serves a protocol on both planes;
- ``maddrs`` are what libp2p announces: the ``--announce`` addresses when given, else the bound ones (a
  wildcard bind is expanded by p2pd to each interface's address, never announced as 0.0.0.0);
- ``dht_put_records``/``dht_put_record``: store signed records under subkey ``<peer id>`` (or
  ``<peer id>/<tag>`` to keep several records of one peer under one key);
- ``dht_get_records``/``get_many``: read all validated records under one or many keys in ONE bounded
  call, as ``FoundRecord`` lists; keys not answered in time are left out of the result; at most
  ``RecordLimits.max_keys_per_read`` keys (more is a ``UsageError``), and per key at most
  ``max_records_per_key`` records, ``max_records_per_signer`` of one signing peer (subkeys in sorted order);
  what is skipped (over a limit, undecodable, naming another peer) is counted in ``skipped_records``;
- LAN discovery (``meshinfer.p2p.lanjoin``, with ``P2PConfig.mdns`` on a non-client node bound to a
  non-loopback host): browse before start when there are no initial peers, advertise ``maddrs`` after, join
  peers of its swarm found later. ``mdns_peers`` holds the peer ids this node learnt of by mDNS;
- NAT traversal (``meshinfer.p2p.natkind``): the daemon runs with ``P2PConfig.relay``/``relay_hop`` resolved by
  ``natkind.relay_options``; ``refresh_maddrs()`` re-reads what libp2p announces (relayed ``/p2p-circuit`` addresses
  appear once AutoRelay reserved a slot) and ``reachability`` classifies it (public / hole-punched / relayed); a
  peer whose direct plane could not be dialled is reached over libp2p (relayed if need be) for
  ``natkind.DIRECT_RETRY_S`` without trying the direct plane again (one log line per such peer);
- ``ping(peer_id, maddrs)``: the round trip of one DHT ping (``meshinfer doctor``);
- private swarms (``P2PConfig.swarm_key``; ``meshinfer.p2p.membership``, ``meshinfer.p2p.privateswarm``): before
  joining, the initial peers are asked whether this node is of their swarm (a refusal is a one-line
  ``ConfigError``); every DHT RPC carries a membership MAC both ways (``meshinfer.p2p.dhtauth``); DHT values are
  sealed with the swarm's key and stored under keys outsiders cannot compute (``SwarmKey.dht_key``; callers still
  name plain keys); every stream served through ``handle`` must start with a membership proof (libp2p: a preamble
  written by ``open_stream``; direct plane: in the hellos), else it gets an ``Error`` "this swarm is private: ..."
  and is closed. A public node serves the same check and refuses members. With ``P2PConfig.swarm_allow`` (an
  owner-signed allow-list, ``meshinfer.p2p.allowlist``) the same points admit only listed peers by their own keys;
- ``close()``: stop serving, stop advertising, leave the DHT, stop the daemon (idempotent).

Joining (LAN browse, daemon, membership check, DHT node) is ``meshinfer.p2p.nodejoin``'s; the bodies of the DHT
reads and writes are ``meshinfer.p2p.dhtio``'s (``Put`` and ``admission_limits`` are re-exported here).

Errors: ``PeerIdentityError``, ``TransportError``, ``ConfigError``, ``UsageError`` (one write naming a key and
tag twice). All methods run on the loop the node was started on (see ``meshinfer.loopthread`` for sync
callers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# isort: split
from meshinfer.p2p import _hivemind_logging  # noqa: F401 - first: before hivemind is imported

# isort: split
from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID

from meshinfer.config import P2PConfig
from meshinfer.errors import ConfigError, MeshinferError, TransportError
from meshinfer.p2p import lanjoin, privateswarm
from meshinfer.p2p.admission import Admission, RefusalLog
from meshinfer.p2p.allowlist import AllowList, load_allow_list
from meshinfer.p2p.daemon import daemon_pid, stop_p2p
from meshinfer.p2p.dhtentries import FoundRecord
from meshinfer.p2p.dhtio import Put, get_records, put_records
from meshinfer.p2p.dialback import DIALBACK_PROTOCOL, DialBackService
from meshinfer.p2p.direct import DirectPlane
from meshinfer.p2p.discovery import LanDiscovery
from meshinfer.p2p.identity import Identity, IdentityLock, load_or_create_identity
from meshinfer.p2p.lanpeers import LanPeer
from meshinfer.p2p.membership import SwarmKey, load_swarm_key
from meshinfer.p2p.natkind import DirectFailures, Reachability, reachability
from meshinfer.p2p.nodejoin import admission_limits, dial, join_swarm
from meshinfer.p2p.pool import IdlePool
from meshinfer.p2p.reachability import announced_direct
from meshinfer.p2p.signing import DEFAULT_MAX_TTL
from meshinfer.p2p.stream import DEFAULT_SETTINGS, MessageStream, StreamHandler, StreamSettings, run_handler
from meshinfer.wire.limits import DEFAULT_RECORD_LIMITS, RecordLimits
from meshinfer.wire.messages import Error, ErrorCode
from meshinfer.wire.records import DhtRecord

log = logging.getLogger(__name__)

__all__ = ["FoundRecord", "NodeSettings", "PeerNode", "Put", "admission_limits"]


@dataclass(frozen=True)
class NodeSettings:
    """How a node behaves beyond where it listens (that is ``P2PConfig``)."""

    client_mode: bool = False
    """Join the DHT only as a reader/writer: store nothing for others, serve no DHT requests."""
    dht_wait_timeout: float = 3.0
    """Seconds one DHT request to one peer may take."""
    startup_timeout: float = 20.0
    stream: StreamSettings = DEFAULT_SETTINGS
    max_record_ttl: float = DEFAULT_MAX_TTL
    """Records expiring further ahead than this are rejected by this node."""
    lan_role: str = "server"
    """What this node advertises itself as on the LAN (``server`` or ``dht``; client-mode nodes do not advertise)."""


@dataclass
class PeerNode:
    identity: Identity
    maddrs: list[str]
    settings: NodeSettings
    _p2p: object = field(repr=False)
    _dht: DHTNode = field(repr=False)
    _lock: IdentityLock | None = field(repr=False, default=None)
    _direct: DirectPlane | None = field(repr=False, default=None)
    direct_addresses: list[str] = field(default_factory=list)
    """Where this node accepts direct-plane connections (``/ip4/H/tcp/P``); empty when it does not listen."""
    _streams: set[MessageStream] = field(default_factory=set, repr=False)
    admission: Admission = field(default_factory=Admission, repr=False)
    """What incoming streams may hold (shared by both planes)."""
    _refusals: RefusalLog = field(default_factory=lambda: RefusalLog(log, time.monotonic), repr=False)
    _closed: bool = False
    record_limits: RecordLimits = DEFAULT_RECORD_LIMITS
    """What one DHT read takes from the swarm (see ``get_many``)."""
    skipped_records: Counter[str] = field(default_factory=Counter[str])
    """DHT records this node's reads skipped, by reason (``invalid``, ``wrong owner``, ``over per-key limit``...)."""
    mdns_peers: set[str] = field(default_factory=set[str])
    """Peer ids this node found on the LAN by mDNS (and joined)."""
    _lan: LanDiscovery | None = field(repr=False, default=None)
    _direct_failures: DirectFailures = field(default_factory=DirectFailures, repr=False)
    _idle: IdlePool[MessageStream] = field(default_factory=IdlePool[MessageStream], repr=False)
    swarm_key: SwarmKey | None = field(default=None, repr=False)
    """The private swarm this node belongs to (None: a public swarm, or an allow-list one)."""
    allow: AllowList | None = field(default=None, repr=False)
    """The owner-signed allow-list of this node's swarm (``meshinfer.p2p.allowlist``; None: no allow-list)."""

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def daemon_pid(self) -> int | None:
        """PID of this node's p2pd (for diagnostics and orphan tests)."""
        return daemon_pid(self._p2p)  # type: ignore[arg-type]

    @property
    def reachability(self) -> Reachability:
        """How others reach this node's libp2p plane, from what it announces (``natkind.reachability``)."""
        return reachability(self.maddrs)

    async def refresh_maddrs(self) -> list[str]:
        """Re-read the addresses libp2p announces (relayed addresses come and go); keep the old ones on failure."""
        try:
            self.maddrs = [str(m) for m in await self._p2p.get_visible_maddrs(latest=True)]  # type: ignore[attr-defined]
        except Exception as err:
            log.debug("cannot read the daemon's addresses: %s", err)
        return self.maddrs

    @classmethod
    async def start(cls, config: P2PConfig, settings: NodeSettings | None = None, *,
                    identity: Identity | None = None) -> PeerNode:
        """Start a node per ``config``; with no initial peers it starts a new swarm."""
        settings = settings or NodeSettings()
        swarm_key = load_swarm_key(config.swarm_key) if config.swarm_key else None
        allow = load_allow_list(config.swarm_allow) if config.swarm_allow else None
        lock: IdentityLock | None = None
        if identity is None:
            identity = load_or_create_identity(config.identity) if config.identity else Identity.generate()
        if identity.path is not None:
            lock = IdentityLock(identity.path)
            lock.acquire(identity.peer_id)
        joined = await join_swarm(config, client_mode=settings.client_mode, startup_timeout=settings.startup_timeout,
                                  dht_wait_timeout=settings.dht_wait_timeout, max_record_ttl=settings.max_record_ttl,
                                  identity=identity, lock=lock, swarm_key=swarm_key, allow=allow)
        p2p, dht, maddrs, lan_start, lan = joined.p2p, joined.dht, joined.maddrs, joined.lan_start, joined.lan_start.lan
        refusals = RefusalLog(log, time.monotonic)
        node = cls(identity=identity, maddrs=maddrs, settings=settings, _p2p=p2p, _dht=dht, _lock=lock,
                   admission=Admission(admission_limits(config), refusals), _refusals=refusals,
                   mdns_peers=lan_start.found, _lan=lan, swarm_key=swarm_key, allow=allow)
        if config.direct:
            node._direct = DirectPlane(identity, node.admission, node._refusals, swarm_key, allow)
            if not settings.client_mode:
                try:
                    await node._direct.listen(config.host, config.direct_port)
                except BaseException:
                    await node.close()
                    raise
                node.direct_addresses = announced_direct(config.direct_announce_address, config.host, maddrs,
                                                         node._direct.plain_port, node._direct.tls_port)
                await node.handle(DIALBACK_PROTOCOL, DialBackService(node._direct).handle)
        if lan is not None:
            await lanjoin.advertise(lan, node.peer_id, maddrs, settings.lan_role, node._join_lan_peer)
        log.debug("peer %s listening on %s%s", node.peer_id, ", ".join(maddrs),
                  f"; direct plane on {', '.join(node.direct_addresses)}" if node.direct_addresses else "")
        return node

    # --- streams ------------------------------------------------------------------------------

    async def handle(self, protocol: str, handler: StreamHandler,
                     settings: StreamSettings | None = None) -> None:
        """Serve streams of ``protocol``: each runs ``handler(stream)`` concurrently with the others."""
        stream_settings = settings or self.settings.stream

        async def on_stream(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer_id = info.peer_id.to_base58()
            stream = MessageStream(reader, writer, peer_id=peer_id, protocol=protocol, settings=stream_settings,
                                   accepted=True, admission=self.admission)
            refusal = self.admission.admit(peer_id)
            if refusal is not None:
                self._refusals.refused("libp2p-streams", refusal)
                with contextlib.suppress(MeshinferError, TimeoutError):
                    async with asyncio.timeout(2.0):
                        await stream.send(Error(code=ErrorCode.LIMIT_EXCEEDED, message=refusal))
                await stream.close(timeout=0.5)
                return
            self._streams.add(stream)
            try:
                if self.allow is not None and not self.allow.admits(peer_id):
                    await privateswarm.refuse(stream, self._refusals, self.allow.refusal(peer_id))
                    return
                if self.swarm_key is not None and not await privateswarm.admit(
                        stream, reader, self.swarm_key, self.peer_id, self._refusals,
                        self.settings.stream.first_timeout or 5.0):
                    return
                await run_handler(stream, handler)
            finally:
                self._streams.discard(stream)
                self.admission.release(peer_id)

        await self._p2p.add_binary_stream_handler(protocol, on_stream)  # type: ignore[attr-defined]
        if self._direct is not None:
            self._direct.handle(protocol, handler, stream_settings)

    async def open_stream(self, peer_id: str, protocol: str, *, maddrs: Sequence[str] = (),
                          direct: Sequence[str] = (), timeout: float = 10.0,
                          settings: StreamSettings | None = None, reuse: bool = False) -> MessageStream:
        """Open a stream to ``peer_id`` speaking ``protocol``: over the direct plane at ``direct`` when
        given (and enabled), else or on failure over libp2p (dialling ``maddrs`` first if given). ``reuse``: an
        idle stream of ``release_stream`` when one is usable (``stream.reused`` is then True)."""
        if reuse:
            stream, stale = self._idle.take(peer_id, protocol, time.monotonic(), MessageStream.reusable)
            await _close_all(stale)
            if stream is not None:
                stream.reused = True
                return stream
        if direct and self._direct is not None and self._direct_failures.should_try_direct(peer_id, time.monotonic()):
            try:
                stream = await self._direct.dial_any(peer_id, direct, protocol,
                                                     settings=settings or self.settings.stream,
                                                     timeout=min(timeout, 5.0))
            except TransportError as err:
                if self._direct_failures.note_failure(peer_id, time.monotonic()):
                    log.info("direct connection to %s failed (%s); using libp2p (relayed if need be) for it",
                             peer_id[:16], err)
            else:
                self._direct_failures.note_success(peer_id)
                return stream
        try:
            pid = PeerID.from_base58(peer_id)
        except ValueError:
            raise ConfigError(f"invalid peer id {peer_id!r}") from None
        try:
            async with asyncio.timeout(timeout):
                if maddrs:
                    await self._dial(pid, maddrs)
                _info, reader, writer = await self._p2p.call_binary_stream_handler(pid, protocol)  # type: ignore[attr-defined]
        except TimeoutError:
            raise TransportError(
                f"cannot open a {protocol} stream to {peer_id}: timed out after {timeout:g}s"
            ) from None
        except Exception as err:
            raise TransportError(f"cannot open a {protocol} stream to {peer_id}: {str(err)[:200]}") from None
        if self.swarm_key is not None:  # read by the listener before its first frame (``privateswarm.admit``)
            writer.write(self.swarm_key.preamble(protocol, self.peer_id, peer_id))
        stream = MessageStream(reader, writer, peer_id=peer_id, protocol=protocol,
                               settings=settings or self.settings.stream)
        return stream

    async def release_stream(self, stream: MessageStream) -> None:
        """Keep ``stream`` idle for the next ``open_stream(reuse=True)`` of its peer and protocol when it is still
        usable (the caller ended its use at a message boundary); else close it. Never raises."""
        if self._closed or not stream.reusable():
            await stream.close(timeout=0.5)
            return
        await _close_all(self._idle.put(stream.peer_id, stream.protocol, stream, time.monotonic()))

    async def drop_idle(self, peer_id: str) -> None:
        """Close the idle streams kept for ``peer_id`` (it failed: never hand them out)."""
        await _close_all(self._idle.drop_peer(peer_id))

    @property
    def direct_dials(self) -> int:
        """Direct-plane connections this node dialled (a reused stream dials none)."""
        return self._direct.dials if self._direct is not None else 0

    @property
    def reused_streams(self) -> int:
        """Streams ``open_stream`` handed out again from the idle pool."""
        return self._idle.reused

    async def _dial(self, pid: PeerID, maddrs: Sequence[str]) -> None:
        """Connect to ``pid`` at ``maddrs`` (best effort: the daemon may still find it by routing)."""
        await dial(self._p2p, pid, maddrs)

    async def _join_lan_peer(self, peer: LanPeer) -> None:
        """Join a peer found on the LAN after start (see ``meshinfer.p2p.lanjoin``)."""
        if self._closed or self._lan is None:
            return
        if not lanjoin.should_join(peer, own_peer_id=self.peer_id, swarm=self._lan.swarm):
            return
        try:
            pid = PeerID.from_base58(peer.peer_id)
        except ValueError:
            return
        self.mdns_peers.add(peer.peer_id)
        await lanjoin.join_found_peer(peer, dial=lambda: self._dial(pid, peer.maddrs),
                                      ping=lambda: self._dht.protocol.call_ping(pid),
                                      timeout=max(10.0, 2 * self.settings.dht_wait_timeout))

    async def ping(self, peer_id: str, maddrs: Sequence[str] = (), *, timeout: float = 10.0) -> float | None:
        """Seconds a DHT ping of ``peer_id`` took (dialling ``maddrs`` first), or None when it did not answer."""
        try:
            pid = PeerID.from_base58(peer_id)
        except ValueError:
            raise ConfigError(f"invalid peer id {peer_id!r}") from None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._dial(pid, maddrs)
                start = time.monotonic()
                if await self._dht.protocol.call_ping(pid) is not None:
                    return time.monotonic() - start
        return None

    # --- DHT ----------------------------------------------------------------------------------

    async def dht_put_records(self, items: Sequence[Put], expiration_time: float,
                              *, timeout: float = 10.0) -> list[bool]:
        """Store each record, signed, until ``expiration_time``; per item: stored by some node.

        A write with an earlier expiration than the one already stored under the same key and
        subkey is refused (the DHT keeps the newest), so refresh with a later expiration. A client-mode
        node's own storage is not a replica (nobody reads it): its writes count only other nodes.
        """
        return await put_records(self._dht, items, expiration_time, peer_id=self.peer_id, dht_key=self._dht_key,
                                 timeout=timeout, exclude_self=self.settings.client_mode)

    async def dht_put_record(self, key: str, record: DhtRecord, expiration_time: float,
                             tag: str | None = None) -> bool:
        return (await self.dht_put_records([Put(key, record, tag)], expiration_time))[0]

    async def get_many(self, keys: Iterable[str], *, timeout: float = 5.0,
                       latest: bool = True) -> dict[str, list[FoundRecord]]:
        """All valid records under each key (sorted by subkey), in one call bounded by ``timeout``.

        ``latest`` asks every replica the search meets (complete); otherwise the first non-expired
        answer per key wins (faster). A key whose search did not finish in time is absent.
        """
        return await get_records(self._dht, keys, dht_key=self._dht_key, limits=self.record_limits,
                                 skipped=self.skipped_records, timeout=timeout, latest=latest)

    def _dht_key(self, key: str) -> str:
        """Where ``key`` lives in the DHT: itself in a public swarm, a name only members compute in a private one."""
        return key if self.swarm_key is None else self.swarm_key.dht_key(key)

    async def dht_get_records(self, key: str, *, timeout: float = 5.0) -> list[FoundRecord]:
        """All valid records under ``key``; empty when none or timed out."""
        return (await self.get_many([key], timeout=timeout)).get(key, [])

    # --- lifecycle ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop serving, leave the DHT and stop the daemon (idempotent, never raises)."""
        if self._closed:
            return
        self._closed = True
        if self._lan is not None:
            await self._lan.close()
        for stream in list(self._streams):
            await stream.close(timeout=0.5)
        await _close_all(self._idle.drain())
        if self._direct is not None:
            await self._direct.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await self._dht.shutdown()
        await stop_p2p(self._p2p)  # type: ignore[arg-type]
        if self._lock is not None:
            self._lock.release()

    async def __aenter__(self) -> PeerNode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _close_all(streams: Iterable[MessageStream]) -> None:
    for stream in streams:
        await stream.close(timeout=0.5)
