"""``meshinfer fetch MODEL_ID``: download a model (or part of it) from the swarm's seeders, verified.

Contract: joins through ``--initial-peers`` (``P2PConfig`` flags), fetches ``--blocks A:B`` and/or
``--client-part`` of MODEL_ID (default: the whole model) with ``weights.fetch.fetch`` into the cache
(``--cache-dir``, else ``$MESHINFER_CACHE_DIR/models``) within ``--max-cache-bytes``, showing a rich
progress bar on stderr, then prints the checkpoint directory on stdout (``--json``: one JSON object with
the directory and the fetch's figures: pieces per seeder, banned seeders, resumed pieces...). With
``--seed`` it then seeds what it fetched until Ctrl-C. An interrupted fetch resumes where it stopped.
Errors (bad id, no seeders, budget) are one-line ``MeshinferError``s, exit 2. Network code is imported
only when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys

from meshinfer.cli.args import add_command, require_initial_peers
from meshinfer.cli.common import add_config_flags, config_from_args, require
from meshinfer.config import P2PConfig

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def byte_size(text: str) -> int:
    """``123``, ``512M``, ``20G``, ``1.5T`` (binary units; an optional trailing ``B`` / ``iB``) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 500M or 20G, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub, "fetch", run, help="download a model (or some blocks) from the swarm's seeders, verified piece by piece",
        description="Fetch a model by id from the peers that seed it: pieces come from several peers in "
                    "parallel, each is verified against the model's manifest, a peer that sends a wrong piece is "
                    "banned, and an interrupted fetch resumes. Prints the local checkpoint directory.",
    )
    parser.add_argument("model_id", metavar="MODEL_ID", help="the model id (as printed by `meshinfer manifest`)")
    parser.add_argument("--blocks", default=None, help="fetch only blocks START:END (plus config and tokenizer)")
    parser.add_argument("--client-part", action="store_true",
                        help="fetch the client part (embeddings, final norm, LM head)")
    parser.add_argument("--cache-dir", default=None,
                        help="where fetched models live (default: $MESHINFER_CACHE_DIR/models or "
                             "~/.cache/meshinfer/models)")
    parser.add_argument("--max-cache-bytes", type=byte_size, default=None,
                        help="refuse to grow the cache beyond this size, e.g. 20G (default: no limit)")
    parser.add_argument("--per-peer", type=int, default=4, help="parallel requests per seeder (default: 4)")
    parser.add_argument("--max-download", type=float, default=None, metavar="MB_PER_S",
                        help="cap the piece data fetched, in MB/s over all seeders (default: no cap)")
    parser.add_argument("--find-timeout", type=float, default=15.0,
                        help="seconds to look for seeders in the DHT (default: 15)")
    parser.add_argument("--seed", action="store_true", help="after fetching, seed what was fetched until Ctrl-C")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the bare path")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    add_config_flags(parser, P2PConfig)


def run(args: argparse.Namespace) -> int:
    from meshinfer.types import BlockRange
    from meshinfer.weights.manifest import Want, check_model_id

    config = config_from_args(P2PConfig, args)
    check_model_id(args.model_id)
    require_initial_peers(config.initial_peers)
    require(args.per_peer >= 1, f"--per-peer must be >= 1, got {args.per_peer}")
    require(args.max_download is None or args.max_download > 0,
            f"--max-download must be > 0 MB/s, got {args.max_download}")
    blocks = BlockRange.parse(args.blocks) if args.blocks else None
    want = Want(blocks=blocks, client_part=args.client_part) if blocks or args.client_part else Want.whole()
    return asyncio.run(_fetch(config, args, want))


async def _fetch(config: P2PConfig, args: argparse.Namespace, want: object) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from meshinfer.p2p.node import NodeSettings, PeerNode
    from meshinfer.p2p.runner import wait_for_exit_signal
    from meshinfer.weights.fetch import FetchProgress, fetch
    from meshinfer.weights.rate import MB
    from meshinfer.weights.seed import start_seeding

    node = await PeerNode.start(config, NodeSettings(client_mode=not args.seed))
    try:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn(), transient=False, disable=args.no_progress or not sys.stderr.isatty())
        task = bar.add_task(f"fetching {args.model_id[:12]}", total=None)

        def on_progress(p: FetchProgress) -> None:
            bar.update(task, completed=p.done_bytes, total=p.total_bytes or None)

        with bar:
            result = await fetch(node, args.model_id, want=want, cache_dir=args.cache_dir,  # type: ignore[arg-type]
                                 max_cache_bytes=args.max_cache_bytes, progress=on_progress, per_peer=args.per_peer,
                                 find_timeout=args.find_timeout,
                                 max_download=args.max_download * MB if args.max_download is not None else None)
        if args.json:
            print(json.dumps({"path": str(result.path), "model_id": result.model_id, **result.stats.as_dict()}),
                  flush=True)
        else:
            print(result.path, flush=True)
        stats = result.stats
        print(f"model {result.model_id}: {stats.bytes_fetched / 1e6:.1f} MB from {len(stats.pieces_by_peer)} seeders "
              f"in {stats.seconds:.1f}s, {stats.reused_pieces} pieces already on disk"
              + (f", banned {len(stats.banned)} seeders for wrong pieces" if stats.banned else ""), file=sys.stderr)
        if args.seed:
            seeder = await start_seeding(node, result.path)
            print(f"seeding {result.model_id} from {result.path}; Ctrl-C to stop", file=sys.stderr, flush=True)
            try:
                await wait_for_exit_signal(watch_stdin=False)
            finally:
                await seeder.close()
    finally:
        await node.close()
    return 0
