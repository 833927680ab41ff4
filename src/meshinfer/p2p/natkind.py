"""NAT traversal decisions: which relay options a peer runs with, how reachable a server is, when to skip a direct dial.

Contract: pure code, no network, no hivemind (callers gather the facts: the bind, the role, the addresses libp2p
announces, how direct dials went). It knows the libp2p daemon's relay model (circuit relay v2: a peer behind NAT
reserves a slot on a relay and announces ``<relay addr>/p2p-circuit``; a relay "hop" serves such circuits) but never
talks to the daemon.

- ``relay_options``: ``RelayOptions`` for a peer: use relays (dial through them; AutoRelay for a non-client peer that
  could be behind NAT) and serve as a relay hop (``--relay-hop``; default on for servers and DHT peers bound to a
  non-loopback address or with announced addresses, off on loopback and for clients).
- ``reachability``: what a server announces in ``ServerRecord.reachability``: ``relayed`` when its libp2p addresses
  contain a circuit address and no public direct one (others reach it only through a relay), ``hole-punched`` when
  a relayed peer also confirmed a direct path (p2pd hole-punches with DCUtR when ``-autonat`` is on, but its API
  does not say which connections were upgraded, so today no caller confirms one), else ``public``. Records of older
  servers decode as ``public``.
- ``relayed_hop_penalty_s``: the extra seconds per token the route planner charges an unmeasured relayed hop.
- ``DirectFailures``: after a direct-plane dial to a peer failed (refused, timed out), streams to that peer go over
  libp2p (relayed if need be) for ``retry_s`` seconds without trying the direct plane again; the first failure of a
  peer is logged once (the caller logs when ``note_failure`` returns True).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from meshinfer.p2p.reachability import classify, maddr_host

Reachability = Literal["public", "hole-punched", "relayed"]
REACHABILITY_KINDS: Final[tuple[Reachability, ...]] = ("public", "hole-punched", "relayed")

RELAYED_HOP_PENALTY_S: Final = 0.05
"""Seconds per token added to an unmeasured relayed hop: a relay adds a round trip to it and caps its bandwidth
(what the client later measures replaces the guess)."""

DIRECT_RETRY_S: Final = 60.0
"""How long a peer whose direct plane could not be dialled is reached over libp2p only."""

MAX_REMEMBERED_PEERS: Final = 1024


@dataclass(frozen=True)
class RelayOptions:
    """The relay settings one libp2p daemon starts with."""

    use_relay: bool
    """Dial peers through circuit relays (p2pd ``-relay``)."""
    auto_relay: bool
    """Reserve a slot on a relay when AutoNAT finds this peer unreachable (p2pd ``-autoRelay``)."""
    relay_hop: bool
    """Serve circuits for other peers (p2pd ``-relayService``)."""


def relay_options(*, relay: bool, relay_hop: bool | None, client_mode: bool, loopback: bool,
                  announced: bool) -> RelayOptions:
    """The relay options of a peer: ``relay``/``relay_hop`` are the flags (``relay_hop`` None: the default)."""
    if not relay:
        return RelayOptions(use_relay=False, auto_relay=False, relay_hop=False)
    if relay_hop is None:
        relay_hop = not client_mode and (announced or not loopback)
    return RelayOptions(use_relay=True, auto_relay=not client_mode and not loopback, relay_hop=relay_hop)


def is_circuit(maddr: str) -> bool:
    """Whether ``maddr`` reaches its peer through a relay (``.../p2p-circuit...``)."""
    return "/p2p-circuit" in maddr


def reachability(maddrs: Sequence[str], *, direct_confirmed: bool = False) -> Reachability:
    """How others reach a server announcing libp2p ``maddrs`` (see the module docstring)."""
    circuits = [m for m in maddrs if is_circuit(m)]
    if not circuits:
        return "public"
    if any(classify(maddr_host(m) or "") == "public" for m in maddrs if not is_circuit(m)):
        return "public"
    return "hole-punched" if direct_confirmed else "relayed"


def relayed_hop_penalty_s(kind: str) -> float:
    """Extra seconds per token of a hop on a server of reachability ``kind`` (unknown kinds count as relayed)."""
    if kind in ("public", "hole-punched"):
        return 0.0
    return RELAYED_HOP_PENALTY_S


class DirectFailures:
    """Peers whose direct plane recently failed to dial: skip it for them, over libp2p instead (see module doc)."""

    def __init__(self, retry_s: float = DIRECT_RETRY_S, max_peers: int = MAX_REMEMBERED_PEERS) -> None:
        self.retry_s = retry_s
        self.max_peers = max_peers
        self._failed_at: OrderedDict[str, float] = OrderedDict()

    def should_try_direct(self, peer_id: str, now: float) -> bool:
        failed = self._failed_at.get(peer_id)
        return failed is None or now - failed >= self.retry_s

    def note_failure(self, peer_id: str, now: float) -> bool:
        """Remember a failed dial; True when it is news (not failed within ``retry_s``): log it then."""
        news = self.should_try_direct(peer_id, now)
        self._failed_at.pop(peer_id, None)
        self._failed_at[peer_id] = now
        while len(self._failed_at) > self.max_peers:
            self._failed_at.popitem(last=False)
        return news

    def note_success(self, peer_id: str) -> None:
        self._failed_at.pop(peer_id, None)
