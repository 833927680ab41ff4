"""Who can reach this peer, and at which address: pure decisions behind ``--announce`` and ``meshinfer doctor``.

Contract: pure code, no network, no hivemind, no zeroconf (callers gather the facts). ``classify`` names the kind of
an address (loopback, link-local, private, public, unspecified, name); ``visible_hosts`` and ``announced_direct``
decide the direct-plane addresses a server announces (the ``--direct-announce`` address alone when given, else the
bound one: a wildcard bind is expanded to the addresses libp2p found, never announced as 0.0.0.0);
``verdicts`` turns what ``meshinfer doctor`` observed (``DoctorFacts``) into ordered ``Verdict`` lines, and
``exit_code`` says whether any of them failed. What could not be checked is said so, never implied.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

Kind = Literal["loopback", "link-local", "private", "public", "unspecified", "name"]
Level = Literal["ok", "warn", "fail", "info"]
MAX_DIRECT_HOSTS: Final = 7


def classify(host: str) -> Kind:
    """The kind of ``host``: an IP address's scope, or ``name`` for a DNS name."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return "loopback" if host == "localhost" else "name"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private or ip.is_reserved or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT):
        return "private"
    return "public"


_CGNAT: Final = ipaddress.ip_network("100.64.0.0/10")


def maddr_host(maddr: str) -> str | None:
    """The host part of ``/ip4|ip6|dns*/H/...``, else None."""
    parts = maddr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6"):
        return parts[2]
    return None


def visible_hosts(host: str, maddrs: Sequence[str]) -> list[str]:
    """Where a listener bound on ``host`` can be reached: that host, or for a wildcard host the IP addresses in
    ``maddrs`` (what libp2p found visible), deduplicated, at most ``MAX_DIRECT_HOSTS``."""
    if host not in ("0.0.0.0", "::", ""):
        return [host]
    hosts: list[str] = []
    for text in maddrs:
        h = maddr_host(text)
        if h is not None and text.split("/")[1] in ("ip4", "ip6") and h not in hosts:
            hosts.append(h)
    return hosts[:MAX_DIRECT_HOSTS]


def direct_maddr(host: str, port: int, tls: bool) -> str:
    """The direct-plane address text of ``host:port`` (``meshinfer.p2p.direct.DirectAddress`` format)."""
    kind = "ip6" if ":" in host else ("ip4" if host.replace(".", "").isdigit() else "dns")
    return f"/{kind}/{host}/tcp/{port}" + ("/tls" if tls else "")


def announced_direct(announce: tuple[str, int] | None, host: str, maddrs: Sequence[str], plain_port: int,
                     tls_port: int) -> list[str]:
    """The direct addresses a server announces: ``announce`` (TLS) alone when given (so others dial what the
    operator named, e.g. a port forward); else the plain loopback endpoint, then TLS on each visible host."""
    if announce is not None:
        return [direct_maddr(announce[0], announce[1], True)]
    return [direct_maddr("127.0.0.1", plain_port, False)] + [direct_maddr(h, tls_port, True)
                                                             for h in visible_hosts(host, maddrs)]


@dataclass(frozen=True)
class Interface:
    """One network interface address of this machine."""

    name: str
    address: str
    up: bool = True
    multicast: bool = False


@dataclass(frozen=True)
class PeerCheck:
    """One initial peer as the doctor found it: answered (round trip in seconds) or not (why)."""

    maddr: str
    rtt_s: float | None = None
    error: str = ""


@dataclass(frozen=True)
class DoctorFacts:
    """What ``meshinfer doctor`` observed; everything a verdict depends on."""

    interfaces: tuple[Interface, ...]
    host: str
    port: int
    announce: tuple[str, ...] = ()
    """``--announce`` as multiaddrs."""
    direct_announce: tuple[str, int] | None = None
    direct_port: int = 0
    mdns: bool = True
    zeroconf: bool = True
    initial_peers: tuple[PeerCheck, ...] = ()
    joined: bool | None = None
    """Whether the DHT join through the initial peers worked (None: no initial peers given)."""
    join_error: str = ""
    dialback_peer: str = ""
    """The peer asked to dial this machine back on the direct plane ("" : none asked)."""
    dialback_addresses: tuple[str, ...] = ()
    dialback_reached: bool | None = None
    """Whether it reached them (None: no answer; see ``dialback_note``)."""
    dialback_note: str = ""
    mdns_found: int | None = None
    """How many peers an mDNS browse found (None: not browsed, e.g. initial peers were given)."""
    visible: tuple[str, ...] = field(default=())
    """What the temporary node announced (its multiaddrs), when one was started."""


@dataclass(frozen=True)
class Verdict:
    level: Level
    topic: str
    text: str

    def line(self) -> str:
        return f"[{self.level:>4}] {self.topic}: {self.text}"


def _interfaces(facts: DoctorFacts) -> list[Verdict]:
    out: list[Verdict] = []
    for itf in facts.interfaces:
        state = "up" if itf.up else "down"
        mc = ", multicast" if itf.multicast else ""
        out.append(Verdict("info", "interface", f"{itf.name} {itf.address}: {classify(itf.address)} ({state}{mc})"))
    return out


