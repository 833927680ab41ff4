"""How a ``PeerNode`` joins the swarm: LAN browse, the libp2p daemon, the membership check, the DHT node.

Contract: ``join_swarm(config, settings, identity, swarm_key, allow)`` does, in order, what ``PeerNode.start`` needs
before it has a node: LAN discovery at start (``p2p.lanjoin.browse_at_start``: the initial peers to join through),
``p2pd`` (``p2p.daemon.start_p2p``, relay options by ``p2p.natkind.relay_options``), the private-swarm membership
handler and join check (``p2p.privateswarm``), and the in-process ``DHTNode`` with the owner-signed record
validator and the swarm's authorizer (``p2p.dhtauth``); it returns them as ``Joined`` with the visible multiaddrs.
On any failure everything started so far is stopped and the identity lock released (``abort``); an unforeseen error
becomes a one-line ``TransportError``; a DHT bootstrap nobody answered is a ``TransportError`` naming the clock skew
check for private swarms. ``dial(p2p, pid, maddrs)`` has the daemon connect to a peer at given multiaddrs (best
effort: joining a peer found later, opening a stream, a ping). ``admission_limits`` maps ``P2PConfig`` to the
incoming-stream caps. Knows nothing of streams, the direct plane or records.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

# isort: split
from meshinfer.p2p import _hivemind_logging  # noqa: F401 - first: before hivemind is imported

# isort: split
from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from meshinfer.config import P2PConfig
from meshinfer.errors import MeshinferError, TransportError
from meshinfer.p2p import lanjoin, privateswarm
from meshinfer.p2p.admission import MIB, AdmissionLimits
from meshinfer.p2p.allowlist import AllowList
from meshinfer.p2p.daemon import start_p2p, stop_p2p
from meshinfer.p2p.dhtauth import MAX_CLOCK_SKEW_S, AllowListAuthorizer, SwarmAuthorizer
from meshinfer.p2p.identity import Identity, IdentityLock
from meshinfer.p2p.lanjoin import LanStart
from meshinfer.p2p.membership import SwarmKey
from meshinfer.p2p.natkind import relay_options
from meshinfer.p2p.signing import record_validator

log = logging.getLogger(__name__)


@dataclass
class Joined:
    """What joining started: the daemon handle, the DHT node, the visible multiaddrs, the LAN discovery."""

    p2p: object
    dht: DHTNode
    maddrs: list[str]
    lan_start: LanStart


async def join_swarm(config: P2PConfig, *, client_mode: bool, startup_timeout: float, dht_wait_timeout: float,
                     max_record_ttl: float, identity: Identity, lock: IdentityLock | None,
                     swarm_key: SwarmKey | None, allow: AllowList | None) -> Joined:
    """Start the daemon and the DHT node and join the swarm per ``config`` (see the module docstring)."""
    p2p = None
    lan_start: LanStart | None = None
    try:
        lan_start = await lanjoin.browse_at_start(config, client_mode=client_mode, own_peer_id=identity.peer_id,
                                                  swarm=swarm_key.label if swarm_key else
                                                  allow.label if allow else "")
        initial_peers = lan_start.initial_peers
        p2p = await start_p2p(
            identity, host=config.host, port=config.port, initial_peers=initial_peers,
            client_mode=client_mode, check_identity=not identity.created,
            startup_timeout=startup_timeout, announce=config.announce_maddrs,
            relay=relay_options(relay=config.relay, relay_hop=config.relay_hop, client_mode=client_mode,
                                loopback=is_loopback(config.host), announced=bool(config.announce)),
            nat=config.nat,
        )
        await p2p.add_binary_stream_handler(  # type: ignore[attr-defined]
            privateswarm.MEMBER_PROTOCOL, privateswarm.member_handler(swarm_key, identity.peer_id, allow=allow))
        await privateswarm.check_join(p2p, swarm_key, identity.peer_id, initial_peers,
                                      timeout=min(10.0, startup_timeout), allow=allow is not None)
        validator = record_validator(identity, max_ttl=max_record_ttl, swarm_key=swarm_key)
        try:
            dht = await DHTNode.create(
                p2p=p2p, initial_peers=list(initial_peers) or None, record_validator=validator,
                client_mode=client_mode, wait_timeout=dht_wait_timeout,
                authorizer=SwarmAuthorizer(swarm_key) if swarm_key is not None else
                AllowListAuthorizer(identity, allow) if allow is not None else None,
            )
        except RuntimeError as err:  # hivemind: "DHTNode bootstrap failed: none of the initial_peers..."
            hint = (f"; members' DHT requests must be stamped within {MAX_CLOCK_SKEW_S:g} s of each other's "
                    "clocks: check this machine's time") if swarm_key or allow else ""
            raise TransportError(f"cannot join the swarm: no initial peer answered ({err}){hint}") from None
        maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
    except BaseException as err:
        if lan_start is not None and lan_start.lan is not None:
            await lan_start.lan.close()
        await abort(p2p, lock)
        if isinstance(err, Exception) and not isinstance(err, MeshinferError):  # unforeseen: one line
            raise TransportError(f"cannot start the peer: {type(err).__name__}: {str(err)[:200]}") from err
        raise
    return Joined(p2p, dht, maddrs, lan_start)


async def dial(p2p: object, pid: PeerID, maddrs: Sequence[str]) -> None:
    """Have the daemon ``p2p`` connect to ``pid`` at ``maddrs`` (best effort: the daemon may still find it by
    routing; ``/p2p/<id>`` suffixes are dropped, unparsable addresses skipped, a failure logged at DEBUG)."""
    addrs: list[Multiaddr] = []
    for text in maddrs:
        with contextlib.suppress(Exception):
            ma = Multiaddr(text)
            if "p2p" in [p.name for p in ma.protocols()]:  # the daemon wants transport addresses
                ma = ma.decapsulate(Multiaddr(f"/p2p/{ma['p2p']}"))
            addrs.append(ma)
    if not addrs:
        return
    try:
        await p2p._client.connect(pid, addrs)  # type: ignore[attr-defined]
    except Exception as err:
        log.debug("dialling %s at %s failed: %s", pid, maddrs, err)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def admission_limits(config: P2PConfig) -> AdmissionLimits:
    """The caps on incoming streams that ``config`` asks for."""
    return AdmissionLimits(max_streams=config.max_streams, max_streams_per_peer=config.max_streams_per_peer,
                           max_buffer_bytes=config.max_buffer_mb * MIB,
                           max_buffer_bytes_per_peer=config.max_buffer_mb_per_peer * MIB,
                           max_handshakes=config.max_handshakes)


async def abort(p2p: object, lock: IdentityLock | None) -> None:
    """Stop the daemon ``p2p`` (when started) and release ``lock`` (when held)."""
    if p2p is not None:
        await stop_p2p(p2p)  # type: ignore[arg-type]
    if lock is not None:
        lock.release()
