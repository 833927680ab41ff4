"""Client commands without ``--initial-peers``: find the swarm on this LAN by mDNS.

Contract: ``add_mdns_flags`` adds ``--mdns/--no-mdns`` and ``--mdns-browse-s`` (the ``P2PConfig`` fields, same help)
to commands that do not take every ``P2PConfig`` flag (generate, chat, api). ``lan_peers`` returns the multiaddrs to
join: ``--initial-peers`` when given, else (mDNS on) those of the peers found on the LAN within the browse time
(``meshinfer.p2p.discovery.find_lan_peers``, imported only then), else nothing; with ``required`` finding nobody is
a one-line ``TransportError`` (``lanpeers.no_peers_message``), and with mDNS off it is today's "--initial-peers is
required" ``ConfigError``. Prints one line on stderr saying what it found. No hivemind or zeroconf import here.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from meshinfer.cli.common import require
from meshinfer.config import P2PConfig, field_help
from meshinfer.errors import TransportError


def add_mdns_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    defaults = P2PConfig()
    parser.add_argument("--mdns", action=argparse.BooleanOptionalAction, default=defaults.mdns,
                        help=field_help(P2PConfig, "mdns") + f" (default: {defaults.mdns})")
    parser.add_argument("--mdns-browse-s", type=float, default=defaults.mdns_browse_s, metavar="S",
                        help=field_help(P2PConfig, "mdns_browse_s") + f" (default: {defaults.mdns_browse_s:g})")


def lan_peers(args: argparse.Namespace, *, required: bool, note: bool = True) -> tuple[str, ...]:
    """Where to join the swarm: ``--initial-peers``, else the peers mDNS finds (see the module doc); ``note``:
    say on stderr when nobody was found and the command runs on this machine instead."""
    given = tuple(getattr(args, "initial_peers", None) or ())
    if given:
        return given
    mdns = bool(getattr(args, "mdns", True))
    browse_s = float(getattr(args, "mdns_browse_s", P2PConfig().mdns_browse_s))
    if not mdns:
        require(not required, "--initial-peers is required: the multiaddr of any peer of the swarm "
                              "(or drop --no-mdns to find peers on this LAN)")
        return ()
    P2PConfig(mdns_browse_s=browse_s)  # validates --mdns-browse-s (one-line ConfigError)
    from meshinfer.p2p.discovery import find_lan_peers
    from meshinfer.p2p.lanpeers import join_maddrs, no_peers_message
    from meshinfer.p2p.membership import swarm_label

    try:
        found = asyncio.run(find_lan_peers(browse_s, swarm=swarm_label(getattr(args, "swarm_key", None),
                                                                         getattr(args, "swarm_allow", None))))
    except TransportError:
        if required:
            raise
        found = []
    if not found:
        if required:
            raise TransportError(no_peers_message(browse_s))
        if note:
            print(f"note: {no_peers_message(browse_s)}; running on this machine", file=sys.stderr, flush=True)
        return ()
    print(f"found {len(found)} meshinfer peer(s) on this LAN by mDNS: {', '.join(p.peer_id[:16] for p in found)}",
          file=sys.stderr, flush=True)
    return join_maddrs(found)

