"""Fetching: get the pieces a node needs from the seeders of a model, verified, into the local cache.

Contract: ``fetch(node, model_id, want=...)`` returns a ``FetchResult`` whose ``path`` is a checkpoint
directory (``weights.store``) holding the config and tokenizer files, the manifest and the wanted tensors.
Steps: if the cache already holds everything wanted, no network at all; else find the seeders in the DHT and
get the manifest from one (``weights.seeders``: records validated, a manifest refused unless it hashes to the
model id and its sender banned); check the disk budget before writing; then fetch the missing pieces from
every seeder holding them in parallel (``per_peer`` streams per seeder over the direct plane when it announced
one, else libp2p; pieces spread round robin, see ``weights.plan``; ``max_download`` books every piece from one
token bucket, ``weights.rate``, before it is asked for), verify each piece's size and sha256 before writing
it, and finish each group when its last piece is in. A wrong piece is rejected, fetched from another holder,
and its sender is banned (``PeerBans``, shared by the fetches of a process unless one is passed); a peer whose
connection fails is backed off exponentially and dropped after ``max_peer_failures``; a piece nobody can serve
ends the fetch with a one-line ``CheckpointError``. Interrupting a fetch (cancel, kill) loses nothing
verified: the next fetch re-hashes partial files and asks only for what is missing. ``progress`` (if given) is
called with a ``FetchProgress`` after every piece. ``ensure_local`` is the entry point for servers and
clients: a directory is used as is, a model id is fetched, a hub name (``org/name``) goes to ``weights.hub``.
Errors: ``ConfigError`` (bad id, budget), ``UsageError`` (a model not cached and no node given),
``CheckpointError`` (no seeders, nothing can serve a piece, bad manifest), ``TransportError`` never escapes
for a single peer's failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from meshinfer.errors import CheckpointError, ConfigError, MeshinferError, TransportError, UsageError, WireError
from meshinfer.models.safetensors_files import INDEX_FILE
from meshinfer.p2p.node import PeerNode
from meshinfer.p2p.stream import MessageStream
from meshinfer.types import BlockRange
from meshinfer.weights.manifest import Manifest, PieceRef, Want, check_model_id, is_model_id
from meshinfer.weights.plan import PeerBans, PiecePlanner
from meshinfer.weights.rate import RateLimiter
from meshinfer.weights.seeders import PROCESS_BANS, find_seeders, get_manifest, holds, open_pieces
from meshinfer.weights.store import ModelStore, PartialGroup
from meshinfer.wire.pieces import (
    GetPiece,
    PieceData,
    PieceError,
    PieceErrorCode,
    decode_piece_message,
    encode_piece_message,
)
from meshinfer.wire.records import SeedRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchProgress:
    model_id: str
    done_bytes: int
    total_bytes: int
    done_pieces: int
    total_pieces: int
    reused_pieces: int
    peer: str | None = None
    """Who sent the latest piece (None for the first report)."""


@dataclass
class FetchStats:
    seeders: list[str] = field(default_factory=list)
    pieces_by_peer: Counter[str] = field(default_factory=Counter)
    bytes_by_peer: Counter[str] = field(default_factory=Counter)
    requests_by_peer: Counter[str] = field(default_factory=Counter)
    rejected_by_peer: Counter[str] = field(default_factory=Counter)
    banned: list[str] = field(default_factory=list)
    fetched: set[PieceRef] = field(default_factory=set)
    """Pieces received, verified and written by this fetch."""
    reused_pieces: int = 0
    """Pieces found verified on disk (partial files of an interrupted fetch)."""
    bytes_fetched: int = 0
    seconds: float = 0.0
    throttled_seconds: float = 0.0
    """Seconds the workers waited, summed over workers, to keep under ``max_download``."""

    def as_dict(self) -> dict[str, object]:
        return {"seeders": self.seeders, "pieces_by_peer": dict(self.pieces_by_peer),
                "bytes_by_peer": dict(self.bytes_by_peer), "requests_by_peer": dict(self.requests_by_peer),
                "rejected_by_peer": dict(self.rejected_by_peer), "banned": self.banned,
                "pieces_fetched": len(self.fetched), "reused_pieces": self.reused_pieces,
                "bytes_fetched": self.bytes_fetched, "seconds": round(self.seconds, 3),
                "throttled_seconds": round(self.throttled_seconds, 3)}


@dataclass
class FetchResult:
    path: Path
    model_id: str
    manifest: Manifest
    stats: FetchStats


ProgressCallback = Callable[[FetchProgress], None]


class _Fetch:
    """One fetch in progress: the planner, the partial files and the per-peer workers."""

    def __init__(self, node: PeerNode, manifest: Manifest, store: ModelStore, planner: PiecePlanner[PieceRef],
                 partials: dict[str, PartialGroup], seeders: list[SeedRecord], *, per_peer: int,
                 piece_timeout: float, max_peer_failures: int, durable: bool, progress: ProgressCallback | None,
                 stats: FetchStats, total_bytes: int, total_pieces: int,
                 limiter: RateLimiter | None = None) -> None:
        self.node, self.manifest, self.store, self.planner = node, manifest, store, planner
        self.partials, self.seeders = partials, seeders
        self.per_peer, self.piece_timeout = per_peer, piece_timeout
        self.max_peer_failures, self.durable, self.progress = max_peer_failures, durable, progress
        self.stats, self.limiter = stats, limiter
        self.total_bytes, self.total_pieces = total_bytes, total_pieces
        self.done_bytes = 0
        self.done_pieces = stats.reused_pieces
        self.failed: MeshinferError | None = None
        self.epoch: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.dropped: set[str] = set()
        self.finishing: set[str] = set()

    def report(self, peer: str | None) -> None:
        if self.progress is not None:
            self.progress(FetchProgress(self.manifest.model_id, self.done_bytes, self.total_bytes, self.done_pieces,
                                        self.total_pieces, self.stats.reused_pieces, peer))

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for record in self.seeders:
                    for k in range(self.per_peer):
                        tg.create_task(self._worker(record), name=f"fetch:{record.peer_id[:8]}:{k}")
        except ExceptionGroup as group:  # a worker failed unexpectedly (e.g. a progress callback raised)
            raise group.exceptions[0] from None
        if self.failed is not None:
            raise self.failed
        if not self.planner.finished:
            stuck = self.planner.stuck(time.monotonic()) or self.planner.in_flight() or ["?"]
            raise CheckpointError(f"fetch of model {self.manifest.model_id} incomplete: no seeder left that can "
                                  f"serve {stuck[0]} ({self.planner.remaining} pieces missing)")

    async def _worker(self, record: SeedRecord) -> None:
        peer = record.peer_id
        stream: MessageStream | None = None
        epoch = self.epoch[peer]
        try:
            while not self.planner.finished and self.failed is None and peer not in self.dropped:
                now = time.monotonic()
                if self.planner.bans.banned(peer, now):
                    return
                if not self.planner.bans.usable(peer, now):
                    await asyncio.sleep(0.05)
                    continue
                self.planner.peer_back(peer)
                piece = self.planner.take(peer, now)
                if piece is None:
                    if len(self.planner.stuck(now)) == self.planner.remaining:  # nothing anyone can still do
                        return
                    await asyncio.sleep(0.02)
                    continue
                if self.limiter is not None:  # booked before asking: the piece is ours alone while we wait
                    self.stats.throttled_seconds += await self.limiter.take(_piece_size(self.manifest, piece))
                try:
                    if stream is None:
                        epoch = self.epoch[peer]
                        stream = await open_pieces(self.node, record)
                    self.stats.requests_by_peer[peer] += 1
                    await stream.send_bytes(encode_piece_message(GetPiece(
                        model_id=self.manifest.model_id, kind=piece.kind, name=piece.name, index=piece.index)))
                    reply = decode_piece_message(await stream.recv_bytes(timeout=self.piece_timeout))
                except (TransportError, WireError) as err:
                    if stream is not None:
                        await stream.close()
                    stream = None
                    self._connection_failed(peer, piece, epoch, err)
                    continue
                if not await self._accept(peer, piece, reply):
                    return  # banned
        except MeshinferError as err:  # disk full, unwritable cache...: the whole fetch fails
            self.failed = self.failed or err
        finally:
            if stream is not None:
                await stream.close()

    def _connection_failed(self, peer: str, piece: PieceRef, epoch: int, err: Exception) -> None:
        now = time.monotonic()
        self.planner.give_back(piece, peer, now)
        if epoch != self.epoch[peer]:
            return  # another worker already reported this peer's failure
        self.epoch[peer] += 1
        self.failures[peer] += 1
        log.info("seeder %s failed (%s)", peer[:12], err)
        if self.failures[peer] > self.max_peer_failures:
            self.dropped.add(peer)
            self.planner.drop_peer(peer, now)
        else:
            self.planner.peer_failed(peer, now)

    async def _accept(self, peer: str, piece: PieceRef, reply: object) -> bool:
        """Handle one answer; False when the peer is banned for it."""
        now = time.monotonic()
        if isinstance(reply, PieceError):
            if reply.code in (PieceErrorCode.UNKNOWN_PIECE, PieceErrorCode.UNKNOWN_MODEL):
                self.planner.unavailable(piece, peer, now)
            else:
                self.planner.give_back(piece, peer, now)
                self.planner.peer_failed(peer, now)
            return True
        partial = self.partials[self.manifest.item(piece.kind, piece.name)[0].key]  # type: ignore[index]
        ok = (isinstance(reply, PieceData) and reply.model_id == self.manifest.model_id
              and (reply.kind, reply.name, reply.index) == (piece.kind, piece.name, piece.index)
              and await asyncio.to_thread(partial.write, piece, reply.data))
        if not ok:
            log.warning("seeder %s sent a wrong %s; banned", peer[:12], piece)
            self.stats.rejected_by_peer[peer] += 1
            if peer not in self.stats.banned:
                self.stats.banned.append(peer)
            self.planner.reject(piece, peer, now)
            return False
        assert isinstance(reply, PieceData)
        fresh = piece not in self.stats.fetched
        self.planner.done(piece, peer)
        if fresh:
            self.stats.fetched.add(piece)
            self.stats.pieces_by_peer[peer] += 1
            self.stats.bytes_by_peer[peer] += len(reply.data)
            self.stats.bytes_fetched += len(reply.data)
            self.done_pieces += 1
            self.done_bytes += len(reply.data)
            self.report(peer)
        if partial.complete and partial.group.key not in self.finishing:
            self.finishing.add(partial.group.key)
            await asyncio.to_thread(partial.finish, durable=self.durable)
        return True


async def fetch(node: PeerNode | None, model_id: str, *, want: Want | None = None, cache_dir: str | Path | None = None,
                max_cache_bytes: int | None = None, progress: ProgressCallback | None = None,
                peers: Collection[str] | None = None, bans: PeerBans | None = None, per_peer: int = 4,
                find_timeout: float = 15.0, piece_timeout: float = 30.0, max_peer_failures: int = 3,
                steal_after: float = 1.0, durable: bool = True, lock_timeout: float = 600.0,
                max_download: float | None = None) -> FetchResult:
    """Fetch ``want`` (default: the whole model) of ``model_id`` into the cache; see the module docstring.
    ``peers`` limits the seeders used (by peer id); ``max_download`` caps the piece data asked for, in bytes/s
    over all seeders (None: no cap)."""
    check_model_id(model_id)
    if per_peer < 1:
        raise ConfigError(f"per_peer must be >= 1, got {per_peer}")
    if max_download is not None and not max_download > 0:  # also refuses nan
        raise ConfigError(f"a download cap must be > 0 bytes/s, got {max_download:g}")
    want = want or Want.whole()
    bans = bans if bans is not None else PROCESS_BANS
    started = time.monotonic()
    stats = FetchStats()
    manifest = await asyncio.to_thread(ModelStore.stored_manifest, cache_dir, model_id)
    if manifest is not None:
        store = ModelStore(cache_dir, manifest)
        if all(store.is_complete(g) for g in manifest.groups_for(want)):
            if not (store.path / INDEX_FILE).is_file():  # a fetch interrupted before its first index write
                await asyncio.to_thread(store.write_index)
            return FetchResult(store.path, model_id, manifest, stats)
    if node is None:
        raise UsageError(f"model {model_id} is not in the cache and no peer node was given to fetch it")
    seeders = await find_seeders(node, model_id, timeout=find_timeout, peers=peers, bans=bans)
    stats.seeders = [s.peer_id for s in seeders]
    if manifest is None:
        manifest = await get_manifest(node, seeders, model_id, bans=bans, timeout=piece_timeout)
    store = ModelStore(cache_dir, manifest)
    groups = manifest.groups_for(want)
    holders = {g.key: [s.peer_id for s in seeders if holds(s, g)] for g in groups}
    for g in groups:
        if not holders[g.key] and not store.is_complete(g):
            raise CheckpointError(f"no seeder of model {model_id} holds {g.key.replace(':', ' ')} "
                                  f"({len(seeders)} seeders found)")
    lock = await _lock(store, timeout=lock_timeout)
    partials: dict[str, PartialGroup] = {}
    try:
        todo = [g for g in groups if not store.is_complete(g)]
        store.check_budget(todo, max_cache_bytes, want.describe())
        await asyncio.to_thread(store.write_manifest)
        needed: dict[PieceRef, list[str]] = {}
        for g in todo:
            partial = store.begin(g)
            partials[g.key] = partial
            for piece in await asyncio.to_thread(partial.open):
                needed[piece] = holders[g.key]
            stats.reused_pieces += partial.reused
        for partial in partials.values():
            if partial.complete:
                await asyncio.to_thread(partial.finish, durable=durable)
        planner: PiecePlanner[PieceRef] = PiecePlanner(needed, now=time.monotonic(), bans=bans,
                                                       steal_after=steal_after)
        useful = {peer for peers in needed.values() for peer in peers}
        total_pieces = sum(g.num_pieces for g in todo)
        total_bytes = sum(g.size for g in todo)
        job = _Fetch(node, manifest, store, planner, partials, [s for s in seeders if s.peer_id in useful],
                     per_peer=per_peer, piece_timeout=piece_timeout, max_peer_failures=max_peer_failures,
                     durable=durable, progress=progress, stats=stats, total_bytes=total_bytes,
                     total_pieces=total_pieces, limiter=_download_limiter(max_download))
        job.done_bytes = total_bytes - sum(_piece_size(manifest, p) for p in needed)
        job.report(None)
        if needed:
            await job.run()
        if todo:
            await asyncio.to_thread(store.write_index)
    finally:
        for partial in partials.values():
            partial.close()
        store.release_lock(lock)
    stats.seconds = time.monotonic() - started
    return FetchResult(store.path, model_id, manifest, stats)


async def _lock(store: ModelStore, *, timeout: float) -> int:
    """The model's cache lock, polled on the loop (a cancelled wait leaves no lock behind)."""
    deadline = time.monotonic() + timeout
    while (fd := store.try_lock()) is None:
        if time.monotonic() > deadline:
            raise ConfigError(f"another process keeps fetching into {store.path} (waited {timeout:g}s)")
        await asyncio.sleep(0.2)
    return fd


