"""Announcing servers and reading what the swarm serves (DESIGN.md section 5).

Contract: built only on ``PeerNode``'s record API. ``announce_server`` publishes a server's
``ServerRecord`` under ``block:<model>:<i>`` for every block of its span, plus its ``ModelCard``
under ``model:<model>`` and the ``models`` directory, and keeps them alive with a background
``Announcer`` (refresh every ``refresh`` s, expiry ``ttl`` s after each write), so a server that dies
vanishes by itself. ``read_coverage`` reads every block key of one model in ONE ``get_many`` bounded
by ``timeout``; ``list_models`` reads the directory; ``read_swarm`` does both for the whole swarm in
two bounded calls. Records that are invalid, expired, of another model or inconsistent with the key
they were found under are ignored. Pure data in, pure data out: no printing, no hivemind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from meshinfer.errors import ConfigError, UsageError
from meshinfer.p2p.node import FoundRecord, PeerNode, Put
from meshinfer.tasks import stop_task
from meshinfer.wire.records import MODELS_KEY, ModelCard, ServerRecord, block_key, model_key

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0
DEFAULT_REFRESH = 20.0


def announcement(card: ModelCard, record: ServerRecord) -> list[Put]:
    """The records one server publishes (its ``models`` entry is tagged with the model id)."""
    if record.model_id != card.model_id:
        raise UsageError(f"server record is for model {record.model_id!r}, card for {card.model_id!r}")
    record.span.check_within(card.num_blocks)
    items = [Put(block_key(card.model_id, i), record) for i in record.span.blocks()]
    items += [Put(model_key(card.model_id), card), Put(MODELS_KEY, card, tag=card.model_id)]
    return items


class Announcer:
    """Keeps one server's records alive in the DHT until stopped (then they expire after ``ttl``)."""

    def __init__(self, node: PeerNode, card: ModelCard, record: ServerRecord, *, ttl: float = DEFAULT_TTL,
                 refresh: float = DEFAULT_REFRESH) -> None:
        if not 0 < refresh < ttl:
            raise ConfigError(f"announce refresh ({refresh:g}s) must be shorter than the ttl ({ttl:g}s)")
        if record.peer_id != node.peer_id:
            raise UsageError(f"server record names peer {record.peer_id}, this node is {node.peer_id}")
        announcement(card, record)  # validate now, not in the background
        self.node, self.card, self.record = node, card, record
        self.ttl, self.refresh = ttl, refresh
        self.last_ok: bool | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def publish(self) -> bool:
        """Write the current records now; True when every key was stored somewhere."""
        items = announcement(self.card, self.record)
        ok = await self.node.dht_put_records(items, time.time() + self.ttl)
        self.last_ok = all(ok)
        if not self.last_ok:
            log.warning("announce of %s: %d of %d keys not stored", self.card.model_id,
                        ok.count(False), len(ok))
        return self.last_ok

    def update(self, record: ServerRecord) -> None:
        """Replace the announced record (state, throughput, cache left...) and publish it soon."""
        announcement(self.card, record)
        if record.peer_id != self.node.peer_id:
            raise UsageError("a server may only announce records naming itself")
        self.record = record
        self._wake.set()

    async def start(self) -> bool:
        """Publish once (awaited), then keep refreshing in the background."""
        ok = await self.publish()
        self._task = asyncio.create_task(self._loop(), name=f"announce:{self.card.model_id}")
        return ok

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.publish()
            except Exception:
                log.warning("announce refresh failed", exc_info=True)

    async def stop(self) -> None:
        """Stop refreshing (records then expire within ``ttl``)."""
        await stop_task(self._task)
        self._task = None


async def announce_server(node: PeerNode, card: ModelCard, record: ServerRecord, *, ttl: float = DEFAULT_TTL,
                          refresh: float = DEFAULT_REFRESH) -> Announcer:
    """Publish ``record`` and ``card`` now and keep them fresh; returns the running ``Announcer``."""
    announcer = Announcer(node, card, record, ttl=ttl, refresh=refresh)
    await announcer.start()
    return announcer


