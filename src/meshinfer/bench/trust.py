"""``meshinfer bench trust``: what audits cost (tokens/s, bytes, compute) and how fast they catch dishonest servers.

Contract: starts a ``LocalSwarm`` of the demo checkpoint (``--model``) on 127.0.0.1: the blocks split into two
spans A and B, two honest servers of A and three of B (every hop has an independent server to shadow it, and
B has a third one to referee). Measurements, all greedy unless said, every prompt random (seeded by ``--seed``):

1. Overhead: two clients, one with audits at the default rate (``ClientConfig()``), one with ``audit=False``,
   generate ``--new-tokens`` tokens in turn, ``--repeats`` times (interleaved, the order alternating, so both
   see the same machine load); reported: median tokens/s of each, the median of the per-repeat ratios, and
   the slowdown against the 5% target. With ``--pin`` it is measured again (``pinned``) as if shadows ran on
   other machines: both clients' routes forced through the first server of A and of B, which share CPU 0 with
   this process, while every other server (the shadows, referees) gets CPU 1 (``os.sched_setaffinity`` on
   every thread; skipped, saying why, without it or without CPUs 0 and 1). Also the swarm's extra compute:
   positions the shadows recomputed / positions the audited route computed.
2. Tokens to detection (``bench.trust_runs.detection``): for each ``--modes`` entry (``mode`` or ``mode:rate``;
   ``meshinfer.testing.dishonest``) a lying server of span ``--liar-span`` (default B) is started, then ``--runs``
   generations of ``--max-tokens`` tokens, each from a fresh client (fresh bans) whose whole-model route is
   steered through the liar (span plans -- shadows, referees, failovers -- are left alone). Per run: whether and
   at which generated token (the session's position when the audit caught it, minus the prompt) the liar was
   detected, and whether the output equals the honest reference (``LocalModel``, fp32 both sides). The caught
   fraction gets a 95% Wilson interval (``bench.trust_stats``), set beside the 99% target for liars lying on
   every step and beside ``client.audit_math.detection_probability`` (detectability 1; for ``load`` an upper
   bound: it lies only in batched turns, made here by a second, unaudited client through the liar) for all;
   ``tokens_to_detect(0.5)`` is the formula's median for a shadowed hop (the observed figure adds the latency of
   opening the shadow and of the check). Liars' lies are seeded per position (session, position, input), so a
   first span's liar lies at its rate per step too.
3. Audit bytes per generated token, on the audited client of (1): the shadow checks' tensor bytes, counted
   from the positions the audits verified (``AuditCounters``): each verified position of a hop sends its input
   and receives its output, ``2 * hidden * wire itemsize`` bytes (framing excluded).
4. ``--honest-steps N`` (``bench.trust_runs.honest``): a bf16 server of each span joins, and audited clients
   (``--honest-clients`` at once, then one alone; greedy and seeded sampling; all-fp32, all-bf16 and mixed
   routes) generate until N audited decode steps: false positives, windows, and per dtype pair the largest
   rel_err and window scale seen against the tolerance.

Every process started is stopped by PID (``LocalSwarm``); bounded by ``--time-limit`` (runs after it are
skipped); ``seconds`` says how long each part took. Never asserts a timing; imports torch and the network only
inside ``run``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshinfer.bench.common import demo_model_dir
from meshinfer.errors import ConfigError

if TYPE_CHECKING:
    from meshinfer.testing.dishonest import DishonestConfig

DESCRIPTION = "audit overhead (tokens/s, bytes per token) and tokens-to-detection of dishonest servers"

TARGET_SLOWDOWN = 0.05
"""Most decode slowdown with audits at the default rate that we aim for."""

DEFAULT_MODES = "noise:0.05,noise:0.25,noise:1.0,scale,skip-block,wrong,load"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="checkpoint directory (default: the built-in demo checkpoint)")
    parser.add_argument("--runs", type=int, default=3, help="generations per dishonest mode (default: 3)")
    parser.add_argument("--max-tokens", type=int, default=48,
                        help="tokens per detection generation: a liar not caught by then counts undetected "
                             "(default: 48)")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="tokens per generation of the overhead measurement (default: 64)")
    parser.add_argument("--repeats", type=int, default=6,
                        help="interleaved audit-on / audit-off generation pairs (default: 6)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default: 16)")
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help="dishonest modes to measure, comma-separated MODE or MODE:RATE "
                             f"(default: {DEFAULT_MODES})")
    parser.add_argument("--liar-span", choices=("A", "B"), default="B",
                        help="span the dishonest server serves: A (first blocks) or B (default: B)")
    parser.add_argument("--honest-steps", type=int, default=0,
                        help="audited decode steps on an all-honest swarm mixing fp32 and bf16 servers, to count "
                             "false positives (0: skip; default: 0)")
    parser.add_argument("--honest-clients", type=int, default=3,
                        help="audited clients generating at once in the honest run (plus one alone; default: 3)")
    parser.add_argument("--pin", action="store_true",
                        help="also measure the overhead with the client and the route's servers on CPU 0 and every "
                             "other server (shadows, referees) on CPU 1, as if on separate machines")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and liars (default: 0)")
    parser.add_argument("--time-limit", type=float, default=900.0,
                        help="skip what is left after this many seconds (default: 900)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line on stdout")


def parse_modes(text: str, seed: int = 0) -> list[DishonestConfig]:
    """``"noise:0.25,scale"`` -> the liars' configs (``ConfigError`` naming ``--modes`` for anything else)."""
    from meshinfer.testing.dishonest import DishonestConfig

    out: list[DishonestConfig] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        mode, _, rate = part.partition(":")
        try:
            out.append(DishonestConfig(mode, rate=float(rate) if rate else None, seed=seed))
        except (ValueError, ConfigError) as err:
            raise ConfigError(f"--modes: bad entry {part!r} ({err}); use MODE or MODE:RATE") from None
    if not out:
        raise ConfigError("--modes needs at least one MODE")
    return out


