"""The libp2p side of private swarms: the join check and the membership preamble of every stream.

Contract: the part of ``PeerNode`` (``meshinfer.p2p.node``) that applies ``meshinfer.p2p.membership`` to libp2p:

- ``MEMBER_PROTOCOL`` (served raw by every node, public ones included, outside ``Admission``: one exchange of at
  most 57 + 514 bytes within 5 s, ``MAX_CHECKS_AT_ONCE`` at once): the opener writes a preamble
  (``SwarmKey.preamble``, or ``public_preamble`` without a key); the listener answers ``[u16 length][reason]``, an
  empty reason meaning "same swarm". ``check_join`` runs it against the initial peers before a node joins their
  DHT, so a peer without the key, with another key, or a member pointed at a public swarm stops at once with a
  one-line ``ConfigError`` (never a hang: every step is bounded by ``timeout``). Peers that do not answer are
  skipped (the DHT bootstrap then says none answered).
- ``read_preamble``: what a private node's stream handler runs before dispatching: the first byte of an
  outsider's stream is a frame's, so it is refused at once; a member's 57 bytes are checked against both peer ids
  and the protocol. It returns the refusal ("" when admitted); ``admit`` sends it as a typed ``Error`` and closes.

It knows nothing of sessions, records or models; hivemind only through the daemon handle it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Sequence

# isort: split
from meshinfer.p2p import _hivemind_logging  # noqa: F401 - first: before hivemind is imported

# isort: split
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from meshinfer.errors import ConfigError, MeshinferError
from meshinfer.p2p.admission import RefusalLog
from meshinfer.p2p.allowlist import AllowList
from meshinfer.p2p.membership import (
    ALLOW_KEY_ID,
    MAC_BYTES,
    NONCE_BYTES,
    PREAMBLE_BYTES,
    PREAMBLE_MAGIC,
    PUBLIC_KEY_ID,
    SwarmKey,
    preamble_key_id,
    refusal,
)
from meshinfer.p2p.stream import MessageStream
from meshinfer.wire.messages import Error, ErrorCode

log = logging.getLogger(__name__)

MEMBER_PROTOCOL = "/meshinfer/member/1"
MAX_REASON_BYTES = 512
MAX_CHECKS_AT_ONCE = 32
"""Membership checks a node answers at once (each holds at most ``timeout`` seconds); more are closed unanswered."""
JOIN_CHECK_PEERS = 3
"""At most this many initial peers are asked (the first that answers decides)."""


def public_preamble(key_id: bytes = PUBLIC_KEY_ID) -> bytes:
    """What a peer without a swarm key sends where a preamble is expected: "public swarm", or with ``ALLOW_KEY_ID``
    "an allow-list swarm" (its peer id, authenticated by libp2p, is what counts then)."""
    return bytes([PREAMBLE_MAGIC]) + key_id + b"\x00" * (NONCE_BYTES + MAC_BYTES)


def allow_verdict(allow: AllowList, data: bytes, opener: str) -> str:
    """Why a node of an allow-list swarm refuses a join check from ``opener`` ("" when admitted)."""
    if len(data) < 1 or data[0] != PREAMBLE_MAGIC or preamble_key_id(data) != ALLOW_KEY_ID:
        return "this swarm is private: join it with --swarm-allow FILE (its owner's allow-list)"
    return allow.refusal(opener)


def verdict(key: SwarmKey | None, data: bytes, protocol: str, opener: str, listener: str) -> str:
    """Why a node with ``key`` refuses a stream that began with ``data`` ("" when the opener is of its swarm)."""
    if len(data) < 1 or data[0] != PREAMBLE_MAGIC:
        return refusal(key, PUBLIC_KEY_ID)
    claimed = preamble_key_id(data)
    reason = refusal(key, claimed)
    if reason or key is None:
        return reason
    if not key.check_preamble(data, protocol, opener, listener):
        return "this swarm is private: bad membership proof"
    return ""


async def read_preamble(reader: asyncio.StreamReader, key: SwarmKey | None, protocol: str, opener: str,
                        listener: str, timeout: float) -> str:
    """Read a stream's preamble (its first byte alone when that cannot start one); the refusal or ""."""
    try:
        async with asyncio.timeout(timeout):
            data = await reader.readexactly(1)
            if data[0] == PREAMBLE_MAGIC:
                data += await reader.readexactly(PREAMBLE_BYTES - 1)
    except TimeoutError:
        return f"no membership proof within {timeout:g} s"
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        return "the stream closed before its membership proof"
    return verdict(key, data, protocol, opener, listener)


