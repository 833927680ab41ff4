"""What a meshinfer peer says about itself on the LAN (mDNS/DNS-SD TXT), and which found peers to join.

Contract: pure decision code, no network, no zeroconf, no hivemind (``meshinfer.p2p.discovery`` does the
multicast). A peer advertises one DNS-SD service of type ``SERVICE_TYPE`` whose TXT properties are built by
``encode_txt``: its peer id, its role (``server``, ``dht`` or ``client``), its swarm name (the private-swarm
hook: empty means the public default swarm; a peer only joins peers of its own swarm) and its libp2p multiaddrs
(each ``.../p2p/<its peer id>``). ``decode_txt`` reads what others advertise with bounded sizes
(``LanLimits``): anything malformed, oversized or naming another peer yields ``None``, never an exception.
``lan_discovery_enabled`` says which nodes take part at all. ``pick_join`` chooses which found peers to join
through: not ourselves, not clients (they serve no DHT), only our swarm, each once, in a deterministic order, at
most ``max_join`` of them. ``no_peers_message`` is the one line a client prints when the LAN has nobody;
``found_via`` how a process learnt of a peer (for ``meshinfer swarm``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

SERVICE_TYPE: Final = "_meshinfer._tcp.local."
"""The DNS-SD service type every meshinfer peer advertises and browses."""
TXT_VERSION: Final = "1"
ROLES: Final = ("server", "dht", "client")
"""What an advertising peer is: a block server, a DHT-only (bootstrap) peer, or a client (not joinable)."""


@dataclass(frozen=True)
class LanLimits:
    """Bounds on what one advertised peer may carry (a TXT string holds at most 255 bytes)."""

    max_maddrs: int = 8
    max_maddr_len: int = 200
    max_peer_id_len: int = 128
    max_swarm_len: int = 64


DEFAULT_LAN_LIMITS: Final = LanLimits()


@dataclass(frozen=True)
class LanPeer:
    """One peer as advertised on the LAN."""

    peer_id: str
    maddrs: tuple[str, ...]
    role: str = "server"
    swarm: str = ""
    """Private-swarm hook: the swarm name this peer belongs to ("" = the default, public swarm)."""


def own_maddrs(peer_id: str, maddrs: Iterable[str], limits: LanLimits = DEFAULT_LAN_LIMITS) -> tuple[str, ...]:
    """``maddrs`` each ending in ``/p2p/<peer_id>`` (appended when missing), deduplicated, bounded."""
    out: list[str] = []
    suffix = f"/p2p/{peer_id}"
    for text in maddrs:
        full = text if text.endswith(suffix) else text.split("/p2p/")[0] + suffix
        if full not in out and len(full) <= limits.max_maddr_len:
            out.append(full)
    return tuple(out[: limits.max_maddrs])


def encode_txt(peer: LanPeer, limits: LanLimits = DEFAULT_LAN_LIMITS) -> dict[str, str]:
    """The TXT properties that advertise ``peer``."""
    props = {"v": TXT_VERSION, "id": peer.peer_id, "role": peer.role, "swarm": peer.swarm}
    for i, maddr in enumerate(own_maddrs(peer.peer_id, peer.maddrs, limits)):
        props[f"a{i}"] = maddr
    return props


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def decode_txt(props: Mapping[bytes, bytes | None] | Mapping[str, str | None],
               limits: LanLimits = DEFAULT_LAN_LIMITS) -> LanPeer | None:
    """The peer ``props`` advertise, or None when they are not a valid meshinfer advertisement."""
    texts: dict[str, str] = {}
    for key, value in props.items():
        k, v = _text(key), _text(value)
        if k is not None and v is not None:
            texts[k] = v
    if texts.get("v") != TXT_VERSION:
        return None
    peer_id = texts.get("id", "")
    role = texts.get("role", "")
    swarm = texts.get("swarm", "")
    if not peer_id or len(peer_id) > limits.max_peer_id_len or "/" in peer_id or role not in ROLES:
        return None
    if len(swarm) > limits.max_swarm_len:
        return None
    maddrs: list[str] = []
    suffix = f"/p2p/{peer_id}"
    for i in range(limits.max_maddrs):
        maddr = texts.get(f"a{i}")
        if maddr is None:
            break
        if len(maddr) > limits.max_maddr_len or not maddr.startswith("/") or not maddr.endswith(suffix):
            return None
        if maddr not in maddrs:
            maddrs.append(maddr)
    if not maddrs:
        return None
    return LanPeer(peer_id=peer_id, maddrs=tuple(maddrs), role=role, swarm=swarm)


def pick_join(found: Iterable[LanPeer], *, own_peer_id: str | None, swarm: str = "", exclude: Iterable[str] = (),
              max_join: int = 4) -> list[LanPeer]:
    """The found peers to join through: joinable (not clients), of ``swarm``, not ourselves nor in ``exclude``
    (already joined), one entry per peer id (the last advertisement wins), sorted by peer id, at most
    ``max_join``."""
    skip = set(exclude)
    if own_peer_id is not None:
        skip.add(own_peer_id)
    latest: dict[str, LanPeer] = {}
    for peer in found:
        if peer.role == "client" or peer.swarm != swarm or peer.peer_id in skip:
            continue
        latest[peer.peer_id] = peer
    return [latest[k] for k in sorted(latest)][: max(0, max_join)]


def join_maddrs(peers: Iterable[LanPeer]) -> tuple[str, ...]:
    """All multiaddrs of ``peers``, in order, without duplicates (what to pass as initial peers)."""
    out: list[str] = []
    for peer in peers:
        out.extend(m for m in peer.maddrs if m not in out)
    return tuple(out)


def no_peers_message(browse_s: float) -> str:
    """What a client says when mDNS found nobody within ``browse_s`` seconds."""
    return (f"no meshinfer peers found on this LAN by mDNS within {browse_s:g} s; pass --initial-peers MULTIADDR, "
            "or check that multicast reaches this machine")


def lan_discovery_enabled(*, mdns: bool, host: str, client_mode: bool) -> bool:
    """Whether a started node advertises itself and browses the LAN: ``mdns`` on, not a client (clients browse once,
    before starting, and are not advertised: they serve nothing), and bound to a non-loopback IP address (a peer
    listening on loopback only is on no LAN)."""
    if not mdns or client_mode:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def found_via(peer_id: str, *, mdns: Iterable[str], bootstrap: Iterable[str]) -> str:
    """How this process learnt of ``peer_id``: ``mdns`` (it advertised on the LAN), ``bootstrap`` (named by
    --initial-peers), else ``dht`` (read from the swarm's records)."""
    if peer_id in set(mdns):
        return "mdns"
    if peer_id in set(bootstrap):
        return "bootstrap"
    return "dht"