@dataclass(frozen=True)
class Coverage:
    """Who serves which block of one model, as read from the DHT at one moment."""

    model_id: str
    num_blocks: int
    servers: dict[str, ServerRecord]
    """Peer id -> its record (the one expiring last if several were seen)."""
    blocks: list[list[str]]
    """Block i -> peer ids of servers whose record was found under block i and covers it."""
    complete: bool
    """False when some block keys were not answered within the timeout."""

    def counts(self) -> list[int]:
        return [len(peers) for peers in self.blocks]

    def missing(self) -> list[int]:
        return [i for i, peers in enumerate(self.blocks) if not peers]


def _coverage(model_id: str, num_blocks: int, found: dict[str, list[FoundRecord]]) -> Coverage:
    best: dict[str, FoundRecord] = {}
    blocks: list[list[str]] = [[] for _ in range(num_blocks)]
    complete = True
    for i in range(num_blocks):
        entries = found.get(block_key(model_id, i))
        if entries is None:
            complete = False
            continue
        for entry in entries:
            rec, peer = entry.record, entry.peer_id
            if not isinstance(rec, ServerRecord) or rec.model_id != model_id or i not in rec.span:
                continue
            if rec.span.end > num_blocks or entry.subkey != peer or peer in blocks[i]:
                continue
            blocks[i].append(peer)
            if peer not in best or entry.expiration_time > best[peer].expiration_time:
                best[peer] = entry
    servers = {peer: entry.record for peer, entry in sorted(best.items())}
    return Coverage(model_id, num_blocks, servers, blocks, complete)  # type: ignore[arg-type]


async def read_coverage(node: PeerNode, model_id: str, num_blocks: int, *, timeout: float = 5.0) -> Coverage:
    """All servers of every block of ``model_id``, in one DHT call bounded by ``timeout``."""
    if num_blocks <= 0:
        raise ConfigError(f"num_blocks must be > 0, got {num_blocks}")
    keys = [block_key(model_id, i) for i in range(num_blocks)]
    return _coverage(model_id, num_blocks, await node.get_many(keys, timeout=timeout))


@dataclass(frozen=True)
class ModelEntry:
    card: ModelCard
    announced_by: int
    """How many peers announce this model in the ``models`` directory."""


def _models(found: list[FoundRecord]) -> list[ModelEntry]:
    cards: dict[str, Counter[ModelCard]] = {}
    for entry in found:
        if isinstance(entry.record, ModelCard) and entry.subkey == f"{entry.peer_id}/{entry.record.model_id}":
            cards.setdefault(entry.record.model_id, Counter())[entry.record] += 1
    out = []
    for _model_id, counter in sorted(cards.items()):
        card, _ = counter.most_common(1)[0]  # servers may disagree on details; the majority wins
        out.append(ModelEntry(card, sum(counter.values())))
    return out


async def list_models(node: PeerNode, *, timeout: float = 5.0) -> list[ModelEntry]:
    """Every model some live server announces, with its card."""
    return _models(await node.dht_get_records(MODELS_KEY, timeout=timeout))


@dataclass(frozen=True)
class SwarmSnapshot:
    models: list[ModelEntry]
    coverage: dict[str, Coverage] = field(default_factory=dict)
    complete: bool = True


async def read_swarm(node: PeerNode, *, timeout: float = 5.0) -> SwarmSnapshot:
    """Models, and coverage of each, in two DHT calls each bounded by ``timeout``."""
    directory = await node.get_many([MODELS_KEY], timeout=timeout)
    models = _models(directory.get(MODELS_KEY, []))
    keys = [block_key(m.card.model_id, i) for m in models for i in range(m.card.num_blocks)]
    found = await node.get_many(keys, timeout=timeout) if keys else {}
    coverage = {m.card.model_id: _coverage(m.card.model_id, m.card.num_blocks, found) for m in models}
    complete = MODELS_KEY in directory and all(c.complete for c in coverage.values())
    return SwarmSnapshot(models, coverage, complete)
