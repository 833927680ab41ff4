"""``meshinfer credits``: work served and used per peer, from the receipts the swarm's servers show (issue 23).

Contract: joins through ``--initial-peers`` (or the LAN, as ``meshinfer swarm``) as a client-only peer, reads the
servers of every model from the DHT (one ``read_swarm``), asks each server for the receipts it holds
(``ledger.fetch.collect``: every signature verified here, newest receipt per session), and prints a table
(``--json``: the ``ledger.report.credits_doc`` document). Figures come from receipts only; the hourly rate is
measured over the last hour of receipts and labelled so. Network code is imported only when the command runs.
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


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub, "credits", run, help="show work served and used per peer, from the receipts servers hold",
        description="Ask every server of the swarm for the usage receipts it holds (signed by clients), verify "
                    "them and print each peer's work served and used, in block-tokens.",
    )
    add_config_flags(parser, P2PConfig)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds each read or server may take")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(P2PConfig, args)
    require(args.timeout > 0, f"--timeout must be > 0, got {args.timeout}")
    config = dataclasses.replace(config, initial_peers=lan_peers(args, required=True))
    doc = asyncio.run(read_credits(config, args.timeout))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    return 0


async def read_credits(config: P2PConfig, timeout: float) -> dict[str, Any]:
    """Join, read the swarm's servers (one ``read_swarm``) and their receipts (``dashboard.credits``, which the
    dashboard's panel uses too), leave."""
    from meshinfer.dashboard.credits import read_credits as read_servers_credits
    from meshinfer.dashboard.doc import snapshot_doc
    from meshinfer.p2p.directory import read_swarm
    from meshinfer.p2p.node import NodeSettings, PeerNode

    node = await PeerNode.start(config, NodeSettings(client_mode=True))
    try:
        doc = snapshot_doc(await read_swarm(node, timeout=timeout))
        return await read_servers_credits(node, doc, timeout)
    finally:
        await node.close()


def _n(value: int) -> str:
    return f"{value:,}"


def print_table(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    answered = sum(1 for v in doc["asked"].values() if isinstance(v, int))
    console.print(f"{doc['receipts']} receipts from {answered} of {len(doc['asked'])} servers; unit: {doc['unit']}")
    if not doc["peers"]:
        console.print("no receipts yet")
        return
    table = Table("peer", "name", "served", "used", "credit", "sessions served/used", "served/h (measured, last h)")
    for p in doc["peers"]:
        table.add_row(p["peer_id"][:16] + "…", p["name"] or "", _n(p["served"]), _n(p["used"]), _n(p["credit"]),
                      f"{p['sessions_served']}/{p['sessions_used']}", _n(p["served_per_hour_measured"]))
    console.print(table)
    for peer, why in doc["asked"].items():
        if not isinstance(why, int):
            console.print(f"[yellow]server {peer[:16]}… could not be asked: {why}[/yellow]")
