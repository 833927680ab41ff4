"""Reports over the network: serving evidence, publishing and reading reports, recomputing through a server.

Contract (issue 19, D5): ``EvidenceStore`` holds the evidence blobs this peer published (bounded: at most
``MAX_STORED_BYTES`` in all, the oldest dropped first) and serves them on ``meshinfer/evidence/1``
(``wire.evidence``: one ``GetEvidence(sha256)`` per stream, answered ``EvidenceData`` or ``EvidenceError``; only
blobs it stores, by their hash). ``publish_report(node, store, blob)`` stores the blob, starts serving, and puts the
``ReportRecord`` under ``reports:<model_id>`` (subkey ``<this peer>/<blob hash prefix>``, signed by this peer:
nobody can publish under another's subkey, ``p2p.signing``) for ``REPORT_TTL_S``; ``announce_report`` renews it
(``SwarmView`` does, every half TTL, while it runs and still stores the blob). ``read_reports`` reads that key
(records the DHT validator accepted). ``fetch_evidence`` gets a report's blob from its reporter, refusing
anything larger than the report said or ``MAX_EVIDENCE_BYTES``, or not hashing to it.
``remote_recompute(node, route, ...)`` is a ``client.reports.Recompute`` through a route of servers covering the
report's span (the caller plans it avoiding the accused and the reporter). Runs on the node's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch

from meshinfer.client.reports import Recompute, make_report
from meshinfer.client.routing import RouteHop
from meshinfer.client.session import InferenceSession
from meshinfer.errors import MeshinferError, TransportError, WireError
from meshinfer.p2p.node import FoundRecord, PeerNode
from meshinfer.p2p.stream import MessageStream, StreamClosed
from meshinfer.wire.evidence import (
    EVIDENCE_PROTOCOL,
    MAX_EVIDENCE_BYTES,
    EvidenceBlob,
    EvidenceData,
    EvidenceError,
    GetEvidence,
    decode_evidence_message,
    encode_evidence_message,
)
from meshinfer.wire.records import ReportRecord, reports_key

log = logging.getLogger(__name__)

MAX_STORED_BYTES = 256 * 1024 * 1024
"""Most bytes of evidence one peer keeps to serve."""
REPORT_TTL_S = 3600.0
"""How long a published report lives in the DHT."""


class EvidenceStore:
    """The evidence blobs this peer serves (see the module docstring)."""

    def __init__(self, max_bytes: int = MAX_STORED_BYTES) -> None:
        self.max_bytes = max_bytes
        self.blobs: OrderedDict[bytes, bytes] = OrderedDict()
        self.served = 0
        self._handling: set[int] = set()

    def add(self, data: bytes) -> bytes:
        """Keep ``data`` (dropping the oldest blobs beyond ``max_bytes``); its sha256."""
        digest = hashlib.sha256(data).digest()
        self.blobs[digest] = data
        while sum(len(b) for b in self.blobs.values()) > self.max_bytes and len(self.blobs) > 1:
            self.blobs.popitem(last=False)
        return digest

    async def serve_on(self, node: PeerNode) -> None:
        """Answer ``meshinfer/evidence/1`` on ``node`` (once per node)."""
        if id(node) not in self._handling:
            await node.handle(EVIDENCE_PROTOCOL, self.handle)
            self._handling.add(id(node))

    async def handle(self, stream: MessageStream) -> None:
        try:
            payload = await stream.recv_bytes(timeout=30.0)
        except (StreamClosed, MeshinferError):
            return
        try:
            msg = decode_evidence_message(payload)
        except WireError as err:
            reply: EvidenceData | EvidenceError = EvidenceError(message=str(err)[:1024])
        else:
            data = self.blobs.get(msg.sha256) if isinstance(msg, GetEvidence) else None
            reply = EvidenceData(data=data) if data is not None else EvidenceError(message="no such evidence here")
        if isinstance(reply, EvidenceData):
            self.served += 1
        with contextlib.suppress(MeshinferError):
            await stream.send_bytes(encode_evidence_message(reply))


async def publish_report(node: PeerNode, store: EvidenceStore, blob: EvidenceBlob, *, verifier_dtype: str = "",
                         ttl: float = REPORT_TTL_S) -> ReportRecord:
    """Store and serve ``blob``, and announce its ``ReportRecord`` (returned) under ``reports:<model_id>``."""
    record, data = make_report(blob, reporter=node.peer_id, addresses=node.maddrs,
                               direct_addresses=node.direct_addresses, verifier_dtype=verifier_dtype)
    store.add(data)
    await store.serve_on(node)
    await announce_report(node, record, ttl=ttl)
    return record


async def announce_report(node: PeerNode, record: ReportRecord, *, ttl: float = REPORT_TTL_S) -> bool:
    """(Re-)announce ``record`` for ``ttl`` seconds from now (a later expiration replaces the stored one)."""
    ok = await node.dht_put_record(reports_key(record.model_id), record, time.time() + ttl,
                                   tag=record.blob_sha256.hex()[:16])
    if not ok:
        log.warning("the report against %s was not stored in the DHT", record.accused[:12])
    return ok


async def read_reports(node: PeerNode, model_id: str, *, timeout: float = 5.0) -> list[ReportRecord]:
    """The reports under ``reports:<model_id>`` (each signed by its reporter: the DHT validator checked)."""
    found: list[FoundRecord] = await node.dht_get_records(reports_key(model_id), timeout=timeout)
    return [f.record for f in found if isinstance(f.record, ReportRecord) and f.record.reporter == f.peer_id]


async def fetch_evidence(node: PeerNode, record: ReportRecord, *, timeout: float = 30.0) -> bytes:
    """The blob of ``record`` from its reporter; ``TransportError``/``WireError`` when it cannot be had."""
    if record.blob_size > MAX_EVIDENCE_BYTES:
        raise WireError(f"report evidence of {record.blob_size} bytes exceeds MAX_EVIDENCE_BYTES")
    async with await node.open_stream(record.reporter, EVIDENCE_PROTOCOL, maddrs=record.addresses,
                                      direct=record.direct_addresses, timeout=timeout) as stream:
        await stream.send_bytes(encode_evidence_message(GetEvidence(sha256=record.blob_sha256)))
        reply = decode_evidence_message(await stream.recv_bytes(timeout=timeout))
    if not isinstance(reply, EvidenceData):
        raise TransportError(f"the reporter {record.reporter[:12]} has no evidence: "
                             f"{reply.message if isinstance(reply, EvidenceError) else type(reply).__name__}")
    if len(reply.data) != record.blob_size or hashlib.sha256(reply.data).digest() != record.blob_sha256:
        raise WireError("the evidence served does not hash to the report's blob_sha256")
    return reply.data


def remote_recompute(node: PeerNode, route: Sequence[RouteHop], *, model_id: str, dtype: str,
                     quant: str | None) -> Recompute:
    """A ``Recompute`` through ``route`` (servers covering the report's span, one session for all steps)."""
    async def recompute(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        total = sum(x.shape[0] for x in inputs)
        session = await InferenceSession.open(node, route, model_id=model_id, max_length=max(1, total), dtype=dtype,
                                              quant=quant)
        try:
            return [await session.step(x) for x in inputs]
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await session.close()

    return recompute
