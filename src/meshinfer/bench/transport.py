"""``meshinfer bench transport``: round trips and bulk throughput over one open session stream.

Contract: starts an echo peer (``python -m meshinfer.p2p.echo``) as a separate process on the given
host, opens ONE stream to it from this process and measures, after a warm-up: median/p99/mean round
trip of ``Ping`` messages with an 8 KiB and a 256 KiB payload, and the round trip and throughput of a
16 MiB payload (sent as 1 MiB chunks both ways; MB/s counts bytes sent plus received), once per
plane: ``libp2p`` (streams through the two p2pd daemons) and ``direct`` (the direct data plane: TLS 1.3
over TCP, ``meshinfer.p2p.direct``), as chosen by ``--plane``. Returns the figures as a dict
(``meshinfer.cli.bench`` prints and writes them). The echo peer is stopped by its PID whatever happens.
Imports the network only inside ``run``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

DESCRIPTION = "round-trip latency and throughput over a session stream between two processes"

TARGET_8KIB_MEDIAN_MS = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address both peers listen on (default: 127.0.0.1)")
    parser.add_argument("--small-rounds", type=int, default=200, help="8 KiB round trips (default: 200)")
    parser.add_argument("--medium-rounds", type=int, default=50, help="256 KiB round trips (default: 50)")
    parser.add_argument("--bulk-mib", type=int, default=16, help="bulk payload size in MiB (default: 16)")
    parser.add_argument("--bulk-rounds", type=int, default=5, help="bulk round trips (default: 5)")
    parser.add_argument("--plane", choices=("both", "libp2p", "direct"), default="both",
                        help="which transport to measure (default: both)")


def _summary(samples: list[float]) -> dict[str, Any]:
    ms = sorted(s * 1e3 for s in samples)
    p99 = ms[min(len(ms) - 1, max(0, round(0.99 * len(ms)) - 1))]
    return {"n": len(ms), "median_ms": statistics.median(ms), "p99_ms": p99, "mean_ms": statistics.fmean(ms),
            "min_ms": ms[0]}


async def _measure(args: argparse.Namespace, peer_id: str, maddrs: list[str], direct: list[str],
                   plane: str) -> dict[str, Any]:
    from meshinfer.config import P2PConfig
    from meshinfer.errors import TransportError
    from meshinfer.p2p.echo import ECHO_PROTOCOL
    from meshinfer.p2p.node import PeerNode
    from meshinfer.wire.messages import Ping, Pong

    node = await PeerNode.start(P2PConfig(host=args.host, direct=plane == "direct"))
    try:
        if plane == "direct" and not direct:
            raise TransportError("the echo peer announced no direct address")
        stream = await node.open_stream(peer_id, ECHO_PROTOCOL, maddrs=maddrs, direct=direct)
        seq = 0

        async def round_trips(size: int, rounds: int) -> list[float]:
            nonlocal seq
            payload = bytes(range(256)) * (size // 256) + b"\0" * (size % 256)
            out = []
            for _ in range(rounds):
                seq += 1
                t0 = time.perf_counter()
                await stream.send(Ping(seq=seq, payload=payload))
                reply = await stream.recv()
                out.append(time.perf_counter() - t0)
                if not isinstance(reply, Pong) or reply.seq != seq or len(reply.payload) != size:
                    raise TransportError(f"echo peer answered {type(reply).__name__} instead of the echo")
            return out

        await round_trips(8 * 1024, 20)  # warm-up: connection, handler, allocator
        small = await round_trips(8 * 1024, args.small_rounds)
        medium = await round_trips(256 * 1024, args.medium_rounds)
        bulk_bytes = args.bulk_mib * 1024 * 1024
        await round_trips(bulk_bytes, 1)
        bulk = await round_trips(bulk_bytes, args.bulk_rounds)
        await stream.close()
    finally:
        await node.close()
    bulk_summary = _summary(bulk)
    bulk_summary["mb_per_s"] = 2 * bulk_bytes / (bulk_summary["median_ms"] / 1e3) / 1e6
    small_summary = _summary(small)
    return {
        "setup": f"2 processes on {args.host}, one open stream, "
                 + ("libp2p (noise/tls) via p2pd" if plane == "libp2p" else "direct plane (TLS 1.3 over TCP)"),
        "rtt_8KiB": small_summary,
        "rtt_256KiB": _summary(medium),
        f"bulk_{args.bulk_mib}MiB": bulk_summary,
        "target_8KiB_median_ms": TARGET_8KIB_MEDIAN_MS,
        "target_met": small_summary["median_ms"] <= TARGET_8KIB_MEDIAN_MS,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from meshinfer.errors import ConfigError
    from meshinfer.testing.procs import ManagedProcess, python_argv

    for name in ("small_rounds", "medium_rounds", "bulk_mib", "bulk_rounds"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
    echo = ManagedProcess(python_argv("meshinfer.p2p.echo", "--host", args.host), name="echo peer")
    try:
        info = echo.read_json(timeout=60)
        planes = ("libp2p", "direct") if args.plane == "both" else (args.plane,)
        return {plane: asyncio.run(_measure(args, info["peer_id"], info["maddrs"], info.get("direct_addresses", []),
                                            plane)) for plane in planes}
    finally:
        echo.stop()
