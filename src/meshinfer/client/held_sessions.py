"""Prompt-cache reuse, the I/O part: which session a ``DistributedModel`` generation runs on, and the idle sessions
held for the next prompt (``client.prefix_cache`` decides, this module opens, rewinds and closes).

Contract: ``HeldSessions`` wraps a model's ``PrefixCache`` of idle ``ClientSession``s: ``hold(session, history)``
keeps a session whose generation ended normally (closing what that pushes out, least recently used first) and starts a
sweeper task that closes sessions idle past the TTL while any is held; ``drop()`` closes them all (before ``close``,
or when servers refuse new sessions). ``agenerate_reusing`` is one generation with the cache: a held session sharing a
long enough prefix with the prompt is continued (``run(session, ids, params, keep)``: rewound to ``keep`` positions,
only the rest of the prompt sent); one that fails before its first token is replaced by a fresh session avoiding its
peers, unseen by the caller (``stats.fallbacks``); a fresh session is opened with ``headroom`` more tokens (bounded by
the context) so a later turn fits; a fresh session refused (``RemoteError``, ``NoRouteError``, ``TransportError``)
while sessions are held drops them and tries once more. Before that, a fresh session is opened by
``open_making_room``: when sessions are held on a server of its route (they may fill it: its KV budget, or its limit
per peer), its pipelined ``Open`` is awaited before the first step (one round trip more, only while sessions are held
on its servers), and a refusal for room (``OVERLOADED``) closes the least recently used held session on those servers
and opens again at once (``stats.room_closes``, ``stats.open_retries``, ``stats.confirmed_opens``): no failover to a
server that is not there, no route wait (measured: ~30 s before, on a full one-server-per-span swarm). With the cache
off it is a plain fresh session. Runs on the client's loop; knows nothing of tensors or of how a generation runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

from meshinfer.client.prefix_cache import PrefixCache
from meshinfer.client.private_split import ClientSession, PrivateSplitSession
from meshinfer.client.routing import NoRouteError
from meshinfer.client.session import InferenceSession
from meshinfer.errors import RemoteError, TransportError
from meshinfer.models.generator import GenerationParams
from meshinfer.models.sampling import ScoredToken
from meshinfer.wire.messages import ErrorCode

log = logging.getLogger(__name__)

ROOM_PAUSES = 2
"""Short pauses before reopening when a server refused for room and no held session is left on it to close."""
ROOM_PAUSE_S = 0.1

OpenSession = Callable[[int, frozenset[str]], Awaitable[ClientSession]]
"""``(max_length, peers to avoid) -> a fresh session`` (``DistributedModel.aopen_session``)."""
RunOn = Callable[[ClientSession, list[int], GenerationParams, int], AsyncGenerator[ScoredToken]]
"""``(session, ids, params, keep) -> the generation on it`` (``DistributedModel._agenerate_on``)."""


class HeldSessions:
    """The idle sessions of one model's prompt cache (see the module docstring)."""

    def __init__(self, cache: PrefixCache[ClientSession]) -> None:
        self.cache = cache
        self._sweeper: asyncio.Task[None] | None = None

    async def hold(self, session: ClientSession, history: list[int]) -> None:
        """Keep ``session`` idle, its servers holding ``history``; close what that pushes out."""
        for old in self.cache.put(session, history, session.max_length, time.monotonic()):
            await old.close()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="prompt-cache-sweeper")

    async def _sweep(self) -> None:
        """Close held sessions as they pass the TTL, while any is held."""
        while (due := self.cache.next_expiry()) is not None:
            await asyncio.sleep(max(0.05, due - time.monotonic() + 0.01))
            for old in self.cache.expire(time.monotonic()):
                await old.close()

    async def drop(self) -> None:
        """Close every held session."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for old in self.cache.drain():
            await old.close()


async def agenerate_reusing(held: HeldSessions, ids: list[int], params: GenerationParams, *, context: int,
                            headroom: int, open_session: OpenSession, run: RunOn) -> AsyncGenerator[ScoredToken]:
    """One generation of ``ids`` on a held session or a fresh one (see the module docstring); ``context``: the
    model's positions, bounding a fresh session's size with ``headroom``."""
    length = len(ids) + params.max_new_tokens
    cache = held.cache
    reuse = cache.take(ids, length, time.monotonic()) if cache.enabled else None
    avoid: frozenset[str] = frozenset()
    if reuse is not None:
        yielded = False
        try:
            async with contextlib.aclosing(run(reuse.session, ids, params, reuse.keep)) as gen:
                async for item in gen:
                    yielded = True
                    yield item
            return
        except Exception as err:  # a held session whose servers went away: a fresh one, unseen by the caller
            if yielded:
                raise
            cache.stats.fallbacks += 1
            log.info("a held session failed before its first token (%s); opening a fresh one", err)
            avoid = frozenset(hop.peer_id for hop in reuse.session.route)  # one of them is gone
    size = min(length + (headroom if cache.enabled else 0), max(length, context))
    for attempt in (0, 1):
        yielded = False
        try:
            session = await open_making_room(held, size, avoid, open_session)
            async with contextlib.aclosing(run(session, ids, params, 0)) as gen:
                async for item in gen:
                    yielded = True
                    yield item
            return
        except (RemoteError, NoRouteError, TransportError) as err:  # servers full? held sessions may fill them
            if yielded or attempt or not len(cache):
                raise
            log.info("servers refused a session (%s) while %d are held; closing those, retrying", err, len(cache))
            await held.drop()


def _remote(session: ClientSession) -> InferenceSession:
    return session.remote if isinstance(session, PrivateSplitSession) else session


def _peers(session: ClientSession) -> frozenset[str]:
    return frozenset(hop.peer_id for hop in session.route)


def crowded(held: HeldSessions, session: ClientSession) -> frozenset[str]:
    """The servers of ``session``'s route (a fresh one) on which sessions are held: those may refuse it for room.
    (Announced ``cache_tokens_left`` cannot rule it out: it may predate the held sessions, and a server's limit per
    peer, ``--max-kv-tokens-per-peer``, is not announced.) Empty: its pipelined ``Open`` is not worth awaiting."""
    route = _peers(session)
    return frozenset(p for s in held.cache.held_on(route, _peers) for p in _peers(s) & route)


async def open_making_room(held: HeldSessions, size: int, avoid: frozenset[str],
                           open_session: OpenSession) -> ClientSession:
    """A fresh session of ``size`` tokens avoiding ``avoid`` (or anything, when no route avoids them); where held
    sessions may fill a server of its route (``crowded``), its ``Open`` is awaited before the first step, and a
    refusal for room (``OVERLOADED``) closes the least recently used held session on those servers and opens again
    at once, up to one retry per held session there (plus ``ROOM_PAUSES`` short pauses when none is left, for a
    ``Close`` still on its way). Any other refusal, or one with nothing left to close, is raised (``RemoteError``)."""
    cache = held.cache
    pauses = 0
    suspect: frozenset[str] = frozenset()  # servers that refused for room: confirm their Opens from now on
    while True:
        try:
            session = await open_session(size, avoid)
        except NoRouteError:
            if not avoid:
                raise
            session = await open_session(size, frozenset())
        peers = crowded(held, session) | (suspect & _peers(session))
        if not peers:
            return session
        cache.stats.confirmed_opens += 1
        try:
            await _remote(session).wait_opened()
            return session
        except RemoteError as err:
            await session.close()
            if err.code != ErrorCode.OVERLOADED:
                raise
            suspect |= peers
            there = cache.held_on(peers, _peers)
            if there:
                victim = there[0]
                cache.remove(victim)
                cache.stats.room_closes += 1
                log.info("a server refused a session for room (%s); closing a held session there, retrying", err)
                await victim.close()
            elif pauses < ROOM_PAUSES:
                pauses += 1
                await asyncio.sleep(ROOM_PAUSE_S * pauses)  # a Close sent just now may not have landed yet
            else:
                raise
            cache.stats.open_retries += 1
        except BaseException:
            await session.close()
            raise
