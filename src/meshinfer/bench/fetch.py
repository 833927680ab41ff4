"""``meshinfer bench fetch``: MB/s fetching the bench checkpoint from 1 and from 3 seeders on loopback.

Contract: builds (or reuses) ``testing.checkpoints.bench_checkpoint()`` and its manifest, starts a
``meshinfer dht`` bootstrap peer and ``--seeders`` (default 3) ``meshinfer seed`` processes of it on
``--host``, then from this process fetches the whole model (``weights.fetch.fetch``: every piece verified
and written into a fresh cache directory, over the direct data plane) limited to the first seeder, then to
all of them, ``--repeats`` times each after one warm-up fetch. Figures: model bytes and pieces, per setup
the best and median MB/s (bytes fetched / wall time of the fetch, including finding seeders, the manifest
and opening streams) and how many pieces each seeder sent; the target (>= 200 MB/s from 3 seeders, and
more than from 1) and whether it was met. ``--fsync`` also flushes every finished file to disk (then the
disk's speed is measured too). Every process is stopped by its PID whatever happens; temporary caches
are removed. Imports the network only inside ``run``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from typing import Any

DESCRIPTION = "MB/s fetching the bench checkpoint (verified pieces) from 1 and from 3 seeder processes"
TARGET_MB_S = 200.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address the peers listen on (default: 127.0.0.1)")
    parser.add_argument("--seeders", type=int, default=3, help="seeder processes for the many-seeder run (default: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="fetches per setup (default: 3)")
    parser.add_argument("--per-peer", type=int, default=4, help="parallel requests per seeder (default: 4)")
    parser.add_argument("--fsync", action="store_true", help="flush every fetched file to disk (measures the disk)")


async def _measure(args: argparse.Namespace, maddrs: list[str], model_id: str, seeders: list[str]) -> dict[str, Any]:
    from meshinfer.config import P2PConfig
    from meshinfer.p2p.node import NodeSettings, PeerNode
    from meshinfer.weights.fetch import fetch
    from meshinfer.weights.plan import PeerBans

    node = await PeerNode.start(P2PConfig(host=args.host, initial_peers=tuple(maddrs)),
                                NodeSettings(client_mode=True))
    try:
        async def once(peers: list[str]) -> tuple[float, dict[str, int], int]:
            cache = tempfile.mkdtemp(prefix="meshinfer-bench-fetch-")
            try:
                result = await fetch(node, model_id, cache_dir=cache, peers=set(peers), bans=PeerBans(),
                                     per_peer=args.per_peer, durable=args.fsync, find_timeout=60.0)
                stats = result.stats
                return stats.bytes_fetched / stats.seconds / 1e6, dict(stats.pieces_by_peer), stats.bytes_fetched
            finally:
                shutil.rmtree(cache, ignore_errors=True)

        await once(seeders)  # warm-up: page cache of the seeders, DHT routes, allocator
        out: dict[str, Any] = {}
        for n in sorted({1, len(seeders)}):
            runs = [await once(seeders[:n]) for _ in range(args.repeats)]
            rates = [r[0] for r in runs]
            short = {peer[:12]: count for peer, count in runs[-1][1].items()}
            out[f"seeders_{n}"] = {"best_mb_s": max(rates), "median_mb_s": statistics.median(rates),
                                   "runs_mb_s": [round(r, 1) for r in rates], "pieces_by_seeder": short}
        return out
    finally:
        await node.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from meshinfer.errors import ConfigError
    from meshinfer.models.fingerprint import checkpoint_manifest
    from meshinfer.testing.checkpoints import bench_checkpoint
    from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, start_dht

    if args.seeders < 1 or args.repeats < 1 or args.per_peer < 1:
        raise ConfigError("--seeders, --repeats and --per-peer must be >= 1")
    ckpt = bench_checkpoint()
    model_id, doc = checkpoint_manifest(ckpt)  # hashed once here; the seeders read it from the cache
    total = sum(t["size"] for b in doc["blocks"] for t in b.values()) + sum(t["size"] for t in doc["client"].values())
    total += sum(f["size"] for f in doc["files"].values())
    dht, maddrs = start_dht(host=args.host, timeout=90)
    procs: list[ManagedProcess] = []
    try:
        for _ in range(args.seeders):
            procs.append(ManagedProcess(meshinfer_argv("seed", str(ckpt), "--host", args.host, "--initial-peers",
                                                       *maddrs, "--stop-on-stdin-eof"), name="meshinfer seed"))
        seeders = [proc.read_json(timeout=120)["peer_id"] for proc in procs]
        figures = asyncio.run(_measure(args, maddrs, model_id, seeders))
    finally:
        for proc in procs:
            proc.stop()
        dht.stop()
    many = figures[f"seeders_{args.seeders}"]["best_mb_s"]
    one = figures["seeders_1"]["best_mb_s"]
    return {
        "setup": f"{args.seeders} `meshinfer seed` processes and this fetching process on {args.host}, direct "
                 f"plane, {args.per_peer} requests in flight per seeder, fsync={'on' if args.fsync else 'off'}",
        "model_id": model_id, "model_mb": round(total / 1e6, 1),
        **figures,
        "target_mb_s": TARGET_MB_S,
        "target_met": many >= TARGET_MB_S and (args.seeders == 1 or many > one),
    }