def _bind(facts: DoctorFacts) -> list[Verdict]:
    kind = classify(facts.host)
    port = f"port {facts.port}" if facts.port else "port 0 (a free port each start)"
    v6 = ":" in facts.host
    usable = [i for i in facts.interfaces if i.up and (":" in i.address) == v6
              and classify(i.address) not in ("loopback", "unspecified", "link-local")]
    publics = [i.address for i in usable if classify(i.address) == "public"]
    out: list[Verdict] = []
    if kind == "loopback":
        out.append(Verdict("warn", "bind", f"{facts.host} {port} is loopback: only processes on this machine can "
                                           "reach it; pass --host 0.0.0.0 (or this machine's LAN address) to serve "
                                           "others"))
    elif kind == "unspecified":
        where = ", ".join(i.address for i in usable) or "no non-loopback address"
        said = "" if facts.announce else f": announced as {where} (and loopback)"
        out.append(Verdict("ok", "bind", f"{facts.host} {port} (every interface){said}"))
    else:
        out.append(Verdict("ok", "bind", f"{facts.host} {port} ({kind})"))
    if facts.announce:
        text = ", ".join(f"{m} ({classify(maddr_host(m) or '')})" for m in facts.announce)
        out.append(Verdict("info", "announce", f"libp2p plane announced as {text} (instead of the bound address)"))
        if any(classify(maddr_host(m) or "") in ("loopback", "link-local") for m in facts.announce):
            out.append(Verdict("warn", "announce", "a loopback or link-local --announce address is useless to "
                                                   "peers on other machines"))
    elif kind != "loopback" and not publics:
        hint = "a fixed --port P, a port forward of P on your router, and --announce PUBLIC_IP:P"
        out.append(Verdict("warn", "announce", "no public address on this machine: peers on this LAN can reach it, "
                                               f"peers elsewhere (behind NAT) only with {hint}"))
    if facts.direct_announce is not None:
        h, p = facts.direct_announce
        out.append(Verdict("info", "direct", f"direct plane announced as {h}:{p} ({classify(h)}); make it forward to "
                                             f"--direct-port {facts.direct_port or '(fix it: 0 picks a new port)'}"))
    elif facts.announce:
        out.append(Verdict("warn", "direct", "--announce without --direct-announce: the direct plane still announces "
                                             "its bound address (clients that cannot dial it fall back to slower "
                                             "libp2p); pass --direct-announce HOST:PORT with a fixed --direct-port"))
    elif kind != "loopback":
        dport = f"port {facts.direct_port}" if facts.direct_port else "port 0 (fix it with --direct-port to forward it)"
        out.append(Verdict("info", "direct", f"direct plane on {facts.host} {dport}, announced as bound"))
    return out


def _mdns(facts: DoctorFacts) -> Verdict:
    if not facts.mdns:
        return Verdict("info", "mdns", "off (--no-mdns): peers need --initial-peers")
    if not facts.zeroconf:
        return Verdict("warn", "mdns", "unusable: the zeroconf package is not importable; pass --initial-peers")
    lan = [i for i in facts.interfaces if i.up and i.multicast and classify(i.address) in ("private", "public",
                                                                                           "link-local")]
    if not lan:
        return Verdict("warn", "mdns", "unusable: no up, multicast-capable, non-loopback interface; pass "
                                       "--initial-peers")
    names = ", ".join(dict.fromkeys(i.name for i in lan))
    if classify(facts.host) == "loopback":
        return Verdict("info", "mdns", f"usable on {names}, but a server bound to loopback neither advertises nor "
                                       "browses; clients still browse")
    found = "" if facts.mdns_found is None else f"; found {facts.mdns_found} meshinfer peer(s) on this LAN"
    return Verdict("ok", "mdns", f"usable on {names}{found}")


def _peers(facts: DoctorFacts) -> list[Verdict]:
    if not facts.initial_peers:
        return [Verdict("info", "initial peers", "none given: a server would join by mDNS or start a new swarm")]
    out: list[Verdict] = []
    for peer in facts.initial_peers:
        if peer.rtt_s is not None:
            out.append(Verdict("ok", "initial peer", f"{peer.maddr} answered in {peer.rtt_s * 1000:.1f} ms"))
        else:
            out.append(Verdict("fail", "initial peer", f"{peer.maddr} unreachable: {peer.error or 'no answer'}; "
                                                       "check the address, the peer and any firewall"))
    if facts.joined is False:
        out.append(Verdict("fail", "swarm", f"cannot join the swarm: {facts.join_error or 'no initial peer answered'}"))
    elif facts.joined:
        out.append(Verdict("ok", "swarm", "joined the DHT as a client through the initial peers"))
    if facts.visible:
        out.append(Verdict("info", "libp2p", "a temporary node with these flags announced " + ", ".join(facts.visible)))
    return out


def _inbound(facts: DoctorFacts) -> Verdict:
    where = ", ".join(facts.dialback_addresses)
    who = facts.dialback_peer[:16]
    if facts.dialback_peer and facts.dialback_reached:
        return Verdict("ok", "inbound", f"peer {who}... dialled this machine back on the direct plane at {where} "
                                        "(the libp2p plane is not dialled back)")
    if facts.dialback_peer and facts.dialback_reached is False:
        return Verdict("warn", "inbound", f"peer {who}... could NOT dial this machine back at {where}: open or "
                                          "forward that port (a fixed --direct-port) or pass --direct-announce "
                                          "HOST:PORT; clients would fall back to slower libp2p")
    why = facts.dialback_note or "no initial peer answered, so no peer could dial this machine back"
    return Verdict("info", "inbound", f"not checked: {why}; whether OTHERS can reach this machine is unknown")


def verdicts(facts: DoctorFacts) -> list[Verdict]:
    """All verdicts, in screen order: interfaces, bind/announce, mDNS, initial peers, inbound."""
    return [*_interfaces(facts), *_bind(facts), _mdns(facts), *_peers(facts), _inbound(facts)]


def exit_code(found: Sequence[Verdict]) -> int:
    """1 when any verdict failed, else 0."""
    return 1 if any(v.level == "fail" for v in found) else 0
