"""Reading what the DHT returned: hivemind's nested values with expirations -> validated, bounded ``FoundRecord``s.

Contract: ``decode_entries`` turns one key's answer (``ValueWithExpiration({subkey: ValueWithExpiration(bytes)})``,
read by attribute, so no hivemind import) into records, in sorted subkey order, within ``RecordLimits`` (per key,
per signer), dropping expired entries and counting what it skips by reason (``invalid``, ``wrong owner``, over a
limit). Signatures were checked by the DHT's validator before; this checks that a server or seed record names the
peer that signed it. No network.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from meshinfer.errors import WireError
from meshinfer.p2p.signing import owner_of
from meshinfer.wire.limits import RecordLimits
from meshinfer.wire.records import DhtRecord, SeedRecord, ServerRecord, decode_record


@dataclass(frozen=True)
class FoundRecord:
    """One validated DHT record: who wrote it, what it says, when it expires (unix time)."""

    peer_id: str
    record: DhtRecord
    expiration_time: float
    subkey: str


def decode_entries(found: object, now: float, limits: RecordLimits, skipped: Counter[str]) -> list[FoundRecord]:
    """Turn hivemind's ``ValueWithExpiration({subkey: ValueWithExpiration(bytes)})`` into records, decoding at
    most ``limits.max_records_per_key`` (``max_records_per_signer`` per owner), subkeys in sorted order; what is
    skipped is counted in ``skipped`` by reason."""
    out: list[FoundRecord] = []
    value = getattr(found, "value", None)
    if not isinstance(value, dict):
        return out
    per_owner: Counter[str] = Counter()
    items = sorted(((k, v) for k, v in value.items() if isinstance(k, str)), key=lambda kv: kv[0])
    skipped["invalid"] += len(value) - len(items)
    for subkey, item in items:
        payload = getattr(item, "value", None)
        expiration = getattr(item, "expiration_time", None)
        if not isinstance(payload, bytes) or not isinstance(expiration, int | float):
            skipped["invalid"] += 1
            continue
        if expiration <= now:
            continue
        if len(out) >= limits.max_records_per_key:
            skipped["over per-key limit"] += 1
            continue
        owner = owner_of(subkey)
        if per_owner[owner] >= limits.max_records_per_signer:
            skipped["over per-signer limit"] += 1
            continue
        per_owner[owner] += 1
        try:
            record = decode_record(payload)
        except WireError:
            skipped["invalid"] += 1
            continue
        if isinstance(record, ServerRecord | SeedRecord) and record.peer_id != owner:
            skipped["wrong owner"] += 1
            continue
        out.append(FoundRecord(owner, record, float(expiration), subkey))
    return out
