"""Issue 17, findings 7 and 9 (routing on claims; a stalled-then-resumed only server): reproduce the attacks on a
local swarm and print the figures as JSON. Run it with the code to measure first on PYTHONPATH, e.g.

    PYTHONPATH=$PWD/src .venv/bin/python scripts/attacks/route_claims.py [liar|unreachable|stall ...]

- liar: 2 honest servers of blocks 0:4 and one (tests/client/liar_server.py) that announces 1e12 tokens/s and
  sleeps 30 ms per step; one client runs 20 generations: sessions per server (first 5, last 15), seconds.
- unreachable: 1 honest server and a fake record (every block, 1e12 tokens/s, an address where nothing listens)
  signed by its own key; 4 new clients each run 3 generations 2.5 s apart: time to first token of each client's
  first generation, failed dials to the fake per client.
- spread: 3 equivalent servers of blocks 0:4; 6 new clients run one generation each: sessions per server.
- stall: one server per span; after 4 of 40 tokens the server of 2:4 gets SIGSTOP, 6 s later SIGCONT: whether the
  generation ends, with the exact output, and in how many seconds.
Every output is compared with the local engine's. Everything started is stopped by PID (LocalSwarm.stop)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from meshinfer.client.model import DistributedModel
from meshinfer.config import P2PConfig
from meshinfer.loopthread import LoopThread
from meshinfer.models.engine import LocalModel
from meshinfer.p2p.node import NodeSettings, PeerNode, Put
from meshinfer.testing import swarm as swarm_module
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm
from meshinfer.types import BlockRange
from meshinfer.wire.records import ServerRecord, block_key

PROMPT = [5, 17, 42, 7, 99, 3]
LIAR = Path(__file__).resolve().parents[2] / "tests" / "client" / "liar_server.py"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def reference(model: Path, tokens: int) -> list[int]:
    return LocalModel.from_pretrained(model).generate(PROMPT, tokens, stop_token_ids=())


def liar(model: Path) -> dict[str, Any]:
    ref = reference(model, 6)
    with LocalSwarm(model, [(0, 4), (0, 4)]) as swarm:
        real = swarm_module.meshinfer_argv
        swarm_module.meshinfer_argv = lambda *args: [sys.executable, str(LIAR), *args]
        try:
            lying = swarm.add_server((0, 4)).peer_id
        finally:
            swarm_module.meshinfer_argv = real
        names = {s.peer_id: ("liar" if s.peer_id == lying else f"honest{i}") for i, s in enumerate(swarm.servers)}
        firsts, exact = [], True
        started = time.monotonic()
        rss = {names[s.peer_id]: rss_mb(s.pid) for s in swarm.servers}
        with DistributedModel.from_pretrained(model, swarm.initial_peers) as client:
            client_rss = [rss_mb(os.getpid())]
            for _ in range(20):
                exact &= client.generate(PROMPT, 6, stop_token_ids=()) == ref
                firsts.append(names[client.last_route[0].peer_id])
            client_rss.append(rss_mb(os.getpid()))
        return {"client_rss_mb_start_end": client_rss, "sessions_first_5": dict(Counter(firsts[:5])),
                "sessions_last_15": dict(Counter(firsts[5:])),
                "seconds_20_generations": round(time.monotonic() - started, 2), "exact": exact,
                "server_rss_mb_before": rss, "server_rss_mb_after": {names[s.peer_id]: rss_mb(s.pid)
                                                                     for s in swarm.servers}}


def publish_fake(bootstrap: list[str], model_id: str, num_blocks: int) -> str:
    runner = LoopThread("fake-record").start()
    try:
        node = runner.run(PeerNode.start(P2PConfig(initial_peers=tuple(bootstrap)), NodeSettings(client_mode=True)))
        record = ServerRecord(peer_id=node.peer_id, model_id=model_id, span=BlockRange(0, num_blocks), state="online",
                              throughput=1e12, cache_tokens_left=10**6,
                              addresses=[f"/ip4/127.0.0.1/tcp/9/p2p/{node.peer_id}"],
                              direct_addresses=["/ip4/127.0.0.1/tcp/9"], software_version="9.9.9", batch_size=8)
        runner.run(node.dht_put_records([Put(block_key(model_id, i), record) for i in range(num_blocks)],
                                        time.time() + 300))
        runner.run(node.close())
        return node.peer_id
    finally:
        runner.stop()


def unreachable(model: Path) -> dict[str, Any]:
    ref = reference(model, 4)
    with LocalSwarm(model, [(0, 4)]) as swarm:
        fake = publish_fake(swarm.initial_peers, swarm.model_id, 4)
        ttft, dials, exact = [], [], True
        for _ in range(4):
            with DistributedModel.from_pretrained(model, swarm.initial_peers) as client:
                failed = 0
                for g in range(3):
                    if g:
                        time.sleep(2.5)
                    started = time.monotonic()
                    tokens = []
                    for token in client.stream(PROMPT, 4, stop_token_ids=()):
                        if not tokens and g == 0:
                            ttft.append(round(time.monotonic() - started, 3))
                        tokens.append(token)
                    exact &= tokens == ref
                    session = client.last_session
                    failed += sum(f.peer_id == fake for f in session.failovers) if session else 0
                dials.append(failed)
        return {"ttft_s_first_generation": ttft, "failed_dials_per_client_3_generations": dials, "exact": exact,
                "server_rss_mb": rss_mb(swarm.servers[0].pid)}


def spread(model: Path) -> dict[str, Any]:
    ref = reference(model, 4)
    with LocalSwarm(model, [(0, 4), (0, 4), (0, 4)]) as swarm:
        names = {s.peer_id: f"server{i}" for i, s in enumerate(swarm.servers)}
        firsts, exact = [], True
        for _ in range(6):
            with DistributedModel.from_pretrained(model, swarm.initial_peers) as client:
                exact &= client.generate(PROMPT, 4, stop_token_ids=()) == ref
                firsts.append(names[client.last_route[0].peer_id])
        return {"new_clients_per_server": dict(Counter(firsts)), "exact": exact}


def stall(model: Path) -> dict[str, Any]:
    ref = reference(model, 40)
    with LocalSwarm(model, [(0, 2), (2, 4)]) as swarm:
        only = next(s for s in swarm.servers if s.span == BlockRange(2, 4))
        tokens: list[int] = []
        error = None
        resume = threading.Timer(6.0, lambda: only.proc.kill(signal.SIGCONT))
        stopped_at = 0.0
        with DistributedModel.from_pretrained(model, swarm.initial_peers) as client:
            try:
                for token in client.stream(PROMPT, 40, stop_token_ids=()):
                    tokens.append(token)
                    if len(tokens) == 4:
                        only.proc.kill(signal.SIGSTOP)
                        stopped_at = time.monotonic()
                        resume.start()
            except Exception as err:
                error = f"{type(err).__name__}: {str(err)[:160]}"
            finally:
                resume.cancel()
                only.proc.kill(signal.SIGCONT)
            took = time.monotonic() - stopped_at
        return {"completed": error is None, "error": error, "exact": tokens == ref, "tokens": len(tokens),
                "seconds_from_sigstop_to_end": round(took, 2)}


def main() -> None:
    scenarios = sys.argv[1:] or ["liar", "unreachable", "stall", "spread"]
    out: dict[str, Any] = {"code": os.environ.get("PYTHONPATH", "")}
    for i, name in enumerate(scenarios):
        model = tiny_checkpoint("llama", seed=900 + i + int(time.time()) % 1000 * 10)  # a fresh model id each run
        out[name] = {"liar": liar, "unreachable": unreachable, "stall": stall, "spread": spread}[name](model)
        print(json.dumps({name: out[name]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
