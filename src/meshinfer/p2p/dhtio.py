"""Writing and reading signed records on the in-process hivemind DHT node: the bodies of ``PeerNode``'s DHT calls.

Contract: ``put_records(dht, items, ...)`` stores each ``Put`` (a ``DhtRecord`` under a key, subkey
``<peer id>`` or ``<peer id>/<tag>``: ``p2p.signing.make_subkey``; the DHT's validator signs it) until an
expiration time, in ONE bounded call, and says per item whether some node stored it (two items with one key and
tag: ``UsageError``; timed out: all False). A client-mode node (``exclude_self``) never counts itself as a replica:
no other peer can read its storage, so a write that reached only itself is a failed write, not a stored record.
``get_records(dht, keys, ...)`` reads every key in ONE call bounded by a timeout, at most
``RecordLimits.max_keys_per_read`` keys (more: ``UsageError``), each key's answer decoded by
``p2p.dhtentries.decode_entries`` within the limits (skips counted in the caller's counter); keys not answered in
time are absent. Keys are mapped through ``dht_key`` (a private swarm's sealed names) on the way in and back on the
way out: callers name plain keys. Knows nothing of streams, identities beyond a peer id, or what the records mean.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from meshinfer.errors import UsageError
from meshinfer.p2p.dhtentries import FoundRecord, decode_entries
from meshinfer.p2p.signing import make_subkey
from meshinfer.wire.limits import RecordLimits
from meshinfer.wire.records import DhtRecord, encode_record

if TYPE_CHECKING:
    from hivemind.dht.node import DHTNode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Put:
    """One record to store under ``key``; ``tag`` makes the subkey ``<peer id>/<tag>``."""

    key: str
    record: DhtRecord
    tag: str | None = None


async def put_records(dht: DHTNode, items: Sequence[Put], expiration_time: float, *, peer_id: str,
                      dht_key: Callable[[str], str], timeout: float, exclude_self: bool = False) -> list[bool]:
    """Store each record until ``expiration_time``; per item: stored by some node (``exclude_self``: some OTHER
    node; see the module docstring)."""
    if not items:
        return []
    keys = [dht_key(p.key) for p in items]
    values = [encode_record(p.record) for p in items]
    subkeys = [make_subkey(peer_id, p.tag) for p in items]
    if len(set(zip(keys, subkeys, strict=True))) != len(items):
        raise UsageError("two records for the same key and tag in one write")
    try:
        async with asyncio.timeout(timeout):
            ok = await dht.store_many(keys, values, expiration_time, subkeys=subkeys, exclude_self=exclude_self)
    except TimeoutError:
        log.warning("DHT store of %d records timed out after %gs", len(items), timeout)
        return [False] * len(items)
    return [bool(ok.get((k, s), False)) for k, s in zip(keys, subkeys, strict=True)]


async def get_records(dht: DHTNode, keys: Iterable[str], *, dht_key: Callable[[str], str], limits: RecordLimits,
                      skipped: Counter[str], timeout: float, latest: bool) -> dict[str, list[FoundRecord]]:
    """All valid records under each key (sorted by subkey), in one call bounded by ``timeout``; ``latest`` asks
    every replica the search meets, else the first non-expired answer per key wins."""
    keys = list(dict.fromkeys(keys))
    if not keys:
        return {}
    if len(keys) > limits.max_keys_per_read:
        raise UsageError(f"one DHT read of {len(keys)} keys (limit max_keys_per_read {limits.max_keys_per_read})")
    # With return_futures=True hivemind returns one asyncio.Future per key (its annotation names values).
    stored = {dht_key(k): k for k in keys}
    futures = cast("dict[str, asyncio.Future[object]]", await dht.get_many(
        list(stored), sufficient_expiration_time=math.inf if latest else None, return_futures=True,
    ))
    done, pending = await asyncio.wait(set(futures.values()), timeout=timeout)
    for fut in pending:
        fut.cancel()
    now = time.time()
    out: dict[str, list[FoundRecord]] = {}
    for key, fut in futures.items():
        if fut not in done or fut.cancelled() or fut.exception() is not None:
            continue
        out[stored.get(key, key)] = decode_entries(fut.result(), now, limits, skipped)
    return out
