"""Zero-config LAN discovery: advertise this peer and browse for others by mDNS/DNS-SD (``zeroconf``).

Contract: the only module that touches multicast DNS. ``LanDiscovery.start()`` opens one asyncio zeroconf on every
IPv4 interface and browses ``lanpeers.SERVICE_TYPE``; each advertisement found is resolved and decoded with the
bounded, pure ``lanpeers.decode_txt`` (malformed ones are ignored) into ``found`` (peer id -> ``LanPeer``,
the latest advertisement), and handed to ``on_found`` (when set) once per peer id. ``wait_for_peers``
waits until a joinable peer of our swarm is found or ``seconds`` pass. ``advertise`` publishes one
``LanPeer`` (the addresses the peer really listens on). ``close`` unregisters and stops (idempotent, never
raises). ``find_lan_peers`` is a one-shot browse for clients (they are not advertised: they serve nothing).
What to join, and the client's "nobody found" line, are decided in ``lanpeers``; joining (dialling,
the DHT) is ``PeerNode``'s. No hivemind import here. The private-swarm hook: ``swarm`` (a name) is advertised and
only peers of the same name are joined: "" for public swarms, a private swarm's public key id
(``membership.swarm_label``) otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshinfer.errors import TransportError
from meshinfer.p2p.lanpeers import SERVICE_TYPE, LanPeer, decode_txt, encode_txt, pick_join

log = logging.getLogger(__name__)

GRACE_S = 0.5
"""After the first peer answers a browse, how long to wait for the others (mDNS responders answer within
about 20-120 ms of a query, plus the LAN's delay)."""

RESOLVE_TIMEOUT_MS = 3000
"""How long resolving one found service (its TXT and address) may take."""

OnFound = Callable[[LanPeer], Awaitable[None]]


class LanDiscovery:
    """One process's mDNS presence: a browser (always) and at most one advertisement."""

    def __init__(self, azc: AsyncZeroconf, swarm: str = "") -> None:
        self._azc = azc
        self.swarm = swarm
        self.found: dict[str, LanPeer] = {}
        """Every meshinfer peer seen on the LAN (by peer id; the latest advertisement)."""
        self.on_found: OnFound | None = None
        self._notified: set[str] = set()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._info: AsyncServiceInfo | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._closed = False

    @classmethod
    async def start(cls, swarm: str = "") -> LanDiscovery:
        """Start browsing on every IPv4 interface (TransportError when multicast sockets cannot be opened)."""
        try:
            azc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        except Exception as err:
            raise TransportError(f"cannot start mDNS discovery: {type(err).__name__}: {str(err)[:200]}; "
                                 "pass --no-mdns and --initial-peers") from None
        self = cls(azc, swarm)
        self._browser = AsyncServiceBrowser(azc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change])
        return self

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if self._closed or state_change is ServiceStateChange.Removed:
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        try:
            if not await info.async_request(self._azc.zeroconf, RESOLVE_TIMEOUT_MS):
                return
        except Exception:
            log.debug("resolving %s failed", name, exc_info=True)
            return
        peer = decode_txt(info.properties or {})
        if peer is None:
            log.debug("ignoring a malformed meshinfer advertisement %s", name)
            return
        self.found[peer.peer_id] = peer
        self._changed.set()
        if self.on_found is not None and peer.peer_id not in self._notified:
            self._notified.add(peer.peer_id)
            try:
                await self.on_found(peer)
            except Exception:
                log.warning("joining LAN peer %s failed", peer.peer_id[:16], exc_info=True)

    def set_on_found(self, callback: OnFound) -> None:
        """Call ``callback`` for every peer found from now on, and (in the background) for those found so far."""
        self.on_found = callback
        for peer in list(self.found.values()):
            if peer.peer_id not in self._notified:
                self._notified.add(peer.peer_id)
                task = asyncio.get_running_loop().create_task(self._notify(callback, peer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _notify(callback: OnFound, peer: LanPeer) -> None:
        try:
            await callback(peer)
        except Exception:
            log.warning("joining LAN peer %s failed", peer.peer_id[:16], exc_info=True)

    async def wait_for_peers(self, seconds: float, *, own_peer_id: str | None = None,
                             grace: float = GRACE_S) -> list[LanPeer]:
        """The joinable peers of our swarm found within ``seconds``: returns ``grace`` seconds after the first one
        answers (the others on the LAN answer the same query within that), or at ``seconds`` with none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            peers = pick_join(self.found.values(), own_peer_id=own_peer_id, swarm=self.swarm)
            if peers:
                deadline = min(deadline, loop.time() + grace)
                grace = math.inf  # the grace starts once, at the first answer
            left = deadline - loop.time()
            if left <= 0:
                return pick_join(self.found.values(), own_peer_id=own_peer_id, swarm=self.swarm)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def advertise(self, peer: LanPeer) -> None:
        """Publish ``peer`` on the LAN (its first IPv4 multiaddr gives the service's address and port)."""
        host, port = _first_ip4(peer.maddrs)
        if host is None:
            log.debug("no IPv4 address to advertise for %s", peer.peer_id)
            return
        info = AsyncServiceInfo(SERVICE_TYPE, f"{peer.peer_id}.{SERVICE_TYPE}", port=port,
                                properties=encode_txt(peer), server=f"{peer.peer_id.lower()}.local.",
                                addresses=[ipaddress.ip_address(host).packed])
        try:
            await self._azc.async_register_service(info, allow_name_change=True)
        except Exception as err:
            log.warning("cannot advertise this peer by mDNS: %s", str(err)[:200])
            return
        self._info = info
        log.info("advertising %s on the LAN by mDNS (%s)", peer.peer_id[:16], ", ".join(peer.maddrs))

    async def close(self) -> None:
        """Stop advertising and browsing (idempotent, never raises)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                if self._browser is not None:
                    await self._browser.async_cancel()
                if self._info is not None:
                    await self._azc.async_unregister_service(self._info)
                await self._azc.async_close()


def _first_ip4(maddrs: tuple[str, ...]) -> tuple[str | None, int]:
    """The first non-loopback IPv4 address and TCP port of ``maddrs`` (else the first loopback one)."""
    found: list[tuple[str, int]] = []
    for text in maddrs:
        parts = text.split("/")
        if len(parts) > 4 and parts[1] == "ip4" and parts[3] == "tcp" and parts[4].isdigit():
            found.append((parts[2], int(parts[4])))
    found.sort(key=lambda hp: ipaddress.ip_address(hp[0]).is_loopback)
    return found[0] if found else (None, 0)


async def find_lan_peers(seconds: float, *, swarm: str = "") -> list[LanPeer]:
    """Browse the LAN for up to ``seconds``: the joinable peers of ``swarm`` found (empty when none)."""
    lan = await LanDiscovery.start(swarm)
    try:
        return await lan.wait_for_peers(seconds)
    finally:
        await lan.close()
