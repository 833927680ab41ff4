"""``meshinfer bench load``: many concurrent sessions from one client through a local swarm.

Contract: starts ONE ``LocalSwarm`` (a bootstrap peer and ``--servers`` ``meshinfer serve`` processes on
127.0.0.1, the blocks split by ``bench.swarm.even_spans``, ``--torch-threads`` each) of one checkpoint
(default: the bench checkpoint) and joins it with ONE ``DistributedModel``. For each session count S
of ``--sessions`` (ascending), it starts S greedy generations at once as ``astream``s gathered on the
client's loop (no thread per session), each with its own prompt (``--prompt-tokens`` tokens of the
shipped corpus, each session starting ``PROMPT_STRIDE`` tokens further on), exactly ``--new-tokens``
tokens each (eos ignored), and stamps every token as it arrives. Per S, from the stamps (pure
``summarise_level``):

- aggregate decode tokens/s = decode tokens of all sessions (every token after each session's first)
  / wall time of the decode phase (earliest first token to latest last token);
- per-token decode latency: median and p95 over all inter-token gaps of all sessions;
- time to first token (from the common start: opening the session on every hop, queueing, prefill,
  first sample): median and p95 over sessions.

One untimed warm-up round (max S sessions, a few tokens) comes first. After the timed part, a
``LocalModel`` of the same directory in this process generates every prompt alone, one at a time, and
each session's greedy output is compared with it (counts reported, never asserted). Ratios reported
against the targets (``ratios``, pure): aggregate tokens/s at max S over that at the smallest S (the
baseline, normally 1; target >= ``TARGET_SPEEDUP``) and p95 latency at max S over the median at the
baseline (target <= ``TARGET_LATENCY_RATIO``). Every process started is stopped by PID (``LocalSwarm``)
whatever happens. Imports torch and the network only inside ``run``; never asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshinfer.bench.common import parse_counts, percentile, swarm_bench_setup
from meshinfer.errors import ConfigError

DESCRIPTION = "aggregate tokens/s, per-token latency and time to first token with many concurrent sessions"

TARGET_SPEEDUP = 5.0
"""Aggregate decode tokens/s at the most sessions over the single-session figure, on the bench checkpoint."""
TARGET_LATENCY_RATIO = 3.0
"""p95 per-token latency at the most sessions over the single-session median, at most."""
PROMPT_STRIDE = 7
"""Session i's prompt starts i * PROMPT_STRIDE tokens into the corpus: every session has its own prompt."""
WARMUP_TOKENS = 4
MAX_SESSIONS = 1024
LEVEL_TIMEOUT_S = 900.0


def parse_sessions(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]`` (ascending, duplicates dropped); ConfigError for anything else."""
    return parse_counts(text, "--sessions", MAX_SESSIONS)


def session_prompts(ids: Sequence[int], count: int, length: int, stride: int = PROMPT_STRIDE) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens, prompt i = ``ids[i*stride : i*stride + length]``."""
    need = (count - 1) * stride + length
    if len(ids) < need:
        raise ConfigError(f"need {need} corpus tokens for {count} prompts of {length} tokens, got {len(ids)}")
    return [list(ids[i * stride:i * stride + length]) for i in range(count)]


@dataclass(frozen=True)
class Trace:
    """One session of a round: when each of its tokens arrived (perf_counter seconds) and the tokens."""

    stamps: list[float]
    tokens: list[int]


def summarise_level(start: float, traces: Sequence[Trace]) -> dict[str, Any]:
    """The figures of one round whose sessions all started at ``start`` (see the module docstring)."""
    if not traces or any(len(t.stamps) < 2 for t in traces):
        raise ConfigError("every session of a round needs at least two tokens to measure decode")
    firsts = [t.stamps[0] for t in traces]
    lasts = [t.stamps[-1] for t in traces]
    gaps = [b - a for t in traces for a, b in zip(t.stamps, t.stamps[1:], strict=False)]
    ttft = [f - start for f in firsts]
    decode_tokens = sum(len(t.stamps) - 1 for t in traces)
    decode_wall = max(lasts) - min(firsts)
    return {
        "sessions": len(traces),
        "tokens": sum(len(t.stamps) for t in traces),
        "wall_s": max(lasts) - start,
        "decode_wall_s": decode_wall,
        "aggregate_decode_tokens_per_s": decode_tokens / max(decode_wall, 1e-9),
        "per_session_decode_tokens_per_s_median": statistics.median(
            (len(t.stamps) - 1) / max(t.stamps[-1] - t.stamps[0], 1e-9) for t in traces),
        "decode_latency_ms": {"median": statistics.median(gaps) * 1000, "p95": percentile(gaps, 0.95) * 1000},
        "time_to_first_token_ms": {"median": statistics.median(ttft) * 1000, "p95": percentile(ttft, 0.95) * 1000},
    }


