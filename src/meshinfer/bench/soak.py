"""``meshinfer bench soak``: many short generations, connects and disconnects for N minutes; do the processes
give their memory and descriptors back?

Contract: starts a ``LocalSwarm`` on 127.0.0.1 (a ``meshinfer dht`` bootstrap and ``--servers`` ``meshinfer
serve`` processes splitting the model's blocks), joins it with one ``DistributedModel`` and one client
``PeerNode``, and measures every process it started (RSS from ``/proc/PID/status``, open descriptors from
``/proc/PID/fd``) three times: once all are ready (``start``), after ``--warmup`` generations (``warm``)
and, after the load and a ``--settle`` pause, at the end (``end``). The load runs for ``--minutes`` in
rounds; each round: one greedy generation of ``--new-tokens`` from its own prompt (checked token by token
against the local model afterwards, so the reference does not compete for CPU), a session opened and
closed, and per server ``--cycles`` connects and disconnects on each plane: an authenticated direct
stream over TLS and over plain loopback, a libp2p stream, and a bare TCP connect/close on the TLS port.
Verdict per process: RSS and descriptors back within 5% of ``warm`` (descriptors: or within one). Every
process started is stopped by PID whatever happens. Never asserts; the figures say what happened.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from typing import Any

from meshinfer.bench.common import demo_model_dir
from meshinfer.errors import ConfigError

DESCRIPTION = ("many short generations, connects and disconnects on every plane for N minutes; memory and "
               "descriptors of every process at start, after warm-up and at the end")

TOLERANCE = 0.05
"""How far above its warm figure a process may end and still count as back (5%)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="checkpoint directory (default: the built-in demo checkpoint)")
    parser.add_argument("--minutes", type=float, default=0.1, help="how long the load runs (default: 0.1)")
    parser.add_argument("--servers", type=int, default=2, help="server processes splitting the blocks (default: 2)")
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens per generation (default: 4)")
    parser.add_argument("--cycles", type=int, default=5,
                        help="connects and disconnects per plane and server in each round (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="generations before the warm figures (default: 2)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait after the load before the end figures (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts (default: 0)")


def _check(args: argparse.Namespace) -> None:
    if not args.minutes > 0 or args.servers < 1 or args.new_tokens < 1:
        raise ConfigError("need --minutes > 0, --servers >= 1 and --new-tokens >= 1")
    if args.cycles < 0 or args.warmup < 1 or args.settle < 0:
        raise ConfigError("need --cycles >= 0, --warmup >= 1 and --settle >= 0")


def measure(pid: int) -> dict[str, float]:
    """RSS (MB) and open descriptors of a live process; zeros once it is gone."""
    rss = 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return {"rss_mb": 0.0, "fds": 0}
    return {"rss_mb": round(rss, 1), "fds": fds}


def verdict(warm: dict[str, float], end: dict[str, float]) -> dict[str, Any]:
    """Whether ``end`` is back within ``TOLERANCE`` of ``warm`` (descriptors: or within one)."""
    rss_pct = 100.0 * (end["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"] if warm["rss_mb"] else 0.0
    fds_ok = end["fds"] <= max(warm["fds"] * (1 + TOLERANCE), warm["fds"] + 1)
    return {"rss_change_pct": round(rss_pct, 2), "fds_change": end["fds"] - warm["fds"],
            "back_within_5pct": bool(end["rss_mb"] > 0 and rss_pct <= 100 * TOLERANCE and fds_ok)}


async def _cycles(node: Any, server: dict[str, Any], n: int, counts: dict[str, int]) -> None:
    """``n`` connects and disconnects per plane to one server; failures are counted, never raised."""
    from meshinfer.p2p import SESSION_PROTOCOL
    from meshinfer.p2p.direct import DirectPlane
    from meshinfer.p2p.stream import DEFAULT_SETTINGS

    plane = DirectPlane(node.identity)
    tls = [a for a in server["direct"] if a.endswith("/tls")]
    plain = [a for a in server["direct"] if not a.endswith("/tls")]
    for _ in range(n):
        for kind, address in (("direct_tls", tls[:1]), ("direct_plain", plain[:1])):
            if not address:
                continue
            try:
                stream = await plane.dial(server["peer_id"], address[0], SESSION_PROTOCOL,
                                          settings=DEFAULT_SETTINGS, timeout=10)
                await stream.close()
                counts[kind] += 1
            except Exception:
                counts["failed"] += 1
        try:
            stream = await node.open_stream(server["peer_id"], SESSION_PROTOCOL, maddrs=server["maddrs"])
            await stream.close()
            counts["libp2p"] += 1
        except Exception:
            counts["failed"] += 1
        if tls:
            parts = tls[0].split("/")
            try:
                _, writer = await asyncio.open_connection(parts[2], int(parts[4]))
                writer.close()
                await writer.wait_closed()
                counts["tcp_tls_port"] += 1
            except OSError:
                counts["failed"] += 1


async def _all_cycles(node: Any, servers: list[dict[str, Any]], n: int, counts: dict[str, int]) -> None:
    await asyncio.gather(*(_cycles(node, server, n, counts) for server in servers))


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check(args)
    from meshinfer.bench.swarm import even_spans
    from meshinfer.client.model import DistributedModel
    from meshinfer.config import P2PConfig
    from meshinfer.loopthread import LoopThread
    from meshinfer.models.checkpoint import Checkpoint
    from meshinfer.models.engine import LocalModel
    from meshinfer.p2p.node import NodeSettings, PeerNode
    from meshinfer.testing.swarm import LocalSwarm

    path = demo_model_dir(args.model)
    spec = Checkpoint(path).spec
    spans = even_spans(spec.num_blocks, args.servers)
    rng = random.Random(args.seed)

    def prompt() -> list[int]:
        return [rng.randrange(3, spec.vocab_size) for _ in range(rng.randint(3, 12))]

    print(f"starting a bootstrap and {args.servers} servers ({', '.join(map(str, spans))})...",
          file=sys.stderr, flush=True)
    counts = {"direct_tls": 0, "direct_plain": 0, "libp2p": 0, "tcp_tls_port": 0, "sessions": 0, "failed": 0}
    done: list[tuple[list[int], list[int] | None, str | None]] = []
    with LocalSwarm(path, spans) as swarm:
        roles = ([("dht", swarm.dht.pid)] if swarm.dht is not None else []) + \
            [(f"server {s.span}", s.pid) for s in swarm.servers]
        figures: dict[str, dict[str, dict[str, float]]] = {role: {"start": measure(pid)} for role, pid in roles}
        runner = LoopThread(name="soak").start()
        node = runner.run(PeerNode.start(P2PConfig(initial_peers=tuple(swarm.initial_peers)),
                                         NodeSettings(client_mode=True)), 60)
        try:
            with DistributedModel.from_pretrained(path, swarm.initial_peers) as client:
                servers = [{"peer_id": hop.peer_id, "maddrs": list(hop.record.addresses),
                            "direct": list(hop.record.direct_addresses)} for hop in client.plan()]

                def generate(p: list[int]) -> None:
                    try:
                        done.append((p, client.generate(p, args.new_tokens, stop_token_ids=()), None))
                    except Exception as err:
                        done.append((p, None, f"{type(err).__name__}: {str(err)[:200]}"))

                for _ in range(args.warmup):
                    generate(prompt())
                runner.run(_all_cycles(node, servers, 1, counts), 120)
                time.sleep(1.0)
                for role, pid in roles:
                    figures[role]["warm"] = measure(pid)
                warm_done = len(done)
                started = time.monotonic()
                rounds = 0
                while time.monotonic() - started < args.minutes * 60:
                    rounds += 1
                    generate(prompt())
                    try:
                        client.open_session(16).close()
                        counts["sessions"] += 1
                    except Exception:
                        counts["failed"] += 1
                    runner.run(_all_cycles(node, servers, args.cycles, counts), 600)
                load_s = time.monotonic() - started
                time.sleep(args.settle)
                for role, pid in roles:
                    figures[role]["end"] = measure(pid)
        finally:
            runner.run(node.close(), 30)
            runner.stop()
    local = LocalModel.from_pretrained(path)
    identical = sum(1 for p, got, _ in done if got is not None
                    and got == local.generate(p, args.new_tokens, stop_token_ids=()))
    processes = {role: {**f, **verdict(f["warm"], f["end"])} for role, f in figures.items()}
    return {
        "model": str(path),
        "spans": [str(s) for s in spans],
        "minutes": args.minutes,
        "load_seconds": round(load_s, 1),
        "rounds": rounds,
        "generations": len(done),
        "generations_after_warmup": len(done) - warm_done,
        "generations_identical": identical,
        "errors": [e for _, _, e in done if e][:5],
        "connects": counts,
        "processes": processes,
        "verdict": {"back_within_5pct": all(p["back_within_5pct"] for p in processes.values()),
                    "all_identical": identical == len(done)},
    }
