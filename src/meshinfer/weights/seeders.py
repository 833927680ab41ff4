"""Seeders: who in the swarm holds a model's pieces, and the model's manifest from one of them.

Contract: ``find_seeders`` reads the ``seed:<model_id>`` records from the DHT (polling up to a timeout until
one shows up) and keeps only valid ones: the record names the peer that signed it, is not ours, is not
banned and (if asked) is among ``peers``. ``holds`` says from a record whether a seeder holds a group
whole. ``open_pieces`` opens a ``meshinfer/pieces`` stream to a seeder (its direct plane when it announced
one). ``get_manifest`` asks seeders in random order and returns the first manifest that hashes to the
model id; a peer sending a wrong one is banned (``PROCESS_BANS``, shared by the fetches of a process
unless one is passed). Errors are one-line ``CheckpointError``s; a single peer's transport failure never
escapes. It knows nothing of pieces' contents, the store or the fetch plan (``weights.fetch``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Collection

from meshinfer.errors import CheckpointError, TransportError, WireError
from meshinfer.p2p.node import PeerNode
from meshinfer.p2p.stream import MessageStream
from meshinfer.weights.manifest import CLIENT_GROUP, Group, Manifest
from meshinfer.weights.plan import PeerBans
from meshinfer.wire.pieces import PIECES_PROTOCOL, GetManifest, ManifestData, decode_piece_message, encode_piece_message
from meshinfer.wire.records import SeedRecord, seed_key

PROCESS_BANS = PeerBans()
"""The bans every fetch of this process shares unless it is given its own."""


def holds(record: SeedRecord, group: Group) -> bool:
    """Whether a seeder's record says it holds ``group`` whole."""
    if group.kind == "file":
        return record.files
    if group.key == CLIENT_GROUP:
        return record.client_part
    return record.has_block(int(group.key.split(":")[1]))


async def find_seeders(node: PeerNode, model_id: str, *, timeout: float = 15.0,
                       peers: Collection[str] | None = None, bans: PeerBans | None = None) -> list[SeedRecord]:
    """The valid seed records of ``model_id`` (polling the DHT up to ``timeout`` s until one shows up)."""
    bans = bans if bans is not None else PROCESS_BANS
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        found = await node.dht_get_records(seed_key(model_id), timeout=max(0.5, min(5.0, left)))
        out = [f.record for f in found
               if isinstance(f.record, SeedRecord) and f.record.model_id == model_id and f.subkey == f.peer_id
               and f.record.peer_id == f.peer_id and f.peer_id != node.peer_id
               and (peers is None or f.peer_id in peers) and not bans.banned(f.peer_id, time.monotonic())]
        if out or time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    if not out:
        raise CheckpointError(f"no peer in the swarm seeds model {model_id} (unknown model id, or none of its "
                              f"seeders is online); looked for {timeout:g}s")
    return out


async def open_pieces(node: PeerNode, record: SeedRecord, timeout: float = 10.0) -> MessageStream:
    return await node.open_stream(record.peer_id, PIECES_PROTOCOL, maddrs=record.addresses,
                                  direct=record.direct_addresses, timeout=timeout)


async def get_manifest(node: PeerNode, seeders: list[SeedRecord], model_id: str, *, bans: PeerBans | None = None,
                       timeout: float = 30.0) -> Manifest:
    """The manifest of ``model_id`` from the first seeder that sends a valid one (wrong ones get banned)."""
    bans = bans if bans is not None else PROCESS_BANS
    problems = []
    for record in random.sample(seeders, len(seeders)):
        try:
            async with await open_pieces(node, record) as stream:
                await stream.send_bytes(encode_piece_message(GetManifest(model_id=model_id)))
                reply = decode_piece_message(await stream.recv_bytes(timeout=timeout))
        except (TransportError, WireError) as err:
            problems.append(f"{record.peer_id[:12]}: {err}")
            continue
        if isinstance(reply, ManifestData) and reply.model_id == model_id:
            try:
                return Manifest.from_bytes(reply.data, model_id)
            except CheckpointError as err:
                bans.ban(record.peer_id, time.monotonic())
                problems.append(f"{record.peer_id[:12]} sent a wrong manifest ({err}); banned")
                continue
        problems.append(f"{record.peer_id[:12]} answered {getattr(reply, 'code', type(reply).__name__)}")
    raise CheckpointError(f"could not get the manifest of model {model_id} from any of {len(seeders)} seeders: "
                          + "; ".join(problems)[:600])