def ratios(levels: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Max-S figures over the baseline (smallest S), against the targets."""
    base, top = min(levels), max(levels)
    speedup = levels[top]["aggregate_decode_tokens_per_s"] / levels[base]["aggregate_decode_tokens_per_s"]
    latency = levels[top]["decode_latency_ms"]["p95"] / max(levels[base]["decode_latency_ms"]["median"], 1e-9)
    return {
        "baseline_sessions": base,
        "max_sessions": top,
        "aggregate_tokens_per_s_max_over_baseline": speedup,
        "p95_latency_max_over_baseline_median": latency,
        "target_aggregate_speedup": TARGET_SPEEDUP,
        "target_latency_ratio": TARGET_LATENCY_RATIO,
        "meets_speedup_target": speedup >= TARGET_SPEEDUP,
        "meets_latency_target": latency <= TARGET_LATENCY_RATIO,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="checkpoint directory (default: the bench checkpoint, built on first use)")
    parser.add_argument("--servers", type=int, default=3, help="server processes splitting the blocks (default: 3)")
    parser.add_argument("--sessions", default="1,4,16", metavar="S1,S2,...",
                        help="concurrent session counts to measure (default: 1,4,16)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (default: 16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each session generates (default: 32)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (default: fp32)")
    parser.add_argument("--torch-threads", type=int, default=1, metavar="N",
                        help="compute threads of each server and of this process (default: 1)")
    parser.add_argument("--cohorts", type=int, default=None, metavar="K",
                        help="groups the client's sessions move through the route in (batched LM head, "
                             "client.head_batch; default: the client's default, 2)")


def _check(args: argparse.Namespace) -> list[int]:
    if args.prompt_tokens < 1 or args.new_tokens < 2:
        raise ConfigError("need --prompt-tokens >= 1 and --new-tokens >= 2")
    if args.servers < 1:
        raise ConfigError(f"--servers must be >= 1, got {args.servers}")
    if args.torch_threads < 1:
        raise ConfigError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    if args.cohorts is not None and args.cohorts < 1:
        raise ConfigError(f"--cohorts must be >= 1, got {args.cohorts}")
    return parse_sessions(args.sessions)


def _server_args(sessions: int, tokens_each: int) -> list[str]:
    """Raise the servers' session and KV limits only where the largest round would exceed their defaults; lift the
    per-peer limits to the whole server."""
    import dataclasses

    from meshinfer.server.config import CPU_CACHE_TOKENS, ServerConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig) if isinstance(f.default, int)}
    extra: list[str] = []
    if sessions > defaults["max_sessions"]:
        extra += ["--max-sessions", str(sessions)]
    if sessions * tokens_each > CPU_CACHE_TOKENS:  # the budget of a server on the CPU (--cache-tokens unset)
        extra += ["--cache-tokens", str(sessions * tokens_each)]
    # every session comes from this one client: the per-peer limits must not be what is measured
    return [*extra, "--max-sessions-per-peer", str(max(sessions, defaults["max_sessions"])),
            "--max-kv-tokens-per-peer", "1"]


async def _round(model: Any, prompts: list[list[int]], n: int) -> tuple[float, list[Trace]]:
    """Start one generation per prompt at once on the client's loop; stamp every token."""
    async def one(prompt: list[int]) -> Trace:
        stamps: list[float] = []
        tokens: list[int] = []
        async for token in model.astream(prompt, n, stop_token_ids=()):
            stamps.append(time.perf_counter())
            tokens.append(int(token))
        return Trace(stamps, tokens)

    start = time.perf_counter()
    traces = await asyncio.gather(*(one(p) for p in prompts))
    return start, list(traces)


def run_round(model: Any, prompts: list[list[int]], n: int) -> tuple[float, list[Trace]]:
    """``_round`` on ``model.loop`` from this thread (cancelled if it overruns ``LEVEL_TIMEOUT_S``)."""
    future = asyncio.run_coroutine_threadsafe(_round(model, prompts, n), model.loop)
    try:
        return future.result(timeout=LEVEL_TIMEOUT_S)
    except BaseException:
        future.cancel()
        raise


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from meshinfer.bench.local import prompt_ids
    from meshinfer.bench.swarm import even_spans
    from meshinfer.client.config import DEFAULT_COHORTS, ClientConfig
    from meshinfer.client.model import DistributedModel
    from meshinfer.testing.swarm import LocalSwarm

    levels_wanted = _check(args)
    p, n, top = args.prompt_tokens, args.new_tokens, max(levels_wanted)
    setup = swarm_bench_setup(args, p + n)
    path, dtype, local, load_before = setup.path, setup.dtype, setup.local, setup.load_before
    spec = local.spec
    spans = even_spans(spec.num_blocks, args.servers)
    prompts = session_prompts(prompt_ids(local.tokenizer, (top - 1) * PROMPT_STRIDE + p), top, p)

    _note(f"starting a swarm of {args.servers} servers ({', '.join(map(str, spans))}), "
          f"{args.torch_threads} torch thread(s) each...")
    t0 = time.perf_counter()
    rounds: dict[int, tuple[float, list[Trace]]] = {}
    with LocalSwarm(path, spans, dtype=dtype, torch_threads=args.torch_threads,
                    server_args=_server_args(top, p + n)) as swarm:
        swarm_up_s = time.perf_counter() - t0
        cohorts = args.cohorts or DEFAULT_COHORTS
        remote = DistributedModel.from_pretrained(path, swarm.initial_peers, dtype=dtype,
                                                  config=ClientConfig(cohorts=cohorts))
        try:
            join_s = time.perf_counter() - t0 - swarm_up_s
            _note(f"swarm ready in {swarm_up_s:.1f} s; warm-up with {top} session(s)...")
            run_round(remote, prompts[:top], min(n, WARMUP_TOKENS))
            for s in levels_wanted:
                _note(f"{s} concurrent session(s) x {n} tokens...")
                rounds[s] = run_round(remote, prompts[:s], n)
            route = [str(hop.span) for hop in remote.last_route]
        finally:
            remote.close()
        servers = [{"blocks": str(s.span), "announced_tokens_per_s": s.info.get("throughput"),
                    "announced_batch_tokens_per_s": s.info.get("batch_throughput"),
                    "announced_batch_size": s.info.get("batch_size")} for s in swarm.servers]

    _note(f"checking every output against the local engine ({top} prompt(s), one at a time)...")
    reference = [local.generate(prompt, n, stop_token_ids=()) for prompt in prompts]
    levels: dict[int, dict[str, Any]] = {}
    identical = checked = 0
    for s, (start, traces) in rounds.items():
        levels[s] = summarise_level(start, traces)
        same = sum(t.tokens == ref for t, ref in zip(traces, reference, strict=False))
        levels[s]["outputs_identical_to_local"] = same
        identical, checked = identical + same, checked + len(traces)
    return {
        "model": str(path),
        "params_millions": round(spec.param_count() / 1e6, 1),
        "dtype": dtype,
        "torch_threads_per_process": args.torch_threads,
        "client_cohorts": cohorts,
        "servers": args.servers,
        "route": route,
        "prompt_tokens": p,
        "new_tokens": n,
        "sessions": levels_wanted,
        "levels": {str(s): figures for s, figures in levels.items()},
        "ratios": ratios(levels),
        "greedy": {"outputs_checked": checked, "outputs_identical": identical, "all_identical": identical == checked},
        "startup": {"swarm_ready_s": swarm_up_s, "client_join_s": join_s},
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "server_info": servers,
        "versions": {"torch": torch.__version__},
    }
