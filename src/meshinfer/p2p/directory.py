"""Reading what the swarm serves, with every fan-out bounded (DESIGN.md section 5; issue 17).

Contract: built only on ``PeerNode.get_many``. Nothing a peer claims sizes a read: ``read_swarm`` reads the
``models`` directory (one key), keeps at most ``RecordLimits.max_cards_per_signer`` cards of each signing peer
and at most ``2 * max_models_per_read`` candidate models (most announcing peers first, then by id), reads each
candidate's ``servers:<model>`` key (one key a model, never a key a block), believes a card only from a peer
that also has a server record of that model (an honest server announces both; a card alone is a claim that
costs readers per-block state for nothing) and lists at most ``max_models_per_read`` models of at most
``max_listed_blocks`` blocks together (most announcing peers, then fewest blocks first): two DHT calls,
each bounded by ``timeout``, with at most ``2 * max_models_per_read + 1`` keys in all, whatever the cards say.
``read_coverage`` reads one model whose block count the caller knows (its own checkpoint): its ``servers:`` key
plus, for servers from before that key, its ``block:<model>:<i>`` keys, in ONE call (``num_blocks`` at most
``MAX_MODEL_BLOCKS``).
``list_models`` reads the directory alone. ``tallies_of`` picks the audit tallies (``audits:<model>``, issue 19) of
one model from a read: only a tally under its own client's subkey, of that model, at most
``max_tallies_per_model`` (newest first); ``sum_tallies`` adds them up per server (the clients' word,
unverified). The decoders and ``PeerNode`` already refuse oversized and
out-of-bound records and cap records per key and per signer; here records that are of another model,
inconsistent with the key they were found under or with the model's card (a span past its blocks), or over a
quota are skipped and counted in ``skipped`` (by reason), never an error. Pure data in, pure data out: no
printing, no hivemind.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from meshinfer.errors import ConfigError
from meshinfer.p2p.node import FoundRecord, PeerNode
from meshinfer.wire.limits import MAX_MODEL_BLOCKS, RecordLimits
from meshinfer.wire.records import (
    MODELS_KEY,
    AuditTallyRecord,
    ModelCard,
    ServerRecord,
    audits_key,
    block_key,
    servers_key,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Coverage:
    """Who serves which block of one model, as read from the DHT at one moment."""

    model_id: str
    num_blocks: int
    servers: dict[str, ServerRecord]
    """Peer id -> its record (the one expiring last if several were seen)."""
    blocks: list[list[str]]
    """Block i -> peer ids of servers whose record covers it."""
    complete: bool
    """False when some keys were not answered within the timeout."""
    skipped: Counter[str] = field(default_factory=Counter[str])
    """Records found but not believed, by reason."""

    def counts(self) -> list[int]:
        return [len(peers) for peers in self.blocks]

    def missing(self) -> list[int]:
        return [i for i, peers in enumerate(self.blocks) if not peers]


def _server_entry(entry: FoundRecord, model_id: str, num_blocks: int, skipped: Counter[str]) -> ServerRecord | None:
    rec = entry.record
    if not isinstance(rec, ServerRecord) or rec.model_id != model_id or entry.subkey != entry.peer_id:
        skipped["not a server record of this model"] += 1
        return None
    if rec.span.end > num_blocks:
        skipped["span beyond the model"] += 1
        return None
    return rec


def coverage_of(model_id: str, num_blocks: int, found: dict[str, list[FoundRecord]], *,
                block_keys: bool = False) -> Coverage:
    """The coverage of one model from what was found under its ``servers:`` key (and, with ``block_keys``, its
    ``block:`` keys: a record there counts only for the block it was found under)."""
    skipped: Counter[str] = Counter()
    best: dict[str, FoundRecord] = {}
    blocks: list[set[str]] = [set() for _ in range(num_blocks)]
    by_model = servers_key(model_id)
    complete = by_model in found
    for entry in found.get(by_model, []):
        rec = _server_entry(entry, model_id, num_blocks, skipped)
        if rec is None:
            continue
        for i in rec.span.blocks():
            blocks[i].add(entry.peer_id)
        if entry.peer_id not in best or entry.expiration_time > best[entry.peer_id].expiration_time:
            best[entry.peer_id] = entry
    for i in range(num_blocks) if block_keys else ():
        entries = found.get(block_key(model_id, i))
        if entries is None:
            complete = False
            continue
        for entry in entries:
            rec = _server_entry(entry, model_id, num_blocks, skipped)
            if rec is None or i not in rec.span:
                continue
            blocks[i].add(entry.peer_id)
            if entry.peer_id not in best or entry.expiration_time > best[entry.peer_id].expiration_time:
                best[entry.peer_id] = entry
    servers = {peer: entry.record for peer, entry in sorted(best.items())}
    return Coverage(model_id, num_blocks, servers, [sorted(b) for b in blocks], complete,  # type: ignore[arg-type]
                    skipped)


async def read_coverage(node: PeerNode, model_id: str, num_blocks: int, *, timeout: float = 5.0) -> Coverage:
    """Every server of ``model_id`` (a model of ``num_blocks`` blocks, as the caller's checkpoint says), in one
    DHT call bounded by ``timeout``."""
    if not 0 < num_blocks <= MAX_MODEL_BLOCKS:
        raise ConfigError(f"num_blocks must be in 1..{MAX_MODEL_BLOCKS} (limit MAX_MODEL_BLOCKS), got {num_blocks}")
    keys = [servers_key(model_id), *(block_key(model_id, i) for i in range(num_blocks))]
    return coverage_of(model_id, num_blocks, await node.get_many(keys, timeout=timeout), block_keys=True)


@dataclass(frozen=True)
class ModelEntry:
    card: ModelCard
    announced_by: int
    """How many peers announce this model in the ``models`` directory (in a swarm read: that also serve it)."""


def _directory(found: list[FoundRecord], limits: RecordLimits,
               skipped: Counter[str]) -> dict[str, dict[str, ModelCard]]:
    """Model id -> signing peer -> its card: at most ``limits.max_cards_per_signer`` cards of each signer (in
    subkey order), only entries under the subkey ``<signer>/<model id>``."""
    per_signer: Counter[str] = Counter()
    cards: dict[str, dict[str, ModelCard]] = {}
    for entry in found:
        card = entry.record
        if not isinstance(card, ModelCard) or entry.subkey != f"{entry.peer_id}/{card.model_id}":
            skipped["not a directory entry"] += 1
            continue
        if per_signer[entry.peer_id] >= limits.max_cards_per_signer:
            skipped["over per-signer card quota"] += 1
            continue
        per_signer[entry.peer_id] += 1
        cards.setdefault(card.model_id, {})[entry.peer_id] = card
    return cards


def _entry(by_signer: dict[str, ModelCard]) -> ModelEntry:
    card, _ = Counter(by_signer.values()).most_common(1)[0]  # servers may disagree on details; the majority wins
    return ModelEntry(card, len(by_signer))


def _ranked(entries: list[ModelEntry], keep: int, skipped: Counter[str]) -> list[ModelEntry]:
    """The ``keep`` entries most announced (then by model id), listed by model id."""
    entries = sorted(entries, key=lambda e: (-e.announced_by, e.card.model_id))
    if len(entries) > keep:
        skipped["over models-per-read limit"] += len(entries) - keep
    return sorted(entries[:keep], key=lambda e: e.card.model_id)


def _within_blocks(entries: list[ModelEntry], budget: int, skipped: Counter[str]) -> list[ModelEntry]:
    """The entries whose blocks fit ``budget`` together, most announced then smallest first; by model id."""
    kept: list[ModelEntry] = []
    for e in sorted(entries, key=lambda e: (-e.announced_by, e.card.num_blocks, e.card.model_id)):
        if e.card.num_blocks > budget:
            skipped["over listed-blocks limit"] += 1
            continue
        budget -= e.card.num_blocks
        kept.append(e)
    return sorted(kept, key=lambda e: e.card.model_id)


def models_of(found: list[FoundRecord], limits: RecordLimits, skipped: Counter[str] | None = None) -> list[ModelEntry]:
    """The models of a directory read alone: at most ``limits.max_cards_per_signer`` cards of each signing peer,
    the majority card of each model, at most ``limits.max_models_per_read`` models (most announcing peers first,
    then by model id), listed by model id."""
    skipped = Counter() if skipped is None else skipped
    entries = [_entry(by_signer) for by_signer in _directory(found, limits, skipped).values()]
    return _ranked(entries, limits.max_models_per_read, skipped)


async def list_models(node: PeerNode, *, timeout: float = 5.0) -> list[ModelEntry]:
    """Every model some live server announces (within the directory quotas), with its card."""
    return models_of(await node.dht_get_records(MODELS_KEY, timeout=timeout), node.record_limits)


@dataclass(frozen=True)
class SwarmSnapshot:
    models: list[ModelEntry]
    coverage: dict[str, Coverage] = field(default_factory=dict)
    complete: bool = True
    skipped: Counter[str] = field(default_factory=Counter[str])
    """Records found but not believed (directory and servers), by reason."""


async def read_swarm(node: PeerNode, *, timeout: float = 5.0) -> SwarmSnapshot:
    """Models, and coverage of each, in two DHT calls each bounded by ``timeout`` (see the module docstring)."""
    skipped: Counter[str] = Counter()
    limits = node.record_limits
    directory = await node.get_many([MODELS_KEY], timeout=timeout)
    cards = _directory(directory.get(MODELS_KEY, []), limits, skipped)
    candidates = [e.card.model_id for e in _ranked([_entry(c) for c in cards.values()],
                                                   2 * limits.max_models_per_read, skipped)]
    found = await node.get_many([servers_key(m) for m in candidates], timeout=timeout) if candidates else {}
    entries: list[ModelEntry] = []
    for model_id in candidates:
        serving = {e.peer_id for e in found.get(servers_key(model_id), []) if e.subkey == e.peer_id
                   and isinstance(e.record, ServerRecord) and e.record.model_id == model_id}
        by_signer = {peer: card for peer, card in cards[model_id].items() if peer in serving}
        skipped["card of a peer that does not serve the model"] += len(cards[model_id]) - len(by_signer)
        if by_signer:
            entries.append(_entry(by_signer))
    models = _within_blocks(_ranked(entries, limits.max_models_per_read, skipped), limits.max_listed_blocks, skipped)
    coverage = {m.card.model_id: coverage_of(m.card.model_id, m.card.num_blocks, found) for m in models}
    for cov in coverage.values():
        skipped.update(cov.skipped)
    if skipped:
        log.info("swarm read skipped %d records: %s", sum(skipped.values()),
                 ", ".join(f"{n} {why}" for why, n in skipped.most_common()))
    complete = MODELS_KEY in directory and all(c.complete for c in coverage.values())
    return SwarmSnapshot(models, coverage, complete, skipped)


def tallies_of(model_id: str, found: dict[str, list[FoundRecord]], limits: RecordLimits,
               skipped: Counter[str] | None = None) -> list[AuditTallyRecord]:
    """The audit tallies of ``model_id`` in ``found`` (what a read of ``audits:<model_id>`` returned): one per
    client (its subkey and ``client`` agree, the model matches), at most ``limits.max_tallies_per_model``, newest
    first; the rest are skipped and counted."""
    skipped = Counter() if skipped is None else skipped
    good: list[AuditTallyRecord] = []
    for entry in found.get(audits_key(model_id), []):
        rec = entry.record
        if (not isinstance(rec, AuditTallyRecord) or entry.subkey != entry.peer_id or rec.client != entry.peer_id
                or rec.model_id != model_id):
            skipped["not an audit tally of the model"] += 1
            continue
        good.append(rec)
    good.sort(key=lambda t: (-t.created, t.client))
    if len(good) > limits.max_tallies_per_model:
        skipped["over tallies-per-model limit"] += len(good) - limits.max_tallies_per_model
    return good[:limits.max_tallies_per_model]


@dataclass
class TallySum:
    """One server's audits summed over clients' tallies: CLAIMS (a tally is its client's word)."""

    passed: int = 0
    failed: int = 0
    positions: int = 0
    clients: int = 0
    """Tallies (clients) that list this server."""


def sum_tallies(tallies: list[AuditTallyRecord]) -> dict[str, TallySum]:
    """Server peer id -> its audits summed over ``tallies`` (one tally per client: the caller's ``tallies_of``)."""
    out: dict[str, TallySum] = {}
    for tally in tallies:
        for peer in tally.peers:
            total = out.setdefault(peer.peer_id, TallySum())
            total.passed += peer.passed
            total.failed += peer.failed
            total.positions += peer.positions
            total.clients += 1
    return dict(sorted(out.items()))
