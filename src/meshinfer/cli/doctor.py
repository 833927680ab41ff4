"""``meshinfer doctor``: one screen telling a new peer whether and how it can join a swarm and be reached.

Contract: gathers facts, then prints the verdicts of ``meshinfer.p2p.reachability.verdicts`` (pure) one per line,
or with ``--json`` one JSON object (``facts`` and ``verdicts``). Facts: this machine's interface addresses (``ifaddr``)
and their kinds; what it would bind and announce (the ``P2PConfig`` flags serve and dht take, validated the same
way); whether mDNS is usable (zeroconf importable, an up multicast-capable non-loopback interface); and, with
``--initial-peers`` (or, without them and mDNS on, the peers found on the LAN), whether they answer: it starts a
temporary client-mode node (a free port, no mDNS advert), joins the DHT and pings each peer (round trip); then
whether OTHERS can reach it: it listens on the direct plane as a server would (``--host``, ``--direct-port``,
``--direct-announce``) and asks the first peer that answered to dial it back (``meshinfer.p2p.dialback``; the
libp2p plane is not dialled back, and a peer of an older version does not offer it: the screen says so).
Exit 0 when nothing failed, 1 when a check failed (an unreachable initial peer), 2 for bad flags. Network code is
imported only when the command runs; no hivemind or zeroconf import here.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import ipaddress
import json
import sys
from pathlib import Path

from meshinfer.cli.args import add_command
from meshinfer.cli.common import add_config_flags, config_from_args
from meshinfer.config import P2PConfig
from meshinfer.errors import ConfigError, MeshinferError
from meshinfer.p2p.reachability import DoctorFacts, Interface, PeerCheck, exit_code, verdicts

NOT_DOCTOR_FLAGS = ("identity", "max_streams", "max_streams_per_peer", "max_buffer_mb",
                    "max_buffer_mb_per_peer", "max_handshakes")
"""``P2PConfig`` fields that change nothing the doctor checks (no flag for them)."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub, "doctor", run, help="check whether this machine can join a swarm and be reached, and how",
        description="For a new peer: list this machine's addresses (loopback, private, public), what a server "
                    "started with the same flags would bind and announce, whether mDNS works here, and whether "
                    "the --initial-peers answer (joins the DHT as a client for a moment). Exit 1 when a check fails.",
    )
    add_config_flags(parser, P2PConfig, skip=NOT_DOCTOR_FLAGS)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the screen")
    parser.add_argument("--timeout", type=float, default=15.0, metavar="S",
                        help="seconds to wait for each initial peer (default: 15)")


_IFF_UP = 0x1
_IFF_MULTICAST = 0x1000


def _flags(name: str) -> int | None:
    """The kernel's flags of interface ``name`` (Linux ``/sys/class/net``), None where unknown."""
    try:
        return int(Path("/sys/class/net", name, "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def interfaces() -> tuple[Interface, ...]:
    """This machine's interface addresses (IPv4 and IPv6, by ``ifaddr``, a dependency of zeroconf), with up and
    multicast flags (read on Linux; assumed elsewhere)."""
    import ifaddr  # pyright: ignore[reportMissingTypeStubs]

    out: list[Interface] = []
    for adapter in sorted(ifaddr.get_adapters(), key=lambda a: str(a.name)):
        name = str(adapter.name)
        flags = _flags(name)
        up = True if flags is None else bool(flags & _IFF_UP)
        multicast = name != "lo" if flags is None else bool(flags & _IFF_MULTICAST)
        for ip in adapter.ips:
            address = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            out.append(Interface(name, str(address).split("%")[0], up=up, multicast=multicast))
    return tuple(out)


@dataclasses.dataclass
class PeerResults:
    joined: bool
    join_error: str = ""
    checks: tuple[PeerCheck, ...] = ()
    visible: tuple[str, ...] = ()
    dialback: tuple[str, tuple[str, ...], bool | None, str] = ("", (), None, "")


async def check_peers(config: P2PConfig, peers: tuple[str, ...], timeout: float) -> PeerResults:
    """Join through ``peers`` as a client, ping each, and ask the first that answered to dial this machine back."""
    from meshinfer.p2p.dialback import ask_dialback
    from meshinfer.p2p.node import NodeSettings, PeerNode

    # Outbound only: a free port (a peer may already run on --port), the announce flags as given (their ports).
    probe = dataclasses.replace(config, initial_peers=peers, mdns=False, identity=None, port=0, direct=False,
                                direct_announce=None, announce=config.announce_maddrs)
    try:
        node = await PeerNode.start(probe, NodeSettings(client_mode=True, startup_timeout=timeout))
    except MeshinferError as err:
        return PeerResults(False, str(err), tuple(PeerCheck(m, None, "did not answer the DHT join") for m in peers))
    try:
        checks: list[PeerCheck] = []
        for maddr in peers:
            peer_id = maddr.rsplit("/p2p/", 1)[-1]
            rtt = await node.ping(peer_id, [maddr], timeout=timeout)
            checks.append(PeerCheck(maddr, rtt, "" if rtt is not None else f"no DHT ping answer in {timeout:g} s"))
        answered = [c.maddr.rsplit("/p2p/", 1)[-1] for c in checks if c.rtt_s is not None]
        dialback: tuple[str, tuple[str, ...], bool | None, str] = ("", (), None, "")
        if not config.direct:
            dialback = ("", (), None, "--no-direct: no direct plane to dial back")
        elif answered:
            addresses, reached, note = await ask_dialback(
                node.identity, config, answered[0], lambda pid, proto: node.open_stream(pid, proto, timeout=timeout),
                node.maddrs, timeout=timeout)
            dialback = (answered[0], tuple(addresses), reached, note)
        return PeerResults(True, "", tuple(checks), tuple(node.maddrs), dialback)
    finally:
        await node.close()


def run(args: argparse.Namespace) -> int:
    config = config_from_args(P2PConfig, args)
    try:
        ipaddress.ip_address(config.host)
    except ValueError:
        raise ConfigError(f"--host must be an IP address, got {config.host!r}") from None
    peers = tuple(config.initial_peers)
    zeroconf = importlib.util.find_spec("zeroconf") is not None
    mdns_found: int | None = None
    if not peers and config.mdns and zeroconf:
        from meshinfer.cli.lan import lan_peers

        peers = lan_peers(args, required=False, note=False)
        mdns_found = len({m.rsplit("/p2p/", 1)[-1] for m in peers})
    results = asyncio.run(check_peers(config, peers, args.timeout)) if peers else None
    facts = DoctorFacts(interfaces=interfaces(), host=config.host, port=config.port, announce=config.announce_maddrs,
                        direct_announce=config.direct_announce_address, direct_port=config.direct_port,
                        mdns=config.mdns, zeroconf=zeroconf, mdns_found=mdns_found)
    if results is not None:
        peer, addresses, reached, note = results.dialback
        facts = dataclasses.replace(facts, initial_peers=results.checks, joined=results.joined,
                                    join_error=results.join_error, visible=results.visible, dialback_peer=peer,
                                    dialback_addresses=addresses, dialback_reached=reached, dialback_note=note)
    found = verdicts(facts)
    if args.json:
        print(json.dumps({"facts": dataclasses.asdict(facts), "verdicts": [dataclasses.asdict(v) for v in found],
                          "ok": exit_code(found) == 0}, indent=2))
    else:
        sys.stdout.write("".join(v.line() + "\n" for v in found))
    sys.stdout.flush()
    return exit_code(found)
