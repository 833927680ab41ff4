"""``meshinfer dht``: run a bootstrap peer that only routes and stores DHT records.

Contract: parses ``P2PConfig`` flags, starts a ``PeerNode`` (full DHT member, no model), prints the
multiaddrs to reach it on stdout, one per line, flushed in one write (scripts and tests read them),
then runs until SIGINT/SIGTERM (or, with ``--stop-on-stdin-eof``, until its stdin closes: a launcher that
dies leaves no orphan) and shuts down cleanly (exit 0). Start-up failures (bad flags, a key
already in use, unreachable initial peers) are ``MeshinferError``s: one line, exit 2. Network code is
imported only when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from meshinfer.cli.args import add_command, add_stop_on_stdin_eof
from meshinfer.cli.common import add_config_flags, config_from_args
from meshinfer.config import P2PConfig


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub, "dht", run, help="run a bootstrap peer (routes and stores DHT records; serves no model)",
        description="Run a bootstrap peer: it joins (or starts) a swarm, stores and routes DHT records, and "
                    "prints the multiaddrs other peers pass to --initial-peers. Stop it with Ctrl-C.",
    )
    add_config_flags(parser, P2PConfig)
    add_stop_on_stdin_eof(parser)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(P2PConfig, args)
    return asyncio.run(_serve(config, stop_on_stdin_eof=args.stop_on_stdin_eof))


async def _serve(config: P2PConfig, *, stop_on_stdin_eof: bool = False) -> int:
    from meshinfer.p2p.node import NodeSettings, PeerNode
    from meshinfer.p2p.runner import wait_for_exit_signal

    node = await PeerNode.start(config, NodeSettings(lan_role="dht"))
    try:
        sys.stdout.write("".join(f"{m}\n" for m in node.maddrs))
        sys.stdout.flush()
        print(f"bootstrap peer {node.peer_id} running; join with --initial-peers {node.maddrs[0]}",
              file=sys.stderr, flush=True)
        await wait_for_exit_signal(watch_stdin=stop_on_stdin_eof)
    finally:
        await node.close()
    return 0
