"""``meshinfer bench credits``: under contention, a contributor's sessions wait less than a freeloader's.

Contract: on 127.0.0.1 it starts a bootstrap peer and two servers: **S**, the contended one, serving every block
of the bench checkpoint (``--model``) with ``--max-batch-sessions`` (default 2: fewer than the sessions that will
want it) and ``--credit-saturation`` sized for a short run; and **C**, the contributor's server, serving a tiny
second model with ``--credit-to X``, where X is the contributor's client key (made here). A warm-up client uses
C for ``--warmup-tokens`` tokens, so C holds receipts for that work. Then, at once, client X (with that key) and
client F (a fresh key: no contribution) each run ``--sessions`` concurrent greedy generations of ``--new-tokens``
tokens through S, ``--rounds`` times. Reported per client: each session's time per output token after its first
(median and p95 over sessions: the latency a user of that session sees) and time to first token, every token's
wait (time since the session's previous token; bursty with speculation), tokens/s, the slowest session's tokens/s
(no session starves: every one finishes, and the slowest one's rate is > 0), and the ratios of F's figures to
X's. X's credit as S computes it is the work C's receipts show (``meshinfer credits`` would list it). Every
process is stopped by PID; nothing is asserted about timings.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DESCRIPTION = "contributor vs freeloader latency on a contended server (credits, issue 23)"
PROMPT = [5, 17, 42, 7, 99, 3, 11, 64]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint directory of S (default: the bench checkpoint)")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent generations of each client")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each generation makes")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both clients' concurrent generations")
    parser.add_argument("--warmup-tokens", type=int, default=96, help="tokens the warm-up client has C compute")
    parser.add_argument("--max-batch-sessions", type=int, default=2, help="S's --max-batch-sessions (contention)")
    parser.add_argument("--credit-weight", type=int, default=4, help="S's --credit-weight")
    parser.add_argument("--credit-saturation", type=int, default=2000, help="S's --credit-saturation (block-tokens)")
    parser.add_argument("--torch-threads", type=int, default=1, help="compute threads of each server")
    parser.add_argument("--speculate", action=argparse.BooleanOptionalAction, default=True,
                        help="the clients decode speculatively (the default of every client)")


def _check(args: argparse.Namespace) -> None:
    from meshinfer.errors import ConfigError

    for name in ("sessions", "rounds", "new_tokens", "warmup_tokens", "max_batch_sessions", "credit_weight",
                 "credit_saturation", "torch_threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


async def _phase(model: Any, sessions: int, new_tokens: int) -> dict[str, Any]:
    """``sessions`` concurrent generations on ``model``'s loop: every token's wait; per session its time to first
    token, its time per output token after the first and its rate."""
    waits: list[float] = []
    rates: list[float] = []
    ttft: list[float] = []
    tpot: list[float] = []

    async def one() -> None:
        started = last = time.perf_counter()
        first: float | None = None
        count = 0
        async for _ in model.astream(PROMPT, new_tokens, stop_token_ids=()):
            now = time.perf_counter()
            waits.append(now - last)
            first = now if first is None else first
            last = now
            count += 1
        ended = time.perf_counter()
        rates.append(count / max(1e-9, ended - started))
        if first is not None:
            ttft.append(first - started)
            tpot.append((ended - first) / max(1, count - 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(sessions)))
    return {"waits": waits, "rates": rates, "ttft": ttft, "tpot": tpot, "seconds": time.perf_counter() - t0}


def _summary(result: dict[str, Any], sessions: int, new_tokens: int) -> dict[str, Any]:
    from meshinfer.bench.common import percentile

    waits = sorted(result["waits"])
    tpot = sorted(result["tpot"])
    return {
        "sessions_finished": len(result["rates"]),
        "session_ms_per_token_median": round(1000 * statistics.median(tpot), 2),
        "session_ms_per_token_p95": round(1000 * percentile(tpot, 0.95), 2),
        "time_to_first_token_ms_median": round(1000 * statistics.median(result["ttft"]), 1),
        "tokens": len(waits),
        "token_wait_ms_median": round(1000 * statistics.median(waits), 2),
        "token_wait_ms_p95": round(1000 * percentile(waits, 0.95), 2),
        "tokens_per_s": round(len(waits) / result["seconds"], 2),
        "slowest_session_tokens_per_s": round(min(result["rates"]), 2),
        "expected_tokens": sessions * new_tokens,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from meshinfer.bench.common import bench_model_dir
    from meshinfer.client.model import DistributedModel
    from meshinfer.p2p.identity import Identity, write_identity
    from meshinfer.testing.checkpoints import tiny_checkpoint
    from meshinfer.testing.procs import start_dht
    from meshinfer.testing.swarm import LocalSwarm

    _check(args)
    model_dir = bench_model_dir(args.model)
    side_model = tiny_checkpoint("llama", seed=4242)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="meshinfer-bench-credits-") as tmp:
        x_key = Path(tmp) / "contributor.key"
        x_identity = Identity.generate()
        write_identity(x_identity, x_key)
        dht, peers = start_dht(timeout=60)
        swarms: list[LocalSwarm] = []
        try:
            threads = ["--torch-threads", str(args.torch_threads)]
            contended = LocalSwarm(model_dir, [(0, _blocks(model_dir))], initial_peers=peers, torch_threads=None,
                                   server_args=[*threads, "--max-batch-sessions", str(args.max_batch_sessions),
                                                "--credit-weight", str(args.credit_weight),
                                                "--credit-saturation", str(args.credit_saturation),
                                                "--receipts-db", str(Path(tmp) / "s.sqlite")])
            swarms.append(contended.start())
            contributor = LocalSwarm(side_model, [(0, _blocks(side_model))], initial_peers=peers, torch_threads=None,
                                     server_args=[*threads, "--credit-to", x_identity.peer_id,
                                                  "--receipts-db", str(Path(tmp) / "c.sqlite")])
            swarms.append(contributor.start())
            with DistributedModel.from_pretrained(side_model, peers, audit=False) as warm:
                for _ in range(max(1, args.warmup_tokens // 48)):
                    warm.generate(PROMPT, 48, stop_token_ids=())
            handed = warm.receipts.handed if warm.receipts is not None else 0
            spec = {"speculate": args.speculate}
            with DistributedModel.from_pretrained(model_dir, peers, audit=False, identity=str(x_key), **spec) as x, \
                    DistributedModel.from_pretrained(model_dir, peers, audit=False, **spec) as f:
                # S learns X's credit on X's first step (the links, then C's receipts, in the background)
                x.generate(PROMPT, 2, stop_token_ids=())
                f.generate(PROMPT, 2, stop_token_ids=())
                time.sleep(3.0)
                book, shown = _collect_sync(x, contributor)
                results: list[dict[str, Any]] = [{}, {}]
                for _ in range(args.rounds):  # both clients at once, every round; sessions pooled over rounds
                    futures = [asyncio.run_coroutine_threadsafe(_phase(m, args.sessions, args.new_tokens), m.loop)
                               for m in (x, f)]
                    for pooled, future in zip(results, futures, strict=True):
                        for key, value in future.result(timeout=600).items():
                            pooled[key] = pooled.get(key, 0 if key == "seconds" else []) + value
            learnt = [line.split(" - ")[-1].strip() for line in contended.servers[0].proc.stderr_tail(200).splitlines()
                      if "receipts" in line and ("showed" in line or "cannot learn" in line)]
        finally:
            for swarm in swarms:
                swarm.stop()
            dht.stop(timeout=10.0)
    contributor_row = _summary(results[0], args.sessions * args.rounds, args.new_tokens)
    freeloader_row = _summary(results[1], args.sessions * args.rounds, args.new_tokens)
    return {
        "servers": {"contended": {"max_batch_sessions": args.max_batch_sessions, "credit_weight": args.credit_weight,
                                  "credit_saturation": args.credit_saturation},
                    "contributor_server": "a tiny second model, --credit-to the contributor's client"},
        "warmup_receipts_handed": handed,
        "contributor_credit_block_tokens": book,
        "receipts_shown_by_contributor_server": shown,
        "contended_server_learnt": learnt[-3:],
        "sessions_per_client": args.sessions * args.rounds,
        "new_tokens": args.new_tokens,
        "contributor": contributor_row,
        "freeloader": freeloader_row,
        "freeloader_over_contributor": {
            "session_ms_per_token_median": _ratio(freeloader_row, contributor_row, "session_ms_per_token_median"),
            "session_ms_per_token_p95": _ratio(freeloader_row, contributor_row, "session_ms_per_token_p95"),
            "token_wait_median": _ratio(freeloader_row, contributor_row, "token_wait_ms_median"),
            "token_wait_p95": _ratio(freeloader_row, contributor_row, "token_wait_ms_p95"),
        },
        "no_session_starved": all(r["sessions_finished"] == args.sessions * args.rounds
                                  and r["slowest_session_tokens_per_s"] > 0 for r in (contributor_row, freeloader_row)),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    return round(a[key] / max(1e-9, b[key]), 2)


def _collect_sync(client: Any, contributor: Any) -> tuple[int, int | str]:
    """The work the contributor's server shows it served (from its receipts, verified here)."""
    from meshinfer.ledger.fetch import collect

    server = contributor.servers[0]
    coro = collect(client.view.node, [(server.peer_id, tuple(server.maddrs))], now=time.time())
    book, shown = asyncio.run_coroutine_threadsafe(coro, client.loop).result(60)
    served = sum(r.work for r in book.receipts() if r.server == server.peer_id)
    return served, shown[server.peer_id]


def _blocks(model_dir: Path) -> int:
    from meshinfer.models.checkpoint import Checkpoint

    return Checkpoint(model_dir).spec.num_blocks
