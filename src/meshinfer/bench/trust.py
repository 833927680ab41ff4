"""``meshinfer bench trust``: what audits cost (tokens/s, bytes) and how fast they catch dishonest servers.

Contract: starts a ``LocalSwarm`` of the demo checkpoint (``--model``) on 127.0.0.1: the blocks split into two
spans A and B, two honest servers of A and three of B (every hop has an independent server to shadow it, and
B has a third one to referee). Three measurements, all greedy, every prompt random (seeded by ``--seed``):

1. Overhead: two clients, one with audits at the default rate (``ClientConfig()``), one with ``audit=False``,
   generate ``--new-tokens`` tokens in turn, ``--repeats`` times (interleaved, the order alternating, so both
   see the same machine load); reported: median tokens/s of each, the median of the per-repeat ratios, and
   the slowdown against the 5% target.
2. Tokens to detection: for each ``--modes`` entry (``mode`` or ``mode:rate``; ``meshinfer.testing.dishonest``)
   a lying server of span B is started (``LocalSwarm.add_server(dishonest=...)``), then ``--runs`` generations
   of ``--max-tokens`` tokens, each from a fresh client (fresh bans) whose whole-model route is steered
   through the liar (its plans over the whole model exclude the honest servers of B; span plans -- shadows,
   referees, failovers -- are left alone). Per run: whether and at which generated token (the session's
   position when the audit caught it, minus the prompt) the liar was detected, and whether the output equals
   the honest reference (``LocalModel``, fp32 both sides, which the honest swarm gives exactly). The observed
   detection rate is set beside ``client.audit_math.detection_probability`` (detectability 1; for ``load``
   the rate is an upper bound: it lies only in batched turns, made here by a second, unaudited client
   generating through the liar at the same time), and ``tokens_to_detect(0.5)`` (the formula's median for a
   shadowed hop; the observed figure adds the latency of opening the shadow and of the check itself).
   The liar is stopped after its runs. It serves the SECOND span on purpose: its lies are seeded by its
   input's bytes, and a first span's decode input is the token's embedding alone, so a greedy loop over a
   few tokens would repeat the same few decisions (rates per distinct input, not per step); the second
   span's inputs depend on the whole context.
3. Audit bytes per generated token, on the audited client of (1): the shadow checks' tensor bytes, counted
   from the positions the audits verified (``AuditCounters``): each verified position of a hop sends its input
   and receives its output, ``2 * hidden * wire itemsize`` bytes (framing excluded).

Every process started is stopped by PID (``LocalSwarm``); bounded by ``--time-limit`` (runs after it are
skipped). Never asserts a timing; imports torch and the network only inside ``run``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from meshinfer.bench.common import demo_model_dir
from meshinfer.errors import ConfigError

if TYPE_CHECKING:
    from meshinfer.client.model import DistributedModel
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
    if not args.time_limit > 0:
        raise ConfigError("--time-limit must be > 0")


def _steer(model: DistributedModel, avoid: frozenset[str]) -> None:
    """Whole-model plans of ``model`` avoid ``avoid`` (so the route takes the liar); span plans are untouched."""
    view = model.view
    plan = view.plan

    async def steered(ref: Any, *, blocks: Any = None, exclude: Any = (), **kw: Any) -> Any:
        if blocks is None:
            exclude = {*exclude, *avoid}
        return await plan(ref, blocks=blocks, exclude=exclude, **kw)

    view.plan = steered  # type: ignore[method-assign]


def _watch_detections(model: DistributedModel) -> list[int]:
    """Replace ``model.audits`` by counters that record the session's position at each detection."""
    from meshinfer.client.audit import AuditCounters

    seen: list[int] = []

    class Recording(AuditCounters):
        def __setattr__(self, name: str, value: Any) -> None:
            if name == "detections" and value > getattr(self, "detections", 0):
                session = model.last_session
                seen.append(session.position if session is not None else -1)
            super().__setattr__(name, value)

    model.audits = Recording()
    return seen


def _overhead(path: Any, peers: list[str], prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel
    from meshinfer.models.kv_cache import torch_dtype

    rates: dict[bool, list[float]] = {True: [], False: []}
    ratios: list[float] = []
    with DistributedModel.from_pretrained(path, peers, config=ClientConfig()) as on, \
            DistributedModel.from_pretrained(path, peers, config=ClientConfig(audit=False)) as off:
        for client in (on, off):
            client.generate(prompts[0], args.new_tokens, stop_token_ids=())  # warm-up: shapes, shadows, caches
        before = sum(p.positions for p in on.audits.peers.values())
        for i, prompt in enumerate(prompts):
            got: dict[bool, float] = {}
            for audited in ((True, False) if i % 2 == 0 else (False, True)):
                client = on if audited else off
                started = time.perf_counter()
                tokens = client.generate(prompt, args.new_tokens, stop_token_ids=())
                got[audited] = len(tokens) / (time.perf_counter() - started)
                rates[audited].append(got[audited])
            ratios.append(got[True] / got[False])
            print(f"overhead repeat {i + 1}/{len(prompts)}: audited {got[True]:.1f} tok/s, "
                  f"unaudited {got[False]:.1f} tok/s", file=sys.stderr, flush=True)
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
        },
        "audit_bytes": {
            "positions_verified": verified,
            "tensor_bytes": audit_bytes,
            "per_generated_token": audit_bytes / generated,
            "method": "verified positions x 2 (input sent + output received) x hidden x wire itemsize",
            "detections_on_honest_swarm": counters["detections"],
            "unresolved_on_honest_swarm": counters["unresolved"],
        },
    }


