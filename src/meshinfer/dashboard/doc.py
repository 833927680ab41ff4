"""The swarm document: what ``meshinfer swarm --json`` prints and what the dashboard's ``/api/swarm`` serves.

Contract: pure functions from what the DHT says (a ``p2p.announce.SwarmSnapshot``, duck-typed) to plain JSON
data, plus ``swarm_doc(node, timeout)``, which reads the snapshot through an already started ``PeerNode``
(``meshinfer.p2p`` is imported inside it, so importing this module stays cheap for ``meshinfer --help``).
The swarm document::

    {"models": [{"model_id", "name", "family", "num_blocks", "hidden_size", "dtype", "manifest_hash",
                 "announced_by", "block_servers": [servers per block], "block_throughput": [tokens/s of the
                 online servers per block], "missing_blocks": [...], "complete": bool,
                 "servers": [{"peer_id", "span", "state", "quant", "weight_bytes", "device", "dtype",
                              "reachability", "sealed", "throughput", "cache_tokens_left", "sessions", "queued_steps",
                              "software_version", "public_name", "addresses", "direct_addresses",
                              "reports": [reporter peer ids],
                              "audits": null | {"passed", "failed", "positions", "clients"}}],
                 "audit_clients": clients whose tally of this model was read}],
     "complete": bool}

``reports`` lists the peers that published a report (``reports:<model_id>``, issue 19) naming that server: CLAIMS,
not verified here (verification recomputes the span: ``SwarmView.check_reports`` does it, ``swarm`` does not), so
tools show them as such. ``audits`` sums the audit tallies (``audits:<model_id>``: each client's audit counts per
server, ``p2p.directory.tallies_of``/``sum_tallies``) that list the server: windows passed and failed and positions
verified "as reported by ``clients`` clients": UNVERIFIED CLAIMS (a tally is its client's word; only reports can be
re-checked); null when no tally lists it.

``dashboard_payload`` adds what the web page needs on top of it: ``rtt_ms`` per server (measured from the
viewer's node; null when unknown), per-model ``bottleneck_throughput``, swarm ``totals``, ``error`` (null, or
why the swarm could not be read), and timestamps; inside ``meshinfer api``, ``gateway_audits`` (the gateway's OWN
client's live ``AuditCounters.as_dict()``: detections and totals; null elsewhere) and per server
``gateway_audits`` (that client's passed/failed/unaudited/positions for it, or null). Knows nothing of HTTP or
of how records were read.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Protocol


class _RecordLike(Protocol):
    @property
    def span(self) -> Any: ...
    @property
    def state(self) -> str: ...
    @property
    def throughput(self) -> float: ...


def block_throughput(servers: Iterable[_RecordLike], num_blocks: int) -> list[float]:
    """Per block, the summed throughput (tokens/s) of the ``online`` servers covering it."""
    out = [0.0] * num_blocks
    for rec in servers:
        if rec.state != "online":
            continue
        for i in range(max(0, rec.span.start), min(num_blocks, rec.span.end)):
            out[i] += float(rec.throughput)
    return [round(t, 3) for t in out]


def server_entry(rec: Any) -> dict[str, Any]:
    """One ``ServerRecord`` as the document shows it."""
    return {"peer_id": rec.peer_id, "span": str(rec.span), "state": rec.state,
            "quant": getattr(rec, "quant", "none"), "weight_bytes": getattr(rec, "weight_bytes", 0),
            "device": getattr(rec, "device", "cpu"), "dtype": getattr(rec, "dtype", "float32"),
            "reachability": getattr(rec, "reachability", "public"),
            "sealed": bool(getattr(rec, "sealing_key", "")),  # takes sealed requests (issue 22)
            "throughput": rec.throughput,
            "cache_tokens_left": rec.cache_tokens_left, "sessions": rec.sessions, "queued_steps": rec.queued_steps,
            "software_version": rec.software_version, "public_name": rec.public_name,
            "addresses": list(rec.addresses), "direct_addresses": list(rec.direct_addresses)}


def audits_entry(total: Any) -> dict[str, int]:
    """One server's summed tallies (a ``p2p.directory.TallySum``) as the document shows them."""
    return {"passed": int(total.passed), "failed": int(total.failed), "positions": int(total.positions),
            "clients": int(total.clients)}


