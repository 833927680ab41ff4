"""``meshinfer bench fetch``: MB/s fetching the bench checkpoint from 1 and from 3 seeders on loopback.

Contract: builds (or reuses) ``testing.checkpoints.bench_checkpoint()`` and its manifest, starts a
``meshinfer dht`` bootstrap peer and ``--seeders`` (default 3) ``meshinfer seed`` processes of it on
``--host``, then from this process fetches the whole model (``weights.fetch.fetch``: every piece verified
and written into a fresh cache directory, over the direct data plane) limited to the first seeder, then to
all of them, ``--repeats`` times each after one warm-up fetch. Then the same again with a fresh set of
seeders whose uploads are capped at ``--uplink`` MB/s each (``seed --max-upload``): on loopback nothing
limits a single seeder but the CPU the fetcher shares with it, so only capped uplinks, as over any real
link, show what several seeders add. Figures: model bytes and pieces, per setup the best and median MB/s
(bytes fetched / wall time of the fetch, including finding seeders, the manifest and opening streams) and
how many pieces each seeder sent; per measurement whether 3 seeders reach 200 MB/s and beat 1.
``target_met``: >= 200 MB/s from 3 uncapped seeders, and with capped uplinks >= 200 MB/s from 3 and more
than from 1 (without ``--uplink``: both on loopback). ``--fsync`` also flushes every finished file to disk
(then the disk's speed is measured too). Every process is stopped by its PID whatever happens; temporary
caches are removed. Imports the network only inside ``run``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from typing import Any

DESCRIPTION = "MB/s fetching the bench checkpoint (verified pieces) from 1 and from 3 seeder processes"
TARGET_MB_S = 200.0
UPLINK_MB_S = 100.0
"""The per-seeder upload cap of the second measurement (a fast home or office uplink)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address the peers listen on (default: 127.0.0.1)")
    parser.add_argument("--seeders", type=int, default=3, help="seeder processes for the many-seeder run (default: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="fetches per setup (default: 3)")
    parser.add_argument("--per-peer", type=int, default=4, help="parallel requests per seeder (default: 4)")
    parser.add_argument("--fsync", action="store_true", help="flush every fetched file to disk (measures the disk)")
    parser.add_argument("--uplink", type=float, default=UPLINK_MB_S, metavar="MB_PER_S",
                        help="also measure with every seeder's upload capped at this rate (`seed --max-upload`), "
                             f"as over real links; 0 skips it (default: {UPLINK_MB_S:g})")


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


def _with_seeders(args: argparse.Namespace, ckpt: Any, maddrs: list[str], model_id: str,
                  rate: float | None) -> dict[str, Any]:
    """Start ``--seeders`` seeder processes (uploads capped at ``rate`` MB/s when given), measure, stop them."""
    import asyncio

    from meshinfer.testing.procs import ManagedProcess, meshinfer_argv

    cap = ["--max-upload", f"{rate:g}"] if rate else []
    procs: list[ManagedProcess] = []
    try:
        for _ in range(args.seeders):
            procs.append(ManagedProcess(meshinfer_argv("seed", str(ckpt), "--host", args.host, "--initial-peers",
                                                       *maddrs, "--stop-on-stdin-eof", *cap), name="meshinfer seed"))
        seeders = [proc.read_json(timeout=120)["peer_id"] for proc in procs]
        return asyncio.run(_measure(args, maddrs, model_id, seeders))
    finally:
        for proc in procs:
            proc.stop()


def _verdict(figures: dict[str, Any], seeders: int) -> dict[str, Any]:
    many = figures[f"seeders_{seeders}"]["best_mb_s"]
    one = figures["seeders_1"]["best_mb_s"]
    return {"many_over_one": round(many / one, 2), "at_least_target": many >= TARGET_MB_S,
            "many_faster_than_one": seeders == 1 or many > one}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from meshinfer.errors import ConfigError
    from meshinfer.models.fingerprint import checkpoint_manifest
    from meshinfer.testing.checkpoints import bench_checkpoint
    from meshinfer.testing.procs import start_dht

    if args.seeders < 1 or args.repeats < 1 or args.per_peer < 1:
        raise ConfigError("--seeders, --repeats and --per-peer must be >= 1")
    if args.uplink < 0:
        raise ConfigError(f"--uplink must be >= 0 MB/s, got {args.uplink:g}")
    ckpt = bench_checkpoint()
    model_id, doc = checkpoint_manifest(ckpt)  # hashed once here; the seeders read it from the cache
    total = sum(t["size"] for b in doc["blocks"] for t in b.values()) + sum(t["size"] for t in doc["client"].values())
    total += sum(f["size"] for f in doc["files"].values())
    dht, maddrs = start_dht(host=args.host, timeout=90)
    try:
        loopback = _with_seeders(args, ckpt, maddrs, model_id, None)
        uplinks = _with_seeders(args, ckpt, maddrs, model_id, args.uplink) if args.uplink else None
    finally:
        dht.stop()
    out: dict[str, Any] = {
        "setup": f"{args.seeders} `meshinfer seed` processes and this fetching process on {args.host}, direct "
                 f"plane, {args.per_peer} requests in flight per seeder, fsync={'on' if args.fsync else 'off'}",
        "model_id": model_id, "model_mb": round(total / 1e6, 1),
        **loopback,
        "uncapped": _verdict(loopback, args.seeders),
        "target_mb_s": TARGET_MB_S,
    }
    if uplinks is not None:
        out["with_uplinks"] = {"seeder_upload_cap_mb_s": args.uplink, **uplinks,
                               **_verdict(uplinks, args.seeders)}
        verdict = out["with_uplinks"]
        out["target_met"] = out["uncapped"]["at_least_target"] and verdict["at_least_target"] and \
            verdict["many_faster_than_one"]
    else:
        out["target_met"] = out["uncapped"]["at_least_target"] and out["uncapped"]["many_faster_than_one"]
    return out
