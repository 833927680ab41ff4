"""DHT record schemas and keys (DESIGN.md section 5).

Contract: the payloads peers publish in the DHT, as frozen msgspec Structs in one tagged union
(``DhtRecord``), plus the key helpers. Every record lives under a key below with a subkey owned by
the writing peer (its peer id, or ``<peer id>/<tag>``); signing and validation are
``meshinfer.p2p``'s job, this module only defines and checks the schema. ``decode_record`` raises
only ``WireError`` (through ``wire.codec``). Pure: no I/O, no torch, no network.

Compatibility within one ``RECORD_VERSION``: fields are only ever added, with defaults, so a record
written before a field existed still decodes (the field takes its default), and unknown fields are
ignored, so older readers still decode newer records.

Bounds (issue 17): every record is at most ``MAX_RECORD_BYTES`` encoded, checked before decoding and when
encoding (``LimitExceededError`` naming the limit); a model has at most ``MAX_MODEL_BLOCKS`` blocks (card,
seed record, server span); a model card's id has the form of a manifest id (``MODEL_ID_HEX_CHARS`` lowercase hex
characters, ``models.fingerprint.manifest_id``) and its ``manifest_hash``, when given, is that same id. Every
storing and reading peer decodes with these rules, so an out-of-bound record is neither stored nor believed.

Keys::

    model:<model_id>      subkey peer id -> ModelCard     (who announces this model)
    servers:<model_id>    subkey peer id -> ServerRecord  (the model's servers: what readers read, one key a model)
    block:<model_id>:<i>  subkey peer id -> ServerRecord  (servers covering block i: still written for readers
                                                           from before ``servers:``, and read by ``read_coverage``
                                                           for servers from before it)
    models                subkey <peer id>/<model_id> -> ModelCard  (directory: lets ``swarm`` list models)
    seed:<model_id>       subkey peer id -> SeedRecord    (peers serving the model's weight pieces)
    reports:<model_id>    subkey <reporter id>/<tag> -> ReportRecord  (evidence that a server lied; issue 19)
    audits:<model_id>     subkey client peer id -> AuditTallyRecord  (a client's audit counts per server: its word)
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec

from meshinfer.errors import ConfigError, LimitExceededError, WireError
from meshinfer.types import DTYPES, BlockRange, ModelId
from meshinfer.wire.codec import Codec
from meshinfer.wire.limits import MAX_MODEL_BLOCKS, MAX_RECORD_BYTES, WireLimits

RECORD_VERSION: Final = 1
MODELS_KEY: Final = "models"
MODEL_ID_HEX_CHARS: Final = 32
"""Length of a model id: the manifest id (``models.fingerprint.FINGERPRINT_HEX_CHARS``; wire cannot import models)."""
_MODEL_ID = re.compile(rf"[0-9a-f]{{{MODEL_ID_HEX_CHARS}}}")
_SEALING_KEY = re.compile(r"[0-9a-f]{64}")

ServerState = Literal["joining", "online", "draining"]
SERVER_STATES: Final = ("joining", "online", "draining")

Text = Annotated[str, msgspec.Meta(max_length=256)]
IdText = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1e12)]


class ModelCard(msgspec.Struct, frozen=True, tag_field="type", tag="model_card"):
    """What a model is: enough for a client to plan routes and check compatibility."""

    model_id: IdText
    name: IdText
    family: Text
    num_blocks: Annotated[int, msgspec.Meta(ge=1, le=MAX_MODEL_BLOCKS)]
    hidden_size: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
    dtype: Annotated[str, msgspec.Meta(max_length=32)]
    manifest_hash: Text | None = None
    """The manifest id of the checkpoint (= ``model_id`` when given)."""
    v: int = RECORD_VERSION


class ServerRecord(msgspec.Struct, frozen=True, tag_field="type", tag="server"):
    """One server of one model: what it serves and how well (``span`` = blocks [start, end))."""

    peer_id: IdText
    model_id: IdText
    span: BlockRange
    state: ServerState
    throughput: Rate
    """Tokens per second this server can process for one session (compute and network)."""
    cache_tokens_left: Count
    addresses: Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=16)]
    software_version: Text
    public_name: Text | None = None
    direct_addresses: Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=8)] = []
    """Where the server takes direct-plane session streams (``/ip4/H/tcp/P``; see ``meshinfer.p2p.direct``)."""
    protocol_version: Annotated[int, msgspec.Meta(ge=0)] = 1
    sessions: Count = 0
    """Inference sessions open on this server now (its load)."""
    queued_steps: Count = 0
    """Steps waiting in the server's step loop now (0 when it keeps up)."""
    batch_throughput: Rate = 0.0
    """Aggregate decode tokens per second with ``batch_size`` sessions decoding together (0: not measured)."""
    batch_size: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    """The batch ``batch_throughput`` was measured at (0: not measured)."""
    quant: Annotated[str, msgspec.Meta(max_length=16)] = "none"
    """How this server holds its span's weights (``types.QUANT_MODES``). Outputs of different modes differ, so a
    route uses one mode on every hop; a mode this peer does not know is never routed to."""
    weight_bytes: Count = 0
    """Bytes of the span's weights in this server's memory, as loaded and quantized (0: not announced)."""
    device: Annotated[str, msgspec.Meta(max_length=64)] = "cpu"
    """What the span computes on, for people (``NVIDIA H200``, ``Apple MPS``, ``cpu``); routing reads throughput,
    never this. Records of older servers lack it (decoded as ``cpu``)."""
    dtype: Annotated[str, msgspec.Meta(max_length=16)] = "float32"
    """The span's compute dtype (``float32``, ``float16``, ``bfloat16``); older records: ``float32``."""
    reachability: Annotated[str, msgspec.Meta(max_length=16)] = "public"
    """How others reach the server's libp2p plane (``public``, ``hole-punched``, ``relayed``: only through a circuit
    relay; see ``meshinfer.p2p.natkind``); records of older servers lack it (decoded as ``public``). Routing charges
    a relayed hop more; a kind this peer does not know counts as relayed."""
    sealing_key: Annotated[str, msgspec.Meta(max_length=64)] = ""
    """The X25519 public key (64 lowercase hex characters) this full node takes sealed requests under
    (``/meshinfer/sealed/1``; issue 22), bound to the peer by the record's signature; empty: no sealed requests (not
    a full node, or not offered). Older records lack it (decoded as empty)."""
    credit_to: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    """The client peer that may spend the credit this server earns (``--credit-to``, issue 23): servers give that
    client's sessions the priority of this server's receipts. None: the server's own peer id only."""
    v: int = RECORD_VERSION


