"""Announcing servers (DESIGN.md section 5); the readers live in ``p2p.directory`` (re-exported here).

Contract: built only on ``PeerNode``'s record API. ``announce_server`` publishes a server's
``ServerRecord`` under ``servers:<model>`` (what readers read: one key a model) and, for readers from before
that key, under ``block:<model>:<i>`` for every block of its span, plus its ``ModelCard`` under
``model:<model>`` and the ``models`` directory, and keeps them alive with a background ``Announcer``
(refresh every ``refresh`` s, expiry ``ttl`` s after each write), so a server that dies vanishes by itself.
Before each write it re-reads the node's libp2p addresses and sets the record's ``addresses`` and
``reachability`` from them (a relayed address appears once AutoRelay reserved a slot on a relay).
``read_coverage``, ``list_models`` and ``read_swarm`` (bounded fan-out) are ``p2p.directory``'s.
Pure data in, pure data out: no printing, no hivemind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec

from meshinfer.errors import ConfigError, UsageError
from meshinfer.p2p.directory import (
    Coverage,
    ModelEntry,
    SwarmSnapshot,
    coverage_of,
    list_models,
    models_of,
    read_coverage,
    read_swarm,
)
from meshinfer.p2p.node import PeerNode, Put
from meshinfer.tasks import stop_task
from meshinfer.wire.records import MODELS_KEY, ModelCard, ServerRecord, block_key, model_key, servers_key

__all__ = ["DEFAULT_REFRESH", "DEFAULT_TTL", "Announcer", "Coverage", "ModelEntry", "SwarmSnapshot", "announce_server",
           "announcement", "coverage_of", "list_models", "models_of", "read_coverage", "read_swarm"]

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0
DEFAULT_REFRESH = 20.0


def announcement(card: ModelCard, record: ServerRecord) -> list[Put]:
    """The records one server publishes (its ``models`` entry is tagged with the model id)."""
    if record.model_id != card.model_id:
        raise UsageError(f"server record is for model {record.model_id!r}, card for {card.model_id!r}")
    record.span.check_within(card.num_blocks)
    items = [Put(servers_key(card.model_id), record)]
    items += [Put(block_key(card.model_id, i), record) for i in record.span.blocks()]
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
        maddrs = await self.node.refresh_maddrs()
        self.record = msgspec.structs.replace(self.record, addresses=maddrs[:16],
                                              reachability=self.node.reachability)
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
