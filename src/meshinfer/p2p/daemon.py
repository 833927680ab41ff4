"""The libp2p daemon (hivemind's ``P2P`` around the go ``p2pd``): start it so it never outlives us.

Contract: ``start_p2p`` launches ``p2pd`` for one ``Identity`` listening on host:port and joins through
``initial_peers``, announcing ``announce`` instead of what it binds when given; it maps hivemind's failures to
meshinfer errors (``PeerIdentityError`` when the identity is live elsewhere, ``TransportError`` when the
daemon cannot start or listen or no initial peer answers, ``ConfigError`` for bad multiaddrs). No orphans:
every ``p2pd`` this process starts gets ``PR_SET_PDEATHSIG`` (SIGTERM when its parent dies, even by SIGKILL), on
top of p2pd's own exit when its control connection drops; it runs in its own session, so terminal signals reach
only us and we stop it in order. That is done by giving hivemind's daemon module a view of ``asyncio`` whose
``subprocess.create_subprocess_exec`` adds a ``preexec_fn``; nothing else in the process is touched. Only
``meshinfer.p2p`` uses this module.

NAT traversal (``relay``: ``meshinfer.p2p.natkind.RelayOptions``): hivemind's ``P2P.create`` passes ``use_relay``
(p2pd ``-relay``), ``use_auto_relay`` (``-autoRelay``: reserve a slot on a relay, by default the bootstrap peers, when
AutoNAT finds this peer private, or at once with ``force_reachability="private"``: ``--nat private``), ``auto_nat``
and ``nat_port_map`` (UPnP/NAT-PMP); its ``use_relay_hop`` and
``relay_hop_limit`` have no effect since libp2p 0.17. p2pd serves as a relay hop by default (``-relayService``, not
exposed by hivemind): the same ``asyncio`` view appends ``-relayService=0`` to the p2pd command line of a daemon that
must not relay (p2pd still answers circuit requests with libp2p's default, tightly limited relay: 2 min and 128 KiB
per circuit). An AutoRelay peer with initial peers uses them as its relays (``trusted_relays`` and
``-relayDiscovery=0``: static relays are used at once, discovered ones only after a 3-minute boot delay). p2pd's
``-autonat`` also turns on hole punching (DCUtR): a peer reached through a relay may upgrade to a direct connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import ipaddress
import logging
import os
import signal
import sys
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# isort: split
from meshinfer.p2p import _hivemind_logging  # noqa: F401 - first: before hivemind is imported

# isort: split
import hivemind.p2p.p2p_daemon as _hm_daemon
from hivemind.p2p import P2P, P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr

from meshinfer.errors import ConfigError, PeerIdentityError, TransportError
from meshinfer.p2p.identity import Identity, write_identity
from meshinfer.p2p.natkind import RelayOptions
from meshinfer.p2p.reachability import maddr_host

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec: keep it minimal
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class _SubprocessView:
    """``asyncio.subprocess`` as hivemind's daemon module sees it: children die with their parent."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio.subprocess, name)

    async def create_subprocess_exec(self, *args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        args = (*args, *_EXTRA_P2PD_ARGS.get())
        kwargs.setdefault("preexec_fn", _die_with_parent(os.getpid()))
        # Its own session: a terminal's Ctrl-C (sent to the whole foreground group) reaches only us,
        # and we stop the daemon in order instead of racing it.
        kwargs.setdefault("start_new_session", True)
        return await asyncio.subprocess.create_subprocess_exec(*args, **kwargs)


_EXTRA_P2PD_ARGS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("p2pd_args", default=())
"""p2pd flags hivemind does not expose, for the daemon started in this context (see the module docstring)."""


class _AsyncioView(types.ModuleType):
    subprocess = _SubprocessView()

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


def install_parent_death_signal() -> None:
    """Make every p2pd started through hivemind from now on die with this process (idempotent)."""
    if not isinstance(_hm_daemon.asyncio, _AsyncioView):
        _hm_daemon.asyncio = _AsyncioView("asyncio")


def parse_maddrs(maddrs: Sequence[str], *, what: str = "initial peer") -> list[str]:
    """Validate multiaddrs of peers (each must end in /p2p/<peer id>); return them normalised."""
    out = []
    for text in maddrs:
        try:
            ma = Multiaddr(text)
            ma["p2p"]
        except Exception:
            raise ConfigError(
                f"invalid {what} multiaddr {text!r}; expected e.g. /ip4/1.2.3.4/tcp/31337/p2p/Qm..."
            ) from None
        out.append(str(ma))
    return out


def host_maddr(host: str, port: int) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--host must be an IP address, got {host!r}") from None
    return f"/ip{ip.version}/{host}/tcp/{port}"


async def start_p2p(
    identity: Identity,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    initial_peers: Sequence[str] = (),
    client_mode: bool = False,
    check_identity: bool = True,
    startup_timeout: float = 20.0,
    announce: Sequence[str] = (),
    relay: RelayOptions | None = None,
    nat: str = "auto",
) -> P2P:
    """Start p2pd for ``identity``; with ``initial_peers``, refuse an identity already live there. ``announce``
    (multiaddrs without ``/p2p``) replaces the bound addresses in what the daemon tells others. ``relay``: the NAT
    traversal options (default: relays used, AutoRelay off, no relay hop); ``nat``: ``auto`` (AutoNAT decides),
    ``private`` or ``public`` (p2pd ``-forceReachabilityPrivate``/``Public``)."""
    relay = relay or RelayOptions(use_relay=True, auto_relay=False, relay_hop=False)
    install_parent_death_signal()
    peers = parse_maddrs(initial_peers)
    listen = host_maddr(host, port)
    loopback = ipaddress.ip_address(host).is_loopback
    tmpdir: str | None = None
    if identity.path is not None:
        key_path = str(identity.path)
    else:  # p2pd reads its key from a file: a private temporary one, removed once it started
        tmpdir = tempfile.mkdtemp(prefix="meshinfer-key-")
        key_path = str(Path(tmpdir) / "identity.key")
        write_identity(identity, key_path)
        check_identity = False
    try:
        if check_identity and peers:
            await _refuse_taken_identity(identity, key_path, peers)
        # AutoRelay reserves on the initial peers (static relays: at once, not after discovery's 3-minute boot delay)
        static_relays = relay.auto_relay and bool(peers)
        extra = ("-relayService=0",) if not relay.relay_hop else ()
        token = _EXTRA_P2PD_ARGS.set(extra + (("-relayDiscovery=0",) if static_relays else ()))
        try:
            return await P2P.create(
                initial_peers=peers or None,
                host_maddrs=[listen],
                announce_maddrs=list(announce) or None,
                identity_path=key_path,
                check_if_identity_free=False,  # checked above, with retries
                dht_mode="client" if client_mode else "server",
                nat_port_map=not loopback,
                auto_nat=not loopback,
                use_relay=relay.use_relay,
                use_auto_relay=relay.auto_relay,
                force_reachability=None if nat == "auto" else nat,
                trusted_relays=peers if static_relays else None,
                startup_timeout=startup_timeout,
            )
        finally:
            _EXTRA_P2PD_ARGS.reset(token)
    except P2PDaemonError as err:
        text = str(err)
        if "bootstrap" in text:
            raise TransportError(f"cannot reach any initial peer ({', '.join(peers)})") from None
        if "already taken" in text:
            raise PeerIdentityError(
                f"identity {identity.peer_id} is already in use by a live peer of this swarm"
            ) from None
        # p2pd exits when no bootstrap peer answers, but hivemind reports only its LAST output line, and a log line
        # of another goroutine can land after the fatal one: ask the initial peers ourselves
        if peers and text.startswith(_DAEMON_EXITED) and not await any_tcp_answers(peers):
            raise TransportError(f"cannot reach any initial peer ({', '.join(peers)})") from None
        raise TransportError(f"cannot start the p2p daemon on {listen}: {text[:300]}") from None
    finally:
        if tmpdir is not None:
            with contextlib.suppress(OSError):
                os.remove(key_path)
            with contextlib.suppress(OSError):
                os.rmdir(tmpdir)


_DAEMON_EXITED = "Daemon failed to start:"
"""How hivemind words a p2pd that exited before it was ready (followed by its last output line)."""


async def any_tcp_answers(maddrs: Sequence[str], timeout: float = 3.0) -> bool:
    """Whether any of ``maddrs`` (``/ip4|ip6|dns*/<host>/tcp/<port>/...``) accepts a TCP connection within
    ``timeout`` seconds (addresses without a TCP host and port count as not answering)."""

    async def answers(text: str) -> bool:
        host = maddr_host(text)
        try:
            if host is None:
                return False
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(Multiaddr(text)["tcp"])), timeout)
        except Exception:
            return False
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True

    return any(await asyncio.gather(*(answers(m) for m in maddrs)))


