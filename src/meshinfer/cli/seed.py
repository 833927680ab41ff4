"""``meshinfer seed DIR...``: serve the weight pieces of local checkpoints to the swarm until stopped.

Contract: parses ``P2PConfig`` flags, starts a ``PeerNode`` (full DHT member, direct plane listening),
serves ``/meshinfer/pieces/1`` for every DIR (full or partial copies; their manifests are computed or read
first) and announces them (``weights.seed``). When serving it prints ONE JSON line on stdout::

    {"peer_id": ..., "maddrs": [...], "direct_addresses": [...], "pid": ..., "models": {id: {...}}}

then runs until SIGINT/SIGTERM (or, with ``--stop-on-stdin-eof``, until its parent closes stdin) and on
the way out prints one more JSON line ``{"served": {peer: pieces}, "errors": {code: n}}``. The hidden
``--corrupt-pieces`` flag is a TEST FAULT INJECTOR (flips a byte of every piece served, to test that
fetchers reject and ban such a peer); it is off by default and not listed in ``--help``. Errors are
one-line ``MeshinferError``s, exit 2. Network code is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from meshinfer.cli.args import add_command, add_stop_on_stdin_eof
from meshinfer.cli.common import add_config_flags, config_from_args
from meshinfer.config import P2PConfig


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub, "seed", run, help="serve the weights of local checkpoints to peers that fetch them",
        description="Serve the pieces of local checkpoint directories (full or partial copies) to peers that "
                    "fetch them with `meshinfer fetch` or `serve --model MODEL_ID`, and announce them in the DHT. "
                    "Stop it with Ctrl-C.",
    )
    parser.add_argument("directories", metavar="MODEL", nargs="+",
                        help="checkpoint directories, .gguf files or catalogue names to seed")
    add_config_flags(parser, P2PConfig)
    parser.add_argument("--max-upload", type=float, default=None, metavar="MB_PER_S",
                        help="cap the piece data sent to all peers together, in MB/s (default: no cap)")
    add_stop_on_stdin_eof(parser)
    parser.add_argument("--corrupt-pieces", action="store_true", help=argparse.SUPPRESS)  # TEST FAULT INJECTOR


def run(args: argparse.Namespace) -> int:
    from meshinfer.errors import ConfigError

    if args.max_upload is not None and not args.max_upload > 0:
        raise ConfigError(f"--max-upload must be > 0 MB/s, got {args.max_upload:g}")
    from meshinfer.weights.resolve import local_checkpoint

    config = config_from_args(P2PConfig, args)
    resolved = []
    for ref in args.directories:
        path = local_checkpoint(ref)
        if path is None:
            raise ConfigError(f"{ref!r} is not on this machine: seed a checkpoint directory, a .gguf file or a "
                              "catalogue name (fetch a model id first with `meshinfer fetch`)")
        resolved.append(path)
    args.directories = resolved
    return asyncio.run(_seed(config, args))


async def _seed(config: P2PConfig, args: argparse.Namespace) -> int:
    from meshinfer.p2p.node import PeerNode
    from meshinfer.p2p.runner import wait_for_exit_signal
    from meshinfer.weights.rate import MB
    from meshinfer.weights.seed import start_seeding

    node = await PeerNode.start(config)
    try:
        max_upload = args.max_upload * MB if args.max_upload is not None else None
        seeder = await start_seeding(node, *args.directories, max_upload=max_upload,
                                     corrupt_pieces=args.corrupt_pieces)
        try:
            models = {}
            for model_id, model in seeder.models.items():
                record = model.record(node)
                models[model_id] = {"path": str(model.path), "blocks": [str(r) for r in record.blocks],
                                    "client_part": record.client_part, "files": record.files}
            print(json.dumps({"peer_id": node.peer_id, "maddrs": node.maddrs,
                              "direct_addresses": node.direct_addresses, "pid": os.getpid(), "models": models}),
                  flush=True)
            print(f"seeding {', '.join(models)} as {node.peer_id}"
                  + (" (CORRUPTING PIECES: test fault injector)" if args.corrupt_pieces else ""),
                  file=sys.stderr, flush=True)
            await wait_for_exit_signal(watch_stdin=args.stop_on_stdin_eof)
        finally:
            await seeder.close()
            print(json.dumps({"served": dict(seeder.served), "errors": dict(seeder.errors)}), flush=True)
    finally:
        await node.close()
    return 0