def _detection(path: Any, swarm: Any, span: Any, liar_cfg: DishonestConfig, prompts: list[list[int]],
               references: list[list[int]], args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    from meshinfer.client.audit_math import detection_probability, tokens_to_detect
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel

    honest = frozenset(s.peer_id for s in swarm.servers if s.span == span and s.dishonest is None and s.alive())
    liar = swarm.add_server(span, dishonest=liar_cfg)
    runs: list[dict[str, Any]] = []
    stop_load = threading.Event()
    loader: threading.Thread | None = None
    try:
        if liar_cfg.mode == "load":  # a second session through the liar, so its turns batch two sessions
            background = DistributedModel.from_pretrained(path, swarm.initial_peers, config=ClientConfig(audit=False))
            _steer(background, honest)

            def load() -> None:
                while not stop_load.is_set():
                    try:
                        background.generate(prompts[0], args.max_tokens, stop_token_ids=())
                    except Exception:  # the liar may be gone; the measurement goes on
                        time.sleep(0.1)

            loader = threading.Thread(target=load, name="trust-load", daemon=True)
            loader.start()
        for prompt, reference in zip(prompts, references, strict=True):
            if time.monotonic() > deadline:
                break
            with DistributedModel.from_pretrained(path, swarm.initial_peers, config=ClientConfig()) as client:
                _steer(client, honest)
                seen = _watch_detections(client)
                try:
                    tokens, error = client.generate(prompt, args.max_tokens, stop_token_ids=()), None
                except Exception as err:
                    tokens, error = [], f"{type(err).__name__}: {err}"[:200]
                session = client.last_session
                route = [h.peer_id for h in session.route] if session is not None else []
            runs.append({"detected": bool(seen),
                         "detected_at_token": max(0, seen[0] - len(prompt) + 1) if seen else None,
                         "liar_on_route": liar.peer_id in route or bool(seen),
                         "output_exact": error is None and tokens == reference, "error": error})
    finally:
        stop_load.set()
        if loader is not None:
            loader.join(timeout=60)
        swarm.stop_server(liar)
    cfg = ClientConfig()
    detected = [r for r in runs if r["detected"]]
    at = [r["detected_at_token"] for r in detected]
    return {
        "mode": liar_cfg.mode,
        "rate": liar_cfg.effective_rate,
        "runs": len(runs),
        "detected": len(detected),
        "detection_rate": len(detected) / len(runs) if runs else None,
        "predicted_detection_rate": detection_probability(
            args.max_tokens, corrupt_fraction=liar_cfg.effective_rate, detectability=1.0,
            audit_fraction=cfg.audit_fraction, audit_every=cfg.audit_every),
        "predicted_tokens_to_detection_p50": tokens_to_detect(
            0.5, corrupt_fraction=liar_cfg.effective_rate, detectability=1.0, audit_every=cfg.audit_every),
        "tokens_to_detection_median": statistics.median(at) if at else None,
        "tokens_to_detection": [r["detected_at_token"] for r in runs],
        "outputs_exact": sum(1 for r in runs if r["output_exact"]),
        "liar_on_route": sum(1 for r in runs if r["liar_on_route"]),
        "errors": [r["error"] for r in runs if r["error"]][:3],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check(args)
    liars = parse_modes(args.modes, args.seed)
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
    rng = random.Random(args.seed)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, spec.vocab_size) for _ in range(args.prompt_tokens)] for _ in range(n)]

    overhead_prompts = prompts(args.repeats)
    detect_prompts = prompts(args.runs)
    local = LocalModel.from_pretrained(path)
    references = [local.generate(p, args.max_tokens, stop_token_ids=()) for p in detect_prompts]
    del local
    deadline = time.monotonic() + args.time_limit
    spans = [span_a, span_a, span_b, span_b, span_b]
    print(f"starting {len(spans)} servers ({', '.join(map(str, spans))})...", file=sys.stderr, flush=True)
    with LocalSwarm(path, spans) as swarm:
        figures = _overhead(path, swarm.initial_peers, overhead_prompts, args)
        detection: list[dict[str, Any]] = []
        for cfg in liars:
            if time.monotonic() > deadline:
                break
            print(f"liar: {cfg.describe()}", file=sys.stderr, flush=True)
            detection.append(_detection(path, swarm, span_b, cfg, detect_prompts, references, args, deadline))
    result: dict[str, Any] = {
        "model": str(path),
        "spans": [str(s) for s in spans],
        "prompt_tokens": args.prompt_tokens,
        **figures,
        "detection": {f"{d['mode']}@{d['rate']:g}": d for d in detection},
        "all_outputs_exact": all(d["outputs_exact"] == d["runs"] for d in detection),
    }
    if args.json:
        import json

        print(json.dumps(result))
    return result