IDENTITY_CHECK_ATTEMPTS = 3
"""A lookup through freshly joined libp2p routing can miss a live peer; a few tries make misses rare."""


async def _refuse_taken_identity(identity: Identity, key_path: str, peers: Sequence[Any]) -> None:
    """Raise PeerIdentityError if a live peer of the swarm already uses ``identity`` (best effort)."""
    for attempt in range(IDENTITY_CHECK_ATTEMPTS):
        try:
            taken = await P2P.is_identity_taken(
                key_path, initial_peers=peers, tls=True, use_auto_relay=False, use_ipfs=False, use_relay=True,
            )
        except P2PDaemonError as err:
            if "bootstrap" in str(err):
                raise TransportError(f"cannot reach any initial peer ({', '.join(map(str, peers))})") from None
            raise TransportError(f"cannot check identity {identity.peer_id}: {str(err)[:300]}") from None
        if taken:
            raise PeerIdentityError(f"identity {identity.peer_id} is already in use by a live peer of this swarm")
        if attempt + 1 < IDENTITY_CHECK_ATTEMPTS:
            await asyncio.sleep(0.5)


async def stop_p2p(p2p: P2P, timeout: float = 5.0) -> None:
    """Shut the daemon down; kill it if it does not exit within ``timeout`` seconds."""
    child = getattr(p2p, "_child", None)
    try:
        await asyncio.wait_for(p2p.shutdown(), timeout)
    except TimeoutError:
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
    except Exception:
        log.debug("p2p shutdown failed", exc_info=True)


def daemon_pid(p2p: P2P) -> int | None:
    child = getattr(p2p, "_child", None)
    return None if child is None else child.pid
