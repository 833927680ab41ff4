"""Seeding: serve the pieces of the weights a peer has on disk, and announce them in the DHT.

Contract: ``LocalPieces(dir)`` is a checkpoint directory seen as pieces: its manifest (``checkpoint_manifest``:
stored, cached or built; its hash is the model id), where each tensor of the manifest lies on disk (byte
ranges from the safetensors headers; a tensor whose dtype, shape or size differ from the manifest is not
served) and which groups it holds whole (blocks, client part, small files). ``read_piece`` reads one piece
with ``pread`` (the file is never loaded). ``Seeder`` serves ``/meshinfer/pieces/1`` (``wire.pieces``) on a
``PeerNode`` (libp2p and the direct plane): ``GetManifest`` -> the manifest's canonical bytes,
``GetPiece`` -> the piece's bytes; a bad request (malformed, unknown model or piece, wrong message type)
gets a typed ``PieceError`` and the stream keeps serving; only a broken stream ends it. It announces one
signed ``SeedRecord`` per model under ``seed:<model_id>`` (subkey = its peer id) with its addresses and
direct-plane addresses, refreshed every ``refresh`` s with expiry ``ttl`` s, so a seeder that dies
vanishes by itself. ``max_upload`` (bytes/s, optional) caps the piece data it sends to all peers
together (``weights.rate``), so seeding never takes a whole uplink. ``corrupt_pieces`` is a TEST FAULT
INJECTOR (off by default, only reachable through a hidden CLI flag): it flips a byte of every piece
served. Knows nothing of servers, clients or torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from pathlib import Path

from meshinfer import __version__
from meshinfer.errors import CheckpointError, ConfigError, TransportError, WireError
from meshinfer.models.fingerprint import checkpoint_manifest
from meshinfer.models.safetensors_files import TensorLocation, tensor_locations
from meshinfer.p2p.node import PeerNode, Put
from meshinfer.p2p.stream import MessageStream, StreamClosed
from meshinfer.tasks import stop_task
from meshinfer.types import BlockRange
from meshinfer.weights.manifest import CLIENT_GROUP, Group, Manifest, block_group
from meshinfer.weights.rate import RateLimiter
from meshinfer.wire.pieces import (
    PIECES_PROTOCOL,
    GetManifest,
    GetPiece,
    ManifestData,
    PieceData,
    PieceError,
    PieceErrorCode,
    PieceMessage,
    decode_piece_message,
    encode_piece_message,
    piece_error_for,
)
from meshinfer.wire.records import SeedRecord, seed_key

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0
DEFAULT_REFRESH = 20.0


def block_runs(blocks: list[int]) -> list[BlockRange]:
    """Sorted block indices as the fewest half-open ranges: [0, 1, 2, 5] -> [0:3, 5:6]."""
    out: list[BlockRange] = []
    for b in sorted(set(blocks)):
        if out and out[-1].end == b:
            out[-1] = BlockRange(out[-1].start, b + 1)
        else:
            out.append(BlockRange(b, b + 1))
    return out


class LocalPieces:
    """The pieces a checkpoint directory holds (full or partial), readable by (kind, name, index)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory).expanduser().resolve()
        model_id, doc = checkpoint_manifest(self.path)
        self.manifest = Manifest(doc, model_id)
        self.model_id = model_id
        tensors = {}
        for name, loc in tensor_locations(self.path).items():
            found = self.manifest.item("tensor", name)
            if found is not None and (found[1].dtype, found[1].shape, found[1].size) == (loc.dtype, loc.shape,
                                                                                        loc.size):
                tensors[name] = loc
        self._tensors: dict[str, TensorLocation] = tensors
        self._files: dict[str, Path] = {}
        for group in self.manifest.file_groups():
            item = group.items[0]
            path = self.path / item.name
            if path.is_file() and path.stat().st_size == item.size:
                self._files[item.name] = path
        self.held = [g for g in self.manifest.groups.values() if self._holds(g)]
        self._fds: dict[Path, int] = {}
        try:  # opened now: reads then come from several threads without a race
            for path in {loc.path for loc in tensors.values()} | set(self._files.values()):
                self._fds[path] = os.open(path, os.O_RDONLY)
        except OSError as err:
            self.close()
            raise CheckpointError(f"cannot open {err.filename}: {err.strerror or err}") from None

    def _holds(self, group: Group) -> bool:
        have = self._files if group.kind == "file" else self._tensors
        return all(item.name in have for item in group.items)

    def record(self, node: PeerNode) -> SeedRecord:
        keys = {g.key for g in self.held}
        blocks = [i for i in range(self.manifest.num_blocks) if block_group(i) in keys]
        return SeedRecord(
            peer_id=node.peer_id, model_id=self.model_id, num_blocks=self.manifest.num_blocks,
            blocks=block_runs(blocks), client_part=CLIENT_GROUP in keys,
            files=all(g.key in keys for g in self.manifest.file_groups()), addresses=node.maddrs[:16],
            direct_addresses=node.direct_addresses[:8], software_version=__version__,
        )

    def read_piece(self, kind: str, name: str, index: int) -> bytes:
        """The bytes of one piece; KeyError when this directory does not hold it."""
        found = self.manifest.item(kind, name)
        if found is None or not 0 <= index < len(found[1].pieces):
            raise KeyError(f"{kind} {name} piece {index}")
        item = found[1]
        start, end = self.manifest.piece_bounds(item, index)
        if kind == "file":
            if name not in self._files:
                raise KeyError(f"file {name}")
            path, base = self._files[name], 0
        else:
            if name not in self._tensors:
                raise KeyError(f"tensor {name}")
            loc = self._tensors[name]
            path, base = loc.path, loc.start
        data = os.pread(self._fds[path], end - start, base + start)
        if len(data) != end - start:
            raise CheckpointError(f"{path} is shorter than its header says")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


