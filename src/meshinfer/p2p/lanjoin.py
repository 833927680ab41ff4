"""Joining a swarm through the LAN: browse by mDNS before start, advertise after, join peers found later.

Contract: the part of ``PeerNode`` (``meshinfer.p2p.node``) that uses ``meshinfer.p2p.discovery`` (mDNS) and
``meshinfer.p2p.lanpeers`` (what peers advertise, which to join). ``browse_at_start`` decides whether a node takes
part in LAN discovery at all (``lan_discovery_enabled``) and, with no initial peers, browses for
``P2PConfig.mdns_browse_s`` and returns the multiaddrs to join through (none: a new swarm).
``advertise`` publishes the node's multiaddrs (the announced ones when ``--announce`` is given) and installs the
callback for peers found later; ``join_found_peer`` dials and DHT-pings such a peer (each side adds the other to its
routing table), so swarms started apart merge into one. Knows nothing of streams, records or sessions; the DHT
ping and the dial are passed in as callables (no hivemind here).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from meshinfer.config import P2PConfig
from meshinfer.p2p.discovery import LanDiscovery
from meshinfer.p2p.lanpeers import LanPeer, join_maddrs, lan_discovery_enabled, own_maddrs

log = logging.getLogger(__name__)


@dataclass
class LanStart:
    """What LAN discovery gave a starting node."""

    lan: LanDiscovery | None
    """The running discovery (None: this node takes no part in LAN discovery)."""
    initial_peers: tuple[str, ...]
    """Multiaddrs to join through: the configured ones, else those found by mDNS."""
    found: set[str] = field(default_factory=set[str])
    """Peer ids found by mDNS before start."""


async def browse_at_start(config: P2PConfig, *, client_mode: bool, own_peer_id: str, swarm: str = "") -> LanStart:
    """Start LAN discovery when this node takes part; without initial peers, browse and join what answers (only
    peers advertising ``swarm``: a private swarm's public label, "" for public swarms)."""
    initial_peers = tuple(config.initial_peers)
    if not lan_discovery_enabled(mdns=config.mdns, host=config.host, client_mode=client_mode):
        return LanStart(None, initial_peers)
    lan = await LanDiscovery.start(swarm)
    if initial_peers:
        return LanStart(lan, initial_peers)
    try:
        found = await lan.wait_for_peers(config.mdns_browse_s, own_peer_id=own_peer_id)
    except BaseException:
        await lan.close()
        raise
    log.info("mDNS: %s", f"joining through {len(found)} LAN peer(s)" if found
             else f"no peer found on this LAN within {config.mdns_browse_s:g} s: a new swarm")
    return LanStart(lan, join_maddrs(found), {p.peer_id for p in found})


async def advertise(lan: LanDiscovery, peer_id: str, maddrs: Sequence[str], role: str,
                    on_found: Callable[[LanPeer], Awaitable[None]]) -> None:
    """Advertise ``maddrs`` of ``peer_id`` as ``role`` and call ``on_found`` for each peer found from now on."""
    await lan.advertise(LanPeer(peer_id, own_maddrs(peer_id, maddrs), role=role))
    lan.set_on_found(on_found)


def should_join(peer: LanPeer, *, own_peer_id: str, swarm: str) -> bool:
    """Whether a peer found after start is one to join: not ourselves, not a client, of our swarm."""
    return peer.peer_id != own_peer_id and peer.role != "client" and peer.swarm == swarm


async def join_found_peer(peer: LanPeer, *, dial: Callable[[], Awaitable[None]],
                          ping: Callable[[], Awaitable[object]], timeout: float) -> bool:
    """Dial ``peer`` and DHT-ping it (within ``timeout`` seconds); whether it answered."""
    await dial()
    async with asyncio.timeout(timeout):
        answered = await ping()
    if answered is None:
        log.info("LAN peer %s found by mDNS did not answer a DHT ping", peer.peer_id[:16])
        return False
    log.info("joined LAN peer %s found by mDNS", peer.peer_id[:16])
    return True