async def admit(stream: MessageStream, reader: asyncio.StreamReader, key: SwarmKey, own_peer_id: str,
                refusals: RefusalLog, timeout: float) -> bool:
    """Check the preamble of an accepted libp2p ``stream`` (``reader``: its raw bytes, nothing read yet); refuse it
    with a typed ``Error`` naming the reason and close it when it fails."""
    refused = await read_preamble(reader, key, stream.protocol, stream.peer_id, own_peer_id, timeout)
    if not refused:
        return True
    await refuse(stream, refusals, refused)
    return False


async def refuse(stream: MessageStream, refusals: RefusalLog, refused: str) -> None:
    """Send ``refused`` as a typed ``Error`` on an accepted ``stream`` and close it."""
    refusals.refused("libp2p-members", f"a {stream.protocol} stream from {stream.peer_id[:16]}: {refused}")
    with contextlib.suppress(MeshinferError, TimeoutError):
        async with asyncio.timeout(2.0):
            await stream.send(Error(code=ErrorCode.BAD_REQUEST, message=refused))
    await stream.close(timeout=0.5)


def member_handler(key: SwarmKey | None, own_peer_id: str, timeout: float = 5.0, allow: AllowList | None = None):
    """The raw ``MEMBER_PROTOCOL`` handler of a node with ``key`` (None: public)."""

    running = 0

    async def on_stream(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal running
        if running >= MAX_CHECKS_AT_ONCE:
            writer.close()  # the opener sees no answer and tries its next initial peer
            return
        running += 1
        try:
            opener = info.peer_id.to_base58()  # type: ignore[attr-defined]
            if allow is None:
                reason = await read_preamble(reader, key, MEMBER_PROTOCOL, opener, own_peer_id, timeout)
            else:
                async with asyncio.timeout(timeout):
                    reason = allow_verdict(allow, await reader.readexactly(PREAMBLE_BYTES), opener)
            data = reason.encode()[:MAX_REASON_BYTES]
            writer.write(struct.pack(">H", len(data)) + data)
            async with asyncio.timeout(timeout):
                await writer.drain()
        except Exception as err:  # one bad opener only loses its own stream
            log.debug("membership check from a peer failed: %s", err)
        finally:
            running -= 1
            writer.close()

    return on_stream


def _peer_of(maddr: str) -> tuple[str, Multiaddr] | None:
    try:
        ma = Multiaddr(maddr)
        peer = ma["p2p"]
        return peer, ma.decapsulate(Multiaddr(f"/p2p/{peer}"))
    except Exception:
        return None


async def ask(p2p: object, key: SwarmKey | None, own_peer_id: str, maddr: str, timeout: float,
              allow: bool = False) -> str | None:
    """Ask the peer at ``maddr`` (with ``/p2p/<id>``) whether we are of its swarm: its refusal, "" (yes) or None
    (no answer)."""
    found = _peer_of(maddr)
    if found is None:
        return None
    peer, transport = found
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            pid = PeerID.from_base58(peer)
            with contextlib.suppress(Exception):
                await p2p._client.connect(pid, [transport])  # type: ignore[attr-defined]
            opened: tuple[object, asyncio.StreamReader, asyncio.StreamWriter] = \
                await p2p.call_binary_stream_handler(pid, MEMBER_PROTOCOL)  # type: ignore[attr-defined]
            _info, reader, writer = opened
            writer.write(key.preamble(MEMBER_PROTOCOL, own_peer_id, peer) if key is not None
                         else public_preamble(ALLOW_KEY_ID if allow else PUBLIC_KEY_ID))
            await writer.drain()
            (length,) = struct.unpack(">H", await reader.readexactly(2))
            if length > MAX_REASON_BYTES:
                return None
            return (await reader.readexactly(length)).decode(errors="replace")
    except Exception as err:  # timeouts, old peers without the protocol, unreachable peers: no answer
        log.debug("membership check with %s: no answer (%s)", maddr[:120], str(err)[:120] or type(err).__name__)
        return None
    finally:
        if writer is not None:
            writer.close()


async def check_join(p2p: object, key: SwarmKey | None, own_peer_id: str, initial_peers: Sequence[str],
                     timeout: float, allow: bool = False) -> None:
    """Before joining: ask up to ``JOIN_CHECK_PEERS`` initial peers, each within ``timeout``; raise a one-line
    ``ConfigError`` when the first that answers refuses us."""
    asked: set[str] = set()
    for maddr in initial_peers:
        found = _peer_of(maddr)
        if found is None or found[0] in asked or found[0] == own_peer_id:
            continue
        asked.add(found[0])
        reason = await ask(p2p, key, own_peer_id, maddr, timeout, allow)
        if reason is not None:
            if reason:
                raise ConfigError(f"cannot join the swarm through {found[0][:16]}: {reason}")
            return
        if len(asked) >= JOIN_CHECK_PEERS:
            return

