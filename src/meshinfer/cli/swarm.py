"""``meshinfer swarm``: show what a swarm serves: models, block coverage and servers.

Contract: joins through ``--initial-peers`` (without them: the peers found on this LAN by mDNS, ``cli.lan``) as a
client-only DHT peer (stores nothing for others),
reads the swarm in two DHT calls bounded by ``--timeout`` (``p2p.directory.read_swarm``: a bounded number of
keys and records whatever peers claim; a model is listed only from peers that serve it) plus the models' reports
and audit tallies (one more call), prints rich tables
(or one JSON document with ``--json``) and leaves. An empty swarm prints "no models are being served" and exits 0;
unreachable initial peers are a one-line error, exit 2. Network code is imported only when the
command runs; the JSON document is built by ``meshinfer.dashboard.doc`` (the same one the dashboard's
``/api/swarm`` serves; ``swarm_doc`` is re-exported here) and this module formats it (``read_doc``,
``swarm_doc`` and ``print_tables`` are reused by ``meshinfer demo``). Each server says how this process learnt of
it (``found``: ``mdns`` when it advertised itself on the LAN and this command found it so, ``bootstrap`` when
named by ``--initial-peers``, else ``dht``: read from the swarm's records); only what this process saw itself.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from typing import Any

from meshinfer.cli.args import add_command
from meshinfer.cli.common import add_config_flags, config_from_args, require
from meshinfer.cli.lan import lan_peers
from meshinfer.config import P2PConfig
from meshinfer.dashboard.doc import swarm_doc

__all__ = ["print_tables", "read_doc", "register", "run", "swarm_doc"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub, "swarm", run, help="show the models, block coverage and servers of a swarm",
        description="Join a swarm as a read-only client and print what it serves.",
    )
    add_config_flags(parser, P2PConfig)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds each DHT read may take (default: 5)")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(P2PConfig, args)
    require(args.timeout > 0, f"--timeout must be > 0, got {args.timeout}")
    given = config.initial_peers
    peers = lan_peers(args, required=True)
    config = dataclasses.replace(config, initial_peers=peers)
    doc = asyncio.run(read_doc(config, args.timeout))
    mark_found(doc, mdns=() if given else _peer_ids(peers), bootstrap=_peer_ids(given))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_tables(doc)
    return 0


async def read_doc(config: P2PConfig, timeout: float) -> dict[str, Any]:
    """Join as a client-only peer, read the swarm (``swarm_doc``), leave."""
    from meshinfer.p2p.node import NodeSettings, PeerNode

    node = await PeerNode.start(config, NodeSettings(client_mode=True))
    try:
        return await swarm_doc(node, timeout)
    finally:
        await node.close()


def _peer_ids(maddrs: tuple[str, ...]) -> list[str]:
    return [m.rsplit("/p2p/", 1)[1] for m in maddrs if "/p2p/" in m]


def mark_found(doc: dict[str, Any], *, mdns: Any, bootstrap: Any) -> None:
    """Add ``found`` (``mdns``, ``bootstrap`` or ``dht``) to every server of ``doc``."""
    from meshinfer.p2p.lanpeers import found_via

    mdns, bootstrap = set(mdns), set(bootstrap)
    for model in doc.get("models", []):
        for server in model.get("servers", []):
            server["found"] = found_via(str(server.get("peer_id")), mdns=mdns, bootstrap=bootstrap)


def _coverage_text(counts: list[int]) -> str:
    """Runs of equal server counts: ``0:8 x2, 8:12 x0``."""
    runs: list[str] = []
    start = 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            runs.append(f"{start}:{i} ×{counts[start]}")
            start = i
    return ", ".join(runs)


def _weights_text(server: dict[str, Any]) -> str:
    """``int4 · 21.3 MB``: the server's quant mode and the bytes its span's weights take (when announced)."""
    quant = str(server.get("quant") or "none")
    size = int(server.get("weight_bytes") or 0)
    return f"{quant} · {size / 1e6:.1f} MB" if size else quant


def _device_text(server: dict[str, Any]) -> str:
    """``NVIDIA H200 · bfloat16``: what the server computes on, and in which dtype (older records: cpu, fp32)."""
    return f"{server.get('device') or 'cpu'} · {server.get('dtype') or 'float32'}"


def _reports_text(server: dict[str, Any]) -> str:
    """How many peers published a report naming this server (claims: ``swarm`` does not verify them)."""
    n = len(server.get("reports") or [])
    return f"[red]{n}[/red]" if n else ""


def _audits_text(server: dict[str, Any]) -> str:
    """``12 / 1 (2 clients)``: audit windows passed / failed summed over clients' tallies (their word, unverified)."""
    audits = server.get("audits")
    if not audits:
        return ""
    failed = int(audits["failed"])
    clients = int(audits["clients"])
    return (f"{int(audits['passed'])} / " + (f"[red]{failed}[/red]" if failed else "0")
            + f" ({clients} client{'' if clients == 1 else 's'})")


def print_tables(doc: dict[str, Any], console: Any = None) -> None:
    """Print a ``swarm_doc`` as rich tables (models, then servers) on ``console`` (default: stdout)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not doc["models"]:
        console.print("no models are being served in this swarm")
        if not doc["complete"]:
            console.print("(the swarm did not answer in time; try a longer --timeout)")
        return
    models = Table(title="models")
    for col in ("model", "name", "family", "blocks", "hidden", "dtype", "servers",
                "coverage (blocks ×servers)"):
        models.add_column(col)
    servers = Table(title="servers")
    for col in ("peer id", "model", "span", "state", "weights", "device", "reach", "tokens/s", "cache left", "version",
                "name", "reports (claimed)", "audits ✓/✗ (claimed)", "found"):
        servers.add_column(col)
    for m in doc["models"]:
        missing = f" [red]missing {len(m['missing_blocks'])}[/red]" if m["missing_blocks"] else ""
        models.add_row(m["model_id"][:16], m["name"], m["family"], str(m["num_blocks"]),
                       str(m["hidden_size"]), m["dtype"], str(len(m["servers"])),
                       _coverage_text(m["block_servers"]) + missing)
        for s in m["servers"]:
            servers.add_row(s["peer_id"], m["model_id"][:16], s["span"], s["state"], _weights_text(s), _device_text(s),
                            str(s.get("reachability") or "public"),
                            f"{s['throughput']:.1f}", str(s["cache_tokens_left"]), s["software_version"],
                            s["public_name"] or "", _reports_text(s), _audits_text(s), str(s.get("found") or ""))
    console.print(models)
    console.print(servers)
    if any(s.get("audits") for m in doc["models"] for s in m["servers"]):
        console.print("audits: windows passed / failed as reported by the clients' tallies: unverified claims "
                      "(reports can be re-checked; tallies cannot)")
    if not doc["complete"]:
        console.print("[yellow]some DHT reads timed out: the view may be incomplete[/yellow]")
