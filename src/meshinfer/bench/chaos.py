"""``meshinfer bench chaos``: generations through a swarm whose servers are killed and restarted at random.

Contract: starts a ``LocalSwarm`` of ``--servers`` ``meshinfer serve`` processes on 127.0.0.1 (the model's
blocks split into ``servers // 2`` spans, two servers each, so every span survives one loss), and runs
``--generations`` greedy generations one after another from one ``DistributedModel`` (failover on), each
with its own prompt. Meanwhile a chaos thread, every ``--kill-every`` generated tokens on average (the
exact points drawn at random, seeded by ``--seed``, so kills land mid-generation whatever the machine's
speed), picks a live server whose span still has another live server (one on the route the client is using
right now when there is one, so kills hit live sessions) and SIGKILLs or SIGTERMs it (``--signals``),
then starts a replacement for that span (``LocalSwarm.add_server``); at most ``--max-kills`` times, and
never once the generations are done. Every generation is compared with the local engine's greedy
tokens for the same prompt (computed in this process after the chaos, so it does not compete for CPU).
Reported: generations completed and identical to the reference, failovers (replacements recorded by the
sessions, including stale servers replaced at open), kills, the time each failover took (replacement
and replay; median, max) and the tokens replayed, and the extra wall time of generations that failed
over (over the median of those that did not). Every process started is stopped by PID whatever happens;
the run is bounded by ``--time-limit``. Never asserts a timing.
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from meshinfer.bench.common import demo_model_dir
from meshinfer.errors import ConfigError

DESCRIPTION = "generations through a swarm whose servers are killed and restarted at random (failover check)"

TARGET_FAILOVER_S = 2.0
"""Median extra time per failover we aim for, on top of the replay's compute."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="checkpoint directory (default: the built-in demo checkpoint)")
    parser.add_argument("--servers", type=int, default=6, help="server processes, two per span (default: 6)")
    parser.add_argument("--generations", type=int, default=30, help="generations to run (default: 30)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per generation (default: 64)")
    parser.add_argument("--kill-every", type=int, default=150,
                        help="mean number of generated tokens between kills (default: 150)")
    parser.add_argument("--max-kills", type=int, default=10, help="most servers killed (default: 10)")
    parser.add_argument("--signals", choices=("mixed", "kill", "term"), default="mixed",
                        help="how servers are stopped: SIGKILL or SIGTERM at random, only SIGKILL (a crash) or "
                             "only SIGTERM (a graceful leave: drain, then fail over) (default: mixed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and chaos (default: 0)")
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="stop the run after this many seconds (default: 600)")


def _check(args: argparse.Namespace) -> None:
    if args.servers < 2 or args.servers % 2:
        raise ConfigError(f"--servers must be an even number >= 2 (two per span), got {args.servers}")
    if args.generations < 1 or args.new_tokens < 2 or args.max_kills < 0:
        raise ConfigError("need --generations >= 1, --new-tokens >= 2 and --max-kills >= 0")
    if args.kill_every < 1 or not args.time_limit > 0:
        raise ConfigError("--kill-every must be >= 1 and --time-limit > 0")