class SeedRecord(msgspec.Struct, frozen=True, tag_field="type", tag="seed"):
    """One peer that serves pieces of a model's weights (``meshinfer.weights``): which parts it holds and
    where to reach it. ``blocks`` are the block ranges it holds whole; ``client_part`` the embeddings, final
    norm and LM head; ``files`` config and tokenizer files (and the manifest)."""

    peer_id: IdText
    model_id: IdText
    num_blocks: Annotated[int, msgspec.Meta(ge=0, le=MAX_MODEL_BLOCKS)]
    blocks: Annotated[list[BlockRange], msgspec.Meta(max_length=1024)]
    client_part: bool
    files: bool
    addresses: Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=16)]
    direct_addresses: Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=8)] = []
    software_version: Text = ""
    v: int = RECORD_VERSION

    def has_block(self, block: int) -> bool:
        return any(block in r for r in self.blocks)


class ReportRecord(msgspec.Struct, frozen=True, tag_field="type", tag="report"):
    """A client's claim that ``accused`` returned wrong outputs for ``span`` of ``model_id``, with what anyone needs
    to check it (issue 19, D5): the accused's signed commit (steps, head, signature, public key) and the sha256
    and size of the evidence blob (``wire.evidence.EvidenceBlob``: chain entries, inputs, claimed outputs) that the
    reporter serves on ``meshinfer/evidence/1`` at ``addresses``. Believed only after ``client.reports`` verified
    it (the blob hashes to ``blob_sha256``, the chain to the signed head, the recomputed outputs differ)."""

    reporter: IdText
    accused: IdText
    model_id: IdText
    span: BlockRange
    session_id: IdText
    quant: Annotated[str, msgspec.Meta(max_length=16)]
    dtype: Annotated[str, msgspec.Meta(max_length=16)]
    """The session's wire dtype (the accused's outputs as claimed)."""
    commit_steps: Count
    commit_head: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    commit_signature: Annotated[bytes, msgspec.Meta(max_length=1024)]
    accused_key: Annotated[bytes, msgspec.Meta(max_length=1024)]
    window_start: Count
    window_end: Count
    blob_sha256: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    blob_size: Annotated[int, msgspec.Meta(ge=1, le=2**40)]
    addresses: Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=16)] = []
    direct_addresses: Annotated[list[Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=8)] = []
    verifier_dtype: Annotated[str, msgspec.Meta(max_length=16)] = ""
    """The dtype of the server whose recomputation disagreed (for the tolerance; empty: unknown)."""
    accused_dtype: Annotated[str, msgspec.Meta(max_length=16)] = ""
    """The dtype the accused computes in, as its server record announced (empty: unknown)."""
    created: Annotated[float, msgspec.Meta(ge=0.0, le=1e11)] = 0.0
    v: int = RECORD_VERSION


MAX_TALLY_PEERS: Final = 64
"""Most servers one audit tally lists (the most audited first)."""


class PeerTally(msgspec.Struct, frozen=True, array_like=True):
    """What one client's audits found about one server peer: windows passed and failed, positions verified."""

    peer_id: IdText
    passed: Count
    failed: Count
    positions: Count