def _download_limiter(rate: float | None) -> RateLimiter | None:
    """The bucket a fetch's workers book each piece from, before asking for it: a quarter second of credit
    (a piece larger than that waits for its share; the average stays at ``rate``)."""
    return RateLimiter(rate, burst=rate / 4) if rate is not None else None


def _piece_size(manifest: Manifest, piece: PieceRef) -> int:
    found = manifest.item(piece.kind, piece.name)
    assert found is not None
    start, end = manifest.piece_bounds(found[1], piece.index)
    return end - start


async def ensure_local(node: PeerNode | None, model_ref: str, *, blocks: BlockRange | None, client_part: bool,
                       cache_dir: Path | None = None, progress: ProgressCallback | None = None,
                       max_cache_bytes: int | None = None, max_download: float | None = None) -> Path:
    """A checkpoint directory for ``model_ref`` holding at least ``blocks`` (and the client part if asked),
    config and tokenizer files: an existing directory as is, a GGUF file or catalogue name through
    ``weights.resolve.local_checkpoint`` (no network); a model id fetched from the swarm into the cache
    (``checkpoint_fingerprint`` of the result equals the id); a hub name ``org/name[@revision]`` through
    ``huggingface_hub`` (only the shards needed). ``max_download`` (bytes/s) caps a fetch from the swarm."""
    from meshinfer.weights.resolve import local_checkpoint

    local = await asyncio.to_thread(local_checkpoint, model_ref)
    if local is not None:
        return local
    if is_model_id(model_ref):
        result = await fetch(node, model_ref, want=Want(blocks=blocks, client_part=client_part), cache_dir=cache_dir,
                             max_cache_bytes=max_cache_bytes, progress=progress, max_download=max_download)
        return result.path
    from meshinfer.weights.hub import hub_download, is_hub_ref

    if is_hub_ref(model_ref):
        return await asyncio.to_thread(hub_download, model_ref, blocks=blocks, client_part=client_part,
                                       cache_dir=cache_dir)
    raise ConfigError(f"model {model_ref!r} is neither a directory, a model id (32 hex characters) nor a hub "
                      "name (org/name)")