class Seeder:
    """Serves the pieces of one or more local models on a node and keeps their seed records alive."""

    def __init__(self, node: PeerNode, *, ttl: float = DEFAULT_TTL, refresh: float = DEFAULT_REFRESH,
                 max_upload: float | None = None, corrupt_pieces: bool = False) -> None:
        if not 0 < refresh < ttl:
            raise ConfigError(f"seed refresh ({refresh:g}s) must be shorter than the ttl ({ttl:g}s)")
        self.limiter = RateLimiter(max_upload) if max_upload is not None else None
        self.node, self.ttl, self.refresh = node, ttl, refresh
        self.corrupt_pieces = corrupt_pieces  # TEST FAULT INJECTOR: flips a byte of every piece served
        self.models: dict[str, LocalPieces] = {}
        self.served: Counter[str] = Counter()
        """Pieces served, per requesting peer id."""
        self.errors: Counter[str] = Counter()
        """PieceError replies sent, per code."""
        self._handling = False
        self._task: asyncio.Task[None] | None = None

    async def add(self, directory: str | os.PathLike[str]) -> LocalPieces:
        """Serve the pieces of ``directory`` (hashing it first if needed) and announce them now."""
        model = await asyncio.to_thread(LocalPieces, directory)
        old = self.models.get(model.model_id)
        self.models[model.model_id] = model
        if old is not None:
            old.close()
        if not self._handling:
            await self.node.handle(PIECES_PROTOCOL, self._handle)
            self._handling = True
        await self.publish()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="seed-announce")
        return model

    async def publish(self) -> bool:
        items = [Put(seed_key(m.model_id), m.record(self.node)) for m in self.models.values()]
        ok = await self.node.dht_put_records(items, time.time() + self.ttl)
        if not all(ok):
            log.warning("seed announce: %d of %d records not stored", ok.count(False), len(ok))
        return all(ok)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            try:
                await self.publish()
            except Exception:
                log.warning("seed announce refresh failed", exc_info=True)

    async def _handle(self, stream: MessageStream) -> None:
        while True:
            try:
                payload = await stream.recv_bytes()
            except (StreamClosed, TransportError):
                return
            except WireError as err:  # the framing is broken: say why, then the stream is over
                with contextlib.suppress(TransportError):
                    await stream.send_bytes(encode_piece_message(piece_error_for(err)))
                return
            try:
                msg = decode_piece_message(payload)
            except WireError as err:
                reply: PieceMessage = piece_error_for(err)
            else:
                reply = await self._answer(msg, stream.peer_id)
            if isinstance(reply, PieceError):
                self.errors[reply.code] += 1
            try:
                await stream.send_bytes(encode_piece_message(reply))
            except TransportError:
                return

    async def _answer(self, msg: PieceMessage, peer_id: str) -> PieceMessage:
        if not isinstance(msg, GetManifest | GetPiece):
            return PieceError(code=PieceErrorCode.BAD_REQUEST, message=f"a seeder does not take {type(msg).__name__}")
        model = self.models.get(msg.model_id)
        if model is None:
            return PieceError(code=PieceErrorCode.UNKNOWN_MODEL, message=f"this peer does not seed {msg.model_id}")
        if isinstance(msg, GetManifest):
            return ManifestData(model_id=msg.model_id, data=model.manifest.canonical_bytes())
        try:
            data = await asyncio.to_thread(model.read_piece, msg.kind, msg.name, msg.index)
        except KeyError:
            return PieceError(code=PieceErrorCode.UNKNOWN_PIECE,
                              message=f"this peer does not hold {msg.kind} {msg.name[:200]} piece {msg.index}")
        except (OSError, CheckpointError) as err:
            log.warning("cannot read a piece of %s: %s", model.model_id, err)
            return PieceError(code=PieceErrorCode.INTERNAL, message="cannot read that piece here")
        if self.limiter is not None:
            await self.limiter.take(len(data))
        if self.corrupt_pieces and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.served[peer_id] += 1
        return PieceData(model_id=msg.model_id, kind=msg.kind, name=msg.name, index=msg.index, data=data)

    async def close(self) -> None:
        """Stop announcing (records expire within ``ttl``) and close the model files."""
        await stop_task(self._task)
        self._task = None
        for model in self.models.values():
            model.close()


async def start_seeding(node: PeerNode, *directories: str | os.PathLike[str], ttl: float = DEFAULT_TTL,
                        refresh: float = DEFAULT_REFRESH, max_upload: float | None = None,
                        corrupt_pieces: bool = False) -> Seeder:
    """Serve and announce the pieces of each directory on ``node`` (uploads capped at ``max_upload``
    bytes/s when given); returns the running ``Seeder``."""
    seeder = Seeder(node, ttl=ttl, refresh=refresh, max_upload=max_upload, corrupt_pieces=corrupt_pieces)
    try:
        for directory in directories:
            await seeder.add(directory)
    except BaseException:
        await seeder.close()
        raise
    return seeder