class AuditTallyRecord(msgspec.Struct, frozen=True, tag_field="type", tag="audit_tally"):
    """A client's audit counters for one model (issue 19): per audited server (at most ``MAX_TALLY_PEERS``, the most
    audited first) the windows its claims passed and failed and the positions verified, plus the client's totals.
    The CLIENT'S WORD: unlike a report, nothing in it can be re-verified, so readers show it as a claim. Stored under
    ``audits:<model_id>`` with the subkey ``client`` (the DHT validator refuses any other)."""

    client: IdText
    model_id: IdText
    peers: Annotated[list[PeerTally], msgspec.Meta(max_length=MAX_TALLY_PEERS)]
    passed: Count = 0
    """Windows passed over every server this client audited (also those beyond ``peers``)."""
    failed: Count = 0
    detections: Count = 0
    unresolved: Count = 0
    created: Annotated[float, msgspec.Meta(ge=0.0, le=1e11)] = 0.0
    v: int = RECORD_VERSION


DhtRecord = ModelCard | ServerRecord | SeedRecord | ReportRecord | AuditTallyRecord



def model_key(model_id: ModelId) -> str:
    return f"model:{model_id}"


def servers_key(model_id: ModelId) -> str:
    return f"servers:{model_id}"


def block_key(model_id: ModelId, block: int) -> str:
    return f"block:{model_id}:{block}"


def seed_key(model_id: ModelId) -> str:
    return f"seed:{model_id}"


def reports_key(model_id: ModelId) -> str:
    return f"reports:{model_id}"


def audits_key(model_id: ModelId) -> str:
    return f"audits:{model_id}"


def is_model_id(text: str) -> bool:
    """Whether ``text`` has the form of a model id (a manifest id: 32 lowercase hex characters)."""
    return _MODEL_ID.fullmatch(text) is not None


def _check(record: DhtRecord, _limits: WireLimits) -> None:
    if isinstance(record, ModelCard):
        if record.dtype not in DTYPES:
            raise WireError(f"model card dtype {record.dtype[:32]!r} is not one of {', '.join(DTYPES)}")
        if not is_model_id(record.model_id):
            raise WireError(f"model card id {record.model_id[:40]!r} is not a model id ({MODEL_ID_HEX_CHARS} "
                            "lowercase hex characters: the manifest id)")
        if record.manifest_hash is not None and record.manifest_hash != record.model_id:
            raise WireError(f"model card {record.model_id} names manifest {record.manifest_hash[:40]!r}: "
                            "a model id is its manifest id")
    if isinstance(record, ServerRecord) and record.sealing_key and _SEALING_KEY.fullmatch(record.sealing_key) is None:
        raise WireError("a server record's sealing key must be 64 lowercase hex characters (an X25519 key)")
    if isinstance(record, ServerRecord) and record.span.end > MAX_MODEL_BLOCKS:
        raise LimitExceededError(f"server record span {record.span} is beyond block {MAX_MODEL_BLOCKS} "
                                 f"(limit MAX_MODEL_BLOCKS {MAX_MODEL_BLOCKS})")
    if isinstance(record, SeedRecord) and any(r.end > record.num_blocks for r in record.blocks):
        raise WireError(f"seed record names blocks beyond the model's {record.num_blocks}")
    if isinstance(record, ReportRecord):
        if record.span.end > MAX_MODEL_BLOCKS:
            raise LimitExceededError(f"report span {record.span} is beyond block {MAX_MODEL_BLOCKS} "
                                     f"(limit MAX_MODEL_BLOCKS {MAX_MODEL_BLOCKS})")
        if not record.window_start < record.window_end:
            raise WireError(f"report window [{record.window_start}, {record.window_end}) is empty")
        if record.accused == record.reporter:
            raise WireError("a report accuses its own reporter")
    if isinstance(record, AuditTallyRecord) and len({p.peer_id for p in record.peers}) != len(record.peers):
        raise WireError("an audit tally lists a server twice")


_codec: Codec[DhtRecord] = Codec(
    DhtRecord, (ModelCard, ServerRecord, SeedRecord, ReportRecord, AuditTallyRecord),
    version=RECORD_VERSION, kind="DHT record",
    label="DHT record", version_error=lambda v: WireError(f"DHT record version {v}, this peer reads version "
                                                          f"{RECORD_VERSION}"), length_limits=True, check=_check,
)


def encode_record(record: DhtRecord) -> bytes:
    """msgpack bytes of ``record``; ``LimitExceededError`` when they exceed ``MAX_RECORD_BYTES``."""
    data = _codec.encode(record)
    if len(data) > MAX_RECORD_BYTES:
        raise LimitExceededError(f"DHT record of {len(data)} bytes (limit MAX_RECORD_BYTES {MAX_RECORD_BYTES})")
    return data


def decode_record(data: bytes | memoryview) -> DhtRecord:
    """Decode and validate a record payload; raise WireError for anything malformed or inconsistent, and
    ``LimitExceededError`` for a payload over ``MAX_RECORD_BYTES`` (checked before decoding anything)."""
    if len(data) > MAX_RECORD_BYTES:
        raise LimitExceededError(f"DHT record of {len(data)} bytes (limit MAX_RECORD_BYTES {MAX_RECORD_BYTES})")
    return _codec.decode(data)


def check_server_record(record: ServerRecord, num_blocks: int | None = None) -> None:
    """Raise WireError unless the record's span fits a model of ``num_blocks`` blocks (when known)."""
    if num_blocks is not None:
        try:
            record.span.check_within(num_blocks)
        except ConfigError as err:
            raise WireError(str(err)) from None