def _check(args: argparse.Namespace) -> None:
    if args.runs < 1 or args.max_tokens < 2 or args.new_tokens < 2 or args.repeats < 1 or args.prompt_tokens < 1:
        raise ConfigError("need --runs >= 1, --max-tokens >= 2, --new-tokens >= 2, --repeats >= 1 and "
                          "--prompt-tokens >= 1")
    if args.honest_steps < 0 or args.honest_clients < 1:
        raise ConfigError("need --honest-steps >= 0 (0: skip) and --honest-clients >= 1")
    if not args.time_limit > 0:
        raise ConfigError("--time-limit must be > 0")


def can_pin() -> str | None:
    """Why ``--pin`` cannot work here (None: it can): it needs ``os.sched_setaffinity`` and CPUs 0 and 1."""
    if not hasattr(os, "sched_setaffinity"):
        return "os.sched_setaffinity is unavailable on this platform"
    cpus = os.sched_getaffinity(0)
    if not {0, 1} <= cpus:
        return f"needs CPUs 0 and 1, this process may use {sorted(cpus)}"
    return None


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (0: this process) to ``cpus`` (threads started later inherit it)."""
    tasks = Path(f"/proc/{pid or os.getpid()}/task")
    for tid in os.listdir(tasks) if tasks.is_dir() else [str(pid)]:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):  # a thread that just ended
            pass


def _overhead(path: Any, swarm: Any, prompts: list[list[int]], args: argparse.Namespace,
              route: list[Any] | None = None) -> dict[str, Any]:
    """Audited vs unaudited tokens/s, audit bytes and the swarm's extra compute; ``route`` (servers of A then B):
    both clients' routes are forced through them (``--pin``: they and this process share CPU 0, every other
    server gets CPU 1)."""
    import torch

    from meshinfer.bench.trust_runs import steer
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel
    from meshinfer.models.kv_cache import torch_dtype

    peers = swarm.initial_peers
    rates: dict[bool, list[float]] = {True: [], False: []}
    ratios: list[float] = []
    with DistributedModel.from_pretrained(path, peers, config=ClientConfig()) as on, \
            DistributedModel.from_pretrained(path, peers, config=ClientConfig(audit=False)) as off:
        if route is not None:
            others = frozenset(s.peer_id for s in swarm.servers if s not in route)
            for client in (on, off):
                steer(client, others)
        for client in (on, off):
            client.generate(prompts[0], args.new_tokens, stop_token_ids=())  # warm-up: shapes, shadows, caches
        before = sum(p.positions for p in on.audits.peers.values())
        route_positions = 0
        for i, prompt in enumerate(prompts):
            got: dict[bool, float] = {}
            for audited in ((True, False) if i % 2 == 0 else (False, True)):
                client = on if audited else off
                started = time.perf_counter()
                tokens = client.generate(prompt, args.new_tokens, stop_token_ids=())
                got[audited] = len(tokens) / (time.perf_counter() - started)
                rates[audited].append(got[audited])
                if audited and client.last_session is not None:  # each hop computed prompt + new - 1 positions
                    route_positions += len(client.last_session.route) * (len(prompt) + len(tokens) - 1)
            ratios.append(got[True] / got[False])
            print(f"overhead repeat {i + 1}/{len(prompts)}{' (pinned)' if route else ''}: audited "
                  f"{got[True]:.1f} tok/s, unaudited {got[False]:.1f} tok/s", file=sys.stderr, flush=True)
        verified = sum(p.positions for p in on.audits.peers.values()) - before
        itemsize = torch.empty(0, dtype=torch_dtype(on.wire_dtype)).element_size()
        audit_bytes = verified * 2 * on.spec.hidden_size * itemsize
        counters = on.audits.as_dict()
    generated = len(prompts) * args.new_tokens
    ratio = statistics.median(ratios)
    return {
        "overhead": {
            "tokens_per_s_audited": statistics.median(rates[True]),
            "tokens_per_s_unaudited": statistics.median(rates[False]),
            "ratio_median": ratio,
            "ratios": ratios,
            "slowdown": 1.0 - ratio,
            "target_slowdown": TARGET_SLOWDOWN,
            "target_met": 1.0 - ratio <= TARGET_SLOWDOWN,
            "route": [s.peer_id for s in route] if route else None,
        },
        "audit_bytes": {
            "positions_verified": verified,
            "tensor_bytes": audit_bytes,
            "per_generated_token": audit_bytes / generated,
            "method": "verified positions x 2 (input sent + output received) x hidden x wire itemsize",
            "detections_on_honest_swarm": counters["detections"],
            "unresolved_on_honest_swarm": counters["unresolved"],
        },
        "extra_compute": {
            "shadow_positions": verified,
            "route_positions": route_positions,
            "ratio": verified / route_positions if route_positions else None,
            "method": "positions the shadows recomputed (verified) / positions the audited client's route "
                      "computed (hops x (prompt + new tokens - 1)), over the measured repeats",
        },
    }


def _pinned(path: Any, swarm: Any, prompts: list[list[int]], args: argparse.Namespace,
            span_a: Any, span_b: Any) -> dict[str, Any]:
    """The overhead with the route (first honest server of A and of B) and this process on CPU 0, every other
    server on CPU 1; affinities restored after (this process's threads to what they were, servers to all)."""
    why = can_pin()
    if why is not None:
        return {"skipped": why}
    route = [next(s for s in swarm.servers if s.span == span and s.dishonest is None and s.alive())
             for span in (span_a, span_b)]
    mine = os.sched_getaffinity(0)
    try:
        pin_process(0, {0})
        for server in swarm.servers:
            if server.alive():
                pin_process(server.pid, {0} if server in route else {1})
        figures = _overhead(path, swarm, prompts, args, route=route)
    finally:
        pin_process(0, mine)
        for server in swarm.servers:
            if server.alive():
                pin_process(server.pid, mine)
    return {**figures, "cpus": {"client_and_route": [0], "other_servers": [1]}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check(args)
    liars = parse_modes(args.modes, args.seed)
    from meshinfer.bench import trust_runs
    from meshinfer.bench.swarm import even_spans
    from meshinfer.models.checkpoint import Checkpoint
    from meshinfer.models.engine import LocalModel
    from meshinfer.testing.swarm import LocalSwarm

    path = demo_model_dir(args.model)
    spec = Checkpoint(path).spec
    if spec.num_blocks < 2:
        raise ConfigError("bench trust needs a model of at least 2 blocks (two spans)")
    if args.prompt_tokens + max(args.max_tokens, args.new_tokens) > spec.max_position_embeddings:
        raise ConfigError(f"--prompt-tokens + --max-tokens/--new-tokens exceeds the model's context of "
                          f"{spec.max_position_embeddings}")
    span_a, span_b = even_spans(spec.num_blocks, 2)
    liar_span = span_a if args.liar_span == "A" else span_b
    rng = random.Random(args.seed)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, spec.vocab_size) for _ in range(args.prompt_tokens)] for _ in range(n)]

    def endless() -> Iterator[list[int]]:
        while True:
            yield prompts(1)[0]

    overhead_prompts = prompts(args.repeats)
    detect_prompts = prompts(args.runs)
    local = LocalModel.from_pretrained(path)
    references = [local.generate(p, args.max_tokens, stop_token_ids=()) for p in detect_prompts]
    del local
    deadline = time.monotonic() + args.time_limit
    spans = [span_a, span_a, span_b, span_b, span_b]
    seconds: dict[str, float] = {}
    print(f"starting {len(spans)} servers ({', '.join(map(str, spans))})...", file=sys.stderr, flush=True)
    with LocalSwarm(path, spans) as swarm:
        t0 = time.monotonic()
        figures = _overhead(path, swarm, overhead_prompts, args)
        seconds["overhead"] = time.monotonic() - t0
        if args.pin:
            t0 = time.monotonic()
            figures["pinned"] = _pinned(path, swarm, overhead_prompts, args, span_a, span_b)
            seconds["pinned"] = time.monotonic() - t0
        detection: list[dict[str, Any]] = []
        for cfg in liars:
            if time.monotonic() > deadline:
                break
            print(f"liar on span {args.liar_span}: {cfg.describe()}", file=sys.stderr, flush=True)
            detection.append(trust_runs.detection(path, swarm, liar_span, cfg, detect_prompts, references, args,
                                                  deadline))
        honest: dict[str, Any] | None = None
        if args.honest_steps > 0 and time.monotonic() < deadline:
            print(f"honest run: {args.honest_steps} audited decode steps, fp32 and bf16 servers...",
                  file=sys.stderr, flush=True)
            honest = trust_runs.honest(path, swarm, (span_a, span_b), endless(), args, deadline)
            seconds["honest"] = honest["seconds"]
    result: dict[str, Any] = {
        "model": str(path),
        "spans": [str(s) for s in spans],
        "prompt_tokens": args.prompt_tokens,
        "liar_span": args.liar_span,
        **figures,
        "detection": {f"{d['mode']}@{d['rate']:g}": d for d in detection},
        "all_outputs_exact": all(d["outputs_exact"] == d["runs"] for d in detection),
        "honest": honest,
        "seconds": {**seconds, **{f"detection {k}": d["seconds"] for k, d in
                                  ((f"{d['mode']}@{d['rate']:g}", d) for d in detection)}},
    }
    if args.json:
        import json

        print(json.dumps(result))
    return result