def snapshot_doc(snapshot: Any, reports: Mapping[str, Iterable[Any]] | None = None,
                 audits: Mapping[str, tuple[int, Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """The swarm document of a ``SwarmSnapshot`` (models in the snapshot's order, servers by span); ``reports``:
    model id -> its ``ReportRecord``s (claims); ``audits``: model id -> (clients whose tally was read, server peer
    id -> its ``TallySum``) (claims)."""
    models = []
    for entry in snapshot.models:
        card = entry.card
        cov = snapshot.coverage[card.model_id]
        records = sorted(cov.servers.values(), key=lambda r: (r.span.start, r.span.end, r.peer_id))
        models.append({
            "model_id": card.model_id, "name": card.name, "family": card.family,
            "num_blocks": card.num_blocks, "hidden_size": card.hidden_size, "dtype": card.dtype,
            "manifest_hash": card.manifest_hash, "announced_by": entry.announced_by,
            "block_servers": cov.counts(), "block_throughput": block_throughput(records, card.num_blocks),
            "missing_blocks": cov.missing(), "complete": cov.complete,
            "servers": [server_entry(r) for r in records],
        })
        claims: dict[str, set[str]] = {}
        for report in (reports or {}).get(card.model_id, ()):
            claims.setdefault(report.accused, set()).add(report.reporter)
        clients, sums = (audits or {}).get(card.model_id, (0, {}))
        models[-1]["audit_clients"] = clients
        for server in models[-1]["servers"]:
            server["reports"] = sorted(claims.get(server["peer_id"], ()))
            total = sums.get(server["peer_id"])
            server["audits"] = None if total is None else audits_entry(total)
    return {"models": models, "complete": snapshot.complete}


async def swarm_doc(node: Any, timeout: float) -> dict[str, Any]:
    """The swarm document, read through an already started ``PeerNode`` (two DHT calls, each ``timeout``)."""
    from meshinfer.p2p.announce import read_swarm
    from meshinfer.p2p.directory import sum_tallies, tallies_of
    from meshinfer.wire.records import ReportRecord, audits_key, reports_key

    snapshot = await read_swarm(node, timeout=timeout)
    ids = [entry.card.model_id for entry in snapshot.models]
    keys = [k for m in ids for k in (reports_key(m), audits_key(m))]
    found = await node.get_many(keys, timeout=timeout) if ids else {}
    reports = {m: [f.record for f in found.get(reports_key(m), [])
                   if isinstance(f.record, ReportRecord) and f.record.reporter == f.peer_id] for m in ids}
    audits: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for m in ids:
        tallies = tallies_of(m, found, node.record_limits, snapshot.skipped)
        audits[m] = (len(tallies), sum_tallies(tallies))
    return snapshot_doc(snapshot, reports, audits)


def swarm_totals(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Swarm-wide figures of a document's models: servers (records), distinct peers, blocks, holes, load."""
    peers: set[str] = set()
    servers = online = sessions = missing = blocks = 0
    throughput = 0.0
    for m in models:
        blocks += m["num_blocks"]
        missing += len(m["missing_blocks"])
        for s in m["servers"]:
            servers += 1
            peers.add(s["peer_id"])
            sessions += int(s.get("sessions", 0))
            if s["state"] == "online":
                online += 1
                throughput += float(s["throughput"])
    return {"models": len(models), "servers": servers, "online": online, "peers": len(peers),
            "blocks": blocks, "missing_blocks": missing, "sessions": sessions,
            "throughput": round(throughput, 3),
            "complete_models": sum(1 for m in models if not m["missing_blocks"])}


def dashboard_payload(doc: Mapping[str, Any] | None, *, rtt_ms: Mapping[str, float | None] | None = None,
                      error: str | None = None, updated_at: float | None = None, checked_at: float | None = None,
                      viewer: str | None = None, interval: float | None = None,
                      gateway_audits: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``/api/swarm`` serves: the swarm document (empty when never read) with ``rtt_ms`` per server,
    ``bottleneck_throughput`` per model (the weakest block's tokens/s; 0 with a hole), ``totals`` and status;
    ``gateway_audits``: the serving gateway's own ``AuditCounters.as_dict()`` (None: not inside a gateway)."""
    base = copy.deepcopy(dict(doc)) if doc is not None else {"models": [], "complete": False}
    rtt = rtt_ms or {}
    own: Mapping[str, Any] = (gateway_audits or {}).get("peers") or {}
    for m in base["models"]:
        for s in m["servers"]:
            s["rtt_ms"] = rtt.get(s["peer_id"])
            mine = own.get(s["peer_id"])
            s["gateway_audits"] = dict(mine) if mine is not None else None
        per_block = m.get("block_throughput") or [0.0]
        m["bottleneck_throughput"] = min(per_block) if per_block else 0.0
    base["totals"] = swarm_totals(base["models"])
    base["error"] = error
    base["updated_at"] = updated_at
    base["checked_at"] = checked_at
    base["viewer_peer_id"] = viewer
    base["refresh_interval"] = interval
    base["gateway_audits"] = None if gateway_audits is None else {
        **{k: v for k, v in gateway_audits.items() if k != "peers"},
        "passed": sum(int(p.get("passed", 0)) for p in own.values()),
        "failed": sum(int(p.get("failed", 0)) for p in own.values()), "servers": len(own)}
    return base