class Chaos:
    """Kills a random redundant server now and then and starts a replacement, until stopped."""

    def __init__(self, swarm: Any, *, kill_every: int, max_kills: int, seed: int,
                 in_use: Callable[[], set[str]] = set, signals: str = "mixed") -> None:
        self.swarm = swarm
        self.in_use = in_use
        self.kill_every = kill_every
        self.signals = {"mixed": [signal.SIGKILL, signal.SIGTERM], "kill": [signal.SIGKILL],
                        "term": [signal.SIGTERM]}[signals]
        self.tokens = 0
        """Tokens generated so far (the generating thread counts them; kills are placed by this count)."""
        self.max_kills = max_kills
        self.rng = random.Random(seed)
        self.kills: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _victims(self) -> list[Any]:
        live = [s for s in self.swarm.servers if s.alive()]
        return [s for s in live if sum(1 for o in live if o.span == s.span) >= 2]

    def _run(self) -> None:
        target = 0
        while len(self.kills) < self.max_kills:
            target += max(1, round(self.rng.uniform(0.5, 1.5) * self.kill_every))
            while self.tokens < target:
                if self._stop.wait(0.005):
                    return
            victims = self._victims()
            if not victims:
                continue
            busy = [v for v in victims if v.peer_id in self.in_use()]
            victim = self.rng.choice(busy or victims)  # a server the generation is using, when one is spare
            sig = self.rng.choice(self.signals)
            victim.proc.kill(sig)
            self.kills.append({"peer_id": victim.peer_id, "span": str(victim.span), "signal": sig.name,
                               "at": time.monotonic()})
            victim.proc.stop(timeout=15.0)
            if self._stop.is_set():
                return
            try:
                self.swarm.add_server(victim.span)
            except Exception as err:  # a replacement that fails to start is reported, the run goes on
                self.errors.append(f"restart of {victim.span} failed: {err}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check(args)
    from meshinfer.bench.swarm import even_spans
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel
    from meshinfer.models.checkpoint import Checkpoint
    from meshinfer.models.engine import LocalModel
    from meshinfer.testing.swarm import LocalSwarm

    path = demo_model_dir(args.model)
    spec = Checkpoint(path).spec
    spans = [s for s in even_spans(spec.num_blocks, args.servers // 2) for _ in range(2)]
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, spec.vocab_size) for _ in range(rng.randint(4, 24))]
               for _ in range(args.generations)]
    deadline = time.monotonic() + args.time_limit
    print(f"starting {args.servers} servers ({', '.join(map(str, spans))})...", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    # a SIGTERMed server drains for at most 2 s, then ends its sessions so their clients fail over
    with LocalSwarm(path, spans, server_args=["--drain-timeout", "2"]) as swarm:
        with DistributedModel.from_pretrained(path, swarm.initial_peers, config=ClientConfig()) as client:
            def in_use() -> set[str]:
                session = client.last_session
                return {hop.peer_id for hop in session.route} if session is not None else set()

            chaos = Chaos(swarm, kill_every=args.kill_every, max_kills=args.max_kills, seed=args.seed + 1,
                          in_use=in_use, signals=args.signals)
            client.generate(prompts[0][:4], 4, stop_token_ids=())  # warm-up, before any chaos
            chaos.start()
            try:
                for i, prompt in enumerate(prompts):
                    if time.monotonic() > deadline:
                        break
                    started = time.monotonic()
                    tokens = []
                    try:
                        for token in client.stream(prompt, args.new_tokens, stop_token_ids=()):
                            tokens.append(token)
                            chaos.tokens += 1
                        error = None
                    except Exception as err:
                        tokens, error = [], f"{type(err).__name__}: {err}"
                    session = client.last_session
                    failovers = list(session.failovers) if session is not None else []
                    results.append({"tokens": tokens, "error": error, "seconds": time.monotonic() - started,
                                    "failovers": [{"seconds": f.seconds, "replayed_tokens": f.replayed_tokens,
                                                   "reason": f.reason[:200]} for f in failovers]})
                    print(f"generation {i + 1}/{len(prompts)}: {'ok' if error is None else error} "
                          f"({len(failovers)} failover(s))", file=sys.stderr, flush=True)
            finally:
                chaos.stop()
    local = LocalModel.from_pretrained(path)
    identical = sum(1 for r, p in zip(results, prompts, strict=False)
                    if r["error"] is None and r["tokens"] == local.generate(p, args.new_tokens, stop_token_ids=()))
    costs = [f["seconds"] for r in results for f in r["failovers"]]
    calm = [r["seconds"] for r in results if not r["failovers"] and r["error"] is None]
    base = statistics.median(calm) if calm else None
    extra = [r["seconds"] - base for r in results if r["failovers"] and r["error"] is None and base is not None]
    return {
        "model": str(path),
        "servers": args.servers,
        "spans": [str(s) for s in spans],
        "generations_planned": args.generations,
        "generations_run": len(results),
        "generations_completed": sum(1 for r in results if r["error"] is None),
        "generations_identical": identical,
        "errors": [r["error"] for r in results if r["error"]][:10],
        "kills": len(chaos.kills),
        "kill_signals": [k["signal"] for k in chaos.kills],
        "restart_errors": chaos.errors,
        "failovers": len(costs),
        "failover_seconds": {"median": statistics.median(costs) if costs else None,
                             "max": max(costs) if costs else None},
        "replayed_tokens_total": sum(f["replayed_tokens"] for r in results for f in r["failovers"]),
        "generation_seconds_without_failover_median": base,
        "extra_seconds_per_generation_with_failover": {"median": statistics.median(extra) if extra else None,
                                                       "max": max(extra) if extra else None},
        "target": {"complete_and_identical": "100%", "median_failover_s": TARGET_FAILOVER_S},
        "target_met": bool(results) and identical == len(prompts)
        and (not costs or statistics.median(costs) < TARGET_FAILOVER_S),
    }
