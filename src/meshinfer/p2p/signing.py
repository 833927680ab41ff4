"""Owner-signed DHT records: the envelope format and the validator every DHT node runs.

Contract: a stored value is an ``Envelope`` (payload, public key, signature) where the signature
covers (domain, key, subkey, payload, expiration) as the DHT sees them. ``SignedRecordValidator``
plugs into hivemind's DHT (a ``RecordValidatorBase``): it signs what this node stores with this
node's key, and accepts a record only if ALL hold:

- the subkey is ``<peer id>`` or ``<peer id>/<tag>`` (``owner_of``), and the envelope's public key
  hashes to exactly that peer id (so nobody can write under another peer's subkey);
- the signature verifies (so tampered values are dropped);
- the payload decodes as a ``meshinfer.wire.records`` record and a ``ServerRecord``/``SeedRecord`` names the same
  peer id as its subkey's owner (a ``ReportRecord``: its ``reporter``); an ``AuditTallyRecord`` is stored only
  under the subkey that is exactly its ``client`` (no tag: one tally per client and key);
- the expiration time is at most ``max_ttl`` seconds ahead (no everlasting records);
- the value is at most ``MAX_ENVELOPE_BYTES`` (a record of ``MAX_RECORD_BYTES`` plus key and signature),
  checked before anything is decoded or hashed.

Plain (subkey-less) values are always rejected, so nobody can overwrite a dictionary of records with
a single value. Every node applies the same rules when asked to store and when reading replies, so a
forged record is refused by honest storers and ignored by honest readers. Results are memoised in a
small bounded cache (RSA verification is the costly part). In a private swarm (``record_validator`` with a
swarm key) a ``SealedValueValidator`` wraps the envelope in an AEAD seal of the swarm (``membership``): a value
that does not open is refused before the envelope is looked at. Only this module and ``node`` know about
hivemind's validator interface.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict

import msgspec

# isort: split
from meshinfer.p2p import _hivemind_logging  # noqa: F401 - first: before hivemind is imported

# isort: split
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase

from meshinfer.errors import WireError
from meshinfer.p2p.identity import Identity, peer_id_of_public_key, verify_signature
from meshinfer.p2p.membership import SEAL_OVERHEAD, SwarmKey
from meshinfer.wire.limits import KIB, MAX_RECORD_BYTES
from meshinfer.wire.records import AuditTallyRecord, ReportRecord, SeedRecord, ServerRecord, decode_record

log = logging.getLogger(__name__)

DOMAIN = b"meshinfer-record-v1"
MAX_SUBKEY_CHARS = 320
TAG_SEPARATOR = "/"
DEFAULT_MAX_TTL = 3600.0
MAX_ENVELOPE_BYTES = MAX_RECORD_BYTES + 4 * KIB


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    payload: bytes
    public_key: bytes
    signature: bytes


_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_bytes_decoder = msgspec.msgpack.Decoder(bytes)
_str_decoder = msgspec.msgpack.Decoder(str)
_encoder = msgspec.msgpack.Encoder()
_NONE = _encoder.encode(None)


def owner_of(subkey: str) -> str:
    """The peer id that owns ``subkey`` (``<peer id>`` or ``<peer id>/<tag>``)."""
    return subkey.split(TAG_SEPARATOR, 1)[0]


def make_subkey(peer_id: str, tag: str | None = None) -> str:
    return peer_id if tag is None else f"{peer_id}{TAG_SEPARATOR}{tag}"


def signed_bytes(key: bytes, subkey: bytes, payload: bytes, expiration_time: float) -> bytes:
    """The exact bytes a record signature covers."""
    return _encoder.encode((DOMAIN, key, subkey, payload, float(expiration_time)))


def make_envelope(identity: Identity, record: DHTRecord) -> bytes:
    """Sign ``record`` (value = the serialized payload) with ``identity``; return the envelope bytes."""
    sig = identity.sign(signed_bytes(record.key, record.subkey, record.value, record.expiration_time))
    return _encoder.encode(Envelope(record.value, identity.public_key, sig))


class SignedRecordValidator(RecordValidatorBase):
    """hivemind record validator enforcing owner-signed meshinfer records (see module docstring)."""

    def __init__(self, identity: Identity | None, *, max_ttl: float = DEFAULT_MAX_TTL,
                 cache_size: int = 4096) -> None:
        self._identity = identity
        self._max_ttl = max_ttl
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._cache_size = cache_size

    # --- hivemind interface -------------------------------------------------------------------

    def validate(self, record: DHTRecord) -> bool:
        if record.expiration_time > time.time() + self._max_ttl:
            return False
        if len(record.value) > MAX_ENVELOPE_BYTES or len(record.subkey) > 4 * MAX_SUBKEY_CHARS:
            return False
        digest = hashlib.sha256(
            _encoder.encode((record.key, record.subkey, record.value, float(record.expiration_time)))
        ).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            self._cache.move_to_end(digest)
            return cached
        ok = self._check(record)
        self._cache[digest] = ok
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ok

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._identity is None:
            return record.value  # a client-only node never writes; an unsigned value is invalid anyway
        return make_envelope(self._identity, record)

    def strip_value(self, record: DHTRecord) -> bytes:
        try:
            return _envelope_decoder.decode(record.value).payload
        except (msgspec.DecodeError, msgspec.ValidationError):
            return _NONE  # readers see None and skip it

    @property
    def priority(self) -> int:
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False

    # --- rules --------------------------------------------------------------------------------

    def _check(self, record: DHTRecord) -> bool:
        try:
            subkey = _str_decoder.decode(record.subkey)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.debug("rejected record: subkey is not a peer id (plain values are not allowed)")
            return False
        owner = owner_of(subkey)
        if not 0 < len(subkey) <= MAX_SUBKEY_CHARS or not owner or subkey.endswith(TAG_SEPARATOR):
            return False
        try:
            env = _envelope_decoder.decode(record.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.debug("rejected record under %s: value is not a signed envelope", subkey)
            return False
        if peer_id_of_public_key(env.public_key) != owner:
            log.debug("rejected record under %s: signed by a different key", subkey)
            return False
        if not verify_signature(env.public_key, signed_bytes(record.key, record.subkey, env.payload,
                                                             record.expiration_time), env.signature):
            log.debug("rejected record under %s: bad signature", subkey)
            return False
        try:
            decoded = decode_record(_bytes_decoder.decode(env.payload))
        except (msgspec.DecodeError, msgspec.ValidationError, WireError):
            log.debug("rejected record under %s: payload does not match the schema", subkey)
            return False
        if isinstance(decoded, ServerRecord | SeedRecord) and decoded.peer_id != owner:
            log.debug("rejected record under %s: server record names peer %s", subkey, decoded.peer_id)
            return False
        if isinstance(decoded, ReportRecord) and decoded.reporter != owner:
            log.debug("rejected report under %s: it names reporter %s", subkey, decoded.reporter)
            return False
        if isinstance(decoded, AuditTallyRecord) and decoded.client != subkey:
            log.debug("rejected audit tally under %s: it names client %s", subkey, decoded.client)
            return False
        return True


class SealedValueValidator(RecordValidatorBase):
    """A private swarm's outer layer (``meshinfer.p2p.membership``): values are sealed with the swarm's record key
    after signing and must open before anything else is checked, so outsiders can neither read nor store records
    members accept. Runs before ``SignedRecordValidator`` when validating (higher priority)."""

    def __init__(self, key: SwarmKey) -> None:
        self._key = key

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) > MAX_ENVELOPE_BYTES + SEAL_OVERHEAD:
            return False
        return self._key.unseal(record.value, record.key, record.subkey) is not None

    def sign_value(self, record: DHTRecord) -> bytes:
        return self._key.seal(record.value, record.key, record.subkey)

    def strip_value(self, record: DHTRecord) -> bytes:
        opened = self._key.unseal(record.value, record.key, record.subkey)
        return _NONE if opened is None else opened

    @property
    def priority(self) -> int:
        return 20

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def record_validator(identity: Identity | None, *, max_ttl: float = DEFAULT_MAX_TTL,
                     swarm_key: SwarmKey | None = None) -> RecordValidatorBase:
    """The validator a node's DHT runs: owner-signed records, sealed too in a private swarm."""
    signed = SignedRecordValidator(identity, max_ttl=max_ttl)
    return signed if swarm_key is None else CompositeValidator([signed, SealedValueValidator(swarm_key)])
