"""``meshinfer bench api``: requests/s and time to first token through the OpenAI-compatible gateway.

Contract: starts a ``LocalSwarm`` (a bootstrap peer and ``--servers`` ``meshinfer serve`` processes on
127.0.0.1, the blocks split by ``bench.swarm.even_spans``, ``--torch-threads`` each) of one checkpoint
(default: the bench checkpoint), or joins an existing swarm given with ``--initial-peers``; joins it with one
``DistributedModel`` and serves the gateway app in this process (uvicorn on the client's loop thread, a free port
on 127.0.0.1). Then, for each level C of ``--concurrency`` (default 1 and 16), C client threads send
``--requests`` streaming chat completions in all (stdlib ``http.client``, greedy, ``max_tokens``
``--max-tokens``, ``stream_options.include_usage``; request i asks about line i of the shipped corpus) and
stamp each one: time to first token = from sending the request to the first SSE event carrying text (or the
finish event, for a reply with no text), total time, completion tokens (from the usage chunk). Per level (pure
``summarise_level``): requests/s = requests / wall time of the level, completion tokens/s, time to first token
and request latency median and p95 (linear interpolation, as in ``bench load``), failures, and ``speedup_vs_1``
(pure ``add_speedups``): the level's completion tokens/s over the lowest level's (concurrency 1 by default;
target ``TARGET_SPEEDUP`` at 16, as ``bench load`` asks of the client alone); the top level's is repeated at the
top of the JSON. Completion tokens/s includes every prompt's prefill (compute-bound at 16 prompts on CPU servers),
so each level also gives ``decode_tokens_per_s``: C x the median request's decode rate (tokens after the first over
the time from the first to the end), the figure ``bench load``'s aggregate decode tokens/s compares with, and its
``decode_speedup_vs_1``. One untimed warm-up request comes first. The gateway runs on the swarm client's own loop
(``ApiServer(..., loop=model.loop)``), as ``meshinfer api`` does. After the levels, each of ``EXTRAS`` (name,
function of an ``ApiBench``) adds its figures under ``extras[name]``: the place for further measurements; and
``--extras`` (default ``grammar,turns``) adds ``grammar`` (``bench.api_grammar``: ms per token with and without a
response_format JSON schema at the top concurrency, and their ratio) and ``turns`` (``bench.api_turns``: time to
first token of turn 5 of a chat with and without prompt-cache reuse, two fresh clients of the same swarm).
The levels' client threads run in a separate process (``bench.api_clients``), as real clients do (in the gateway's
process their per-token SSE parsing competed with its event loop for the interpreter); the extras' run in this one.
Every process started is stopped by PID (``LocalSwarm``) whatever happens. Imports torch and the network only inside
``run``; never asserts a timing."""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from meshinfer.bench.common import bench_model_dir, parse_counts, percentile
from meshinfer.errors import ConfigError

DESCRIPTION = "requests/s and time to first token of streaming chat requests through the OpenAI-compatible gateway"

REQUEST_TIMEOUT_S = 300.0
MODEL_NAME = "bench"
MAX_CONCURRENCY = 1024


def parse_levels(text: str) -> list[int]:
    """``"1,16"`` -> ``[1, 16]`` (ascending, duplicates dropped); ConfigError for anything else."""
    return parse_counts(text, "--concurrency", MAX_CONCURRENCY)


@dataclass(frozen=True)
class RequestSample:
    """One streamed request: seconds to the first text (or the end), seconds in all, tokens, error if any."""

    ttft_s: float
    total_s: float
    completion_tokens: int
    error: str | None = None


TARGET_SPEEDUP = 5.0
"""Completion tokens/s at 16 concurrent streams over one stream's, the target (``bench load``'s for the client)."""


def add_speedups(levels: dict[str, dict[str, Any]]) -> float | None:
    """Set ``speedup_vs_1`` on every level with figures: its completion tokens/s over the lowest concurrency's
    (None when that level has none); returns the top level's."""
    rated = {lv["concurrency"]: lv for lv in levels.values() if "completion_tokens_per_s" in lv}
    if not rated:
        return None
    base = rated[min(rated)]["completion_tokens_per_s"]
    decode_base = rated[min(rated)].get("decode_tokens_per_s")
    for level in rated.values():
        level["speedup_vs_1"] = level["completion_tokens_per_s"] / base if base > 0 else None
        decode = level.get("decode_tokens_per_s")
        level["decode_speedup_vs_1"] = decode / decode_base if decode and decode_base else None
    return rated[max(rated)]["speedup_vs_1"]


@dataclass(frozen=True)
class ApiBench:
    """What an extra measurement gets: the gateway's base URL (no ``/v1``), its model name, the client model
    (a ``DistributedModel``) and the parsed arguments."""

    url: str
    model_name: str
    model: Any
    args: argparse.Namespace


EXTRAS: list[tuple[str, Callable[[ApiBench], dict[str, Any]]]] = []
"""Measurements run after the levels, in order: ``(name, fn)``; ``fn``'s figures go under ``extras[name]``."""


def summarise_level(samples: Sequence[RequestSample], wall_s: float, concurrency: int) -> dict[str, Any]:
    """The figures of one concurrency level from its samples and its wall time."""
    ok = [s for s in samples if s.error is None]
    out: dict[str, Any] = {"concurrency": concurrency, "requests": len(samples), "failed": len(samples) - len(ok),
                           "wall_s": wall_s}
    if not ok:
        out["errors"] = sorted({str(s.error) for s in samples})[:3]
        return out
    ttft = [s.ttft_s * 1000 for s in ok]
    total = [s.total_s * 1000 for s in ok]
    tokens = sum(s.completion_tokens for s in ok)
    rates = [(s.completion_tokens - 1) / (s.total_s - s.ttft_s) for s in ok
             if s.completion_tokens > 1 and s.total_s > s.ttft_s]
    out.update({
        "requests_per_s": len(ok) / max(wall_s, 1e-9),
        "completion_tokens_per_s": tokens / max(wall_s, 1e-9),
        "decode_tokens_per_s": concurrency * statistics.median(rates) if rates else None,
        "mean_completion_tokens": tokens / len(ok),
        "time_to_first_token_ms": {"median": statistics.median(ttft), "p95": percentile(ttft, 0.95)},
        "latency_ms": {"median": statistics.median(total), "p95": percentile(total, 0.95)},
    })
    if len(ok) < len(samples):
        out["errors"] = sorted({str(s.error) for s in samples if s.error is not None})[:3]
    return out


EXTRA_NAMES = ("grammar", "turns")


def _extras(args: argparse.Namespace) -> frozenset[str]:
    """The extra measurements ``--extras`` asks for (ConfigError naming the flag for an unknown one)."""
    text = str(getattr(args, "extras", "none") or "none").strip()
    if text == "none":
        return frozenset()
    names = {n.strip() for n in text.split(",") if n.strip()}
    known = set(EXTRA_NAMES) | {name for name, _ in EXTRAS}
    if unknown := sorted(names - known):
        raise ConfigError(f"--extras: unknown measurement {', '.join(unknown)}; choose from {', '.join(sorted(known))} "
                          "or none")
    return frozenset(names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="checkpoint directory (default: the bench checkpoint, built on first use)")
    parser.add_argument("--servers", type=int, default=3, help="server processes splitting the blocks (default: 3)")
    parser.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                        help="use this running swarm instead of starting one (it must serve --model)")
    parser.add_argument("--concurrency", default="1,16", metavar="C1,C2",
                        help="concurrent client connections per level (default: 1,16)")
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per level, at least the level's concurrency (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default: 32)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (default: fp32)")
    parser.add_argument("--torch-threads", type=int, default=1, metavar="N",
                        help="compute threads of each server (default: 1)")
    parser.add_argument("--extras", default="grammar,turns", metavar="LIST",
                        help="measurements after the levels, comma-separated: grammar (ms per token with and without "
                             "a response_format JSON schema at the top concurrency, bench.api_grammar), turns (time to "
                             "first token of turn 5 of a chat with and without prompt-cache reuse, bench.api_turns); "
                             "none: skip them (default: grammar,turns)")


# ---- the client side --------------------------------------------------------------------------------


def stream_chat(url: str, body: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> RequestSample:
    """Send one streaming chat completion to the gateway at ``url`` and time it (errors are recorded)."""
    parts = urlsplit(url)
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return RequestSample(0.0, time.perf_counter() - start, 0, f"HTTP {resp.status}: {resp.read()[:200]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return RequestSample(0.0, time.perf_counter() - start, tokens, str(event["error"].get("message")))
            choices = event.get("choices") or []
            if first is None and choices and (choices[0]["delta"].get("content") or choices[0]["finish_reason"]):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    except (OSError, http.client.HTTPException, ValueError) as err:
        return RequestSample(0.0, time.perf_counter() - start, tokens, f"{type(err).__name__}: {err}")
    finally:
        conn.close()
    end = time.perf_counter()
    return RequestSample((first or end) - start, end - start, tokens)


def _bodies(n: int, max_tokens: int) -> list[dict[str, Any]]:
    from meshinfer.testing.tokenizer import corpus_text

    lines = [line.strip() for line in corpus_text().splitlines() if line.strip()] or ["Tell me a story."]
    return [{"model": MODEL_NAME, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
             "max_tokens": max_tokens,
             "messages": [{"role": "user", "content": f"What comes after this? {lines[i % len(lines)][:200]}"}]}
            for i in range(n)]


def run_level(url: str, concurrency: int, bodies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Send ``bodies`` through ``concurrency`` client threads of a separate process (``bench.api_clients``: real
    clients do not share the gateway's interpreter); the level's figures."""
    from meshinfer.bench.api_clients import run_clients

    wall_s, samples = run_clients(url, concurrency, bodies)
    return summarise_level(samples, wall_s, concurrency)


# ---- the whole benchmark ----------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> list[int]:
    levels = parse_levels(args.concurrency)
    _extras(args)
    if args.servers < 1 or args.torch_threads < 1 or args.max_tokens < 1:
        raise ConfigError("need --servers >= 1, --torch-threads >= 1 and --max-tokens >= 1")
    if args.requests < max(levels):
        raise ConfigError(f"--requests ({args.requests}) must be at least the largest --concurrency ({max(levels)})")
    return levels


def run(args: argparse.Namespace) -> dict[str, Any]:
    from meshinfer.types import canonical_dtype

    levels = _check(args)
    dtype = canonical_dtype(args.dtype)
    path = bench_model_dir(args.model)

    import contextlib

    from meshinfer.bench.swarm import even_spans
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel
    from meshinfer.gateway.app import create_app
    from meshinfer.gateway.generation import SwarmGenerator
    from meshinfer.gateway.serving import ApiServer
    from meshinfer.models.checkpoint import Checkpoint
    from meshinfer.testing.swarm import LocalSwarm

    spec = Checkpoint(path).spec
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        peers = list(args.initial_peers)
        spans: list[str] = []
        if not peers:
            ranges = even_spans(spec.num_blocks, args.servers)
            spans = [str(s) for s in ranges]
            print(f"starting a swarm of {args.servers} servers ({', '.join(spans)})...", file=sys.stderr, flush=True)
            swarm = stack.enter_context(LocalSwarm(path, ranges, dtype=dtype, torch_threads=args.torch_threads))
            peers = swarm.initial_peers
        swarm_s = time.perf_counter() - t0
        model = stack.enter_context(DistributedModel.from_pretrained(path, peers, dtype=dtype,
                                                                     config=ClientConfig()))
        server = stack.enter_context(ApiServer(create_app(SwarmGenerator(model), MODEL_NAME), "127.0.0.1", 0,
                                               loop=model.loop))
        bodies = _bodies(args.requests, args.max_tokens)
        warm = stream_chat(server.url, bodies[0])
        if warm.error is not None:
            raise ConfigError(f"the warm-up request through the gateway failed: {warm.error}")
        print(f"gateway at {server.url}; timing {args.requests} requests at concurrency "
              f"{', '.join(map(str, levels))}...", file=sys.stderr, flush=True)
        results: dict[str, Any] = {f"c{c}": run_level(server.url, c, bodies) for c in levels}
        speedup = add_speedups(results)
        bench = ApiBench(server.url, MODEL_NAME, model, args)
        wanted = _extras(args)
        extras = {name: measure(bench) for name, measure in EXTRAS if name in wanted}
        if "grammar" in wanted:
            from meshinfer.bench.api_grammar import grammar_overhead

            print("timing tokens with and without a JSON schema...", file=sys.stderr, flush=True)
            extras["grammar"] = grammar_overhead(server.url, concurrency=max(levels), requests=args.requests,
                                                 max_tokens=args.max_tokens)
        if "turns" in wanted:
            from meshinfer.bench.api_turns import run as run_turns

            print("timing a 5-turn chat with and without prompt-cache reuse...", file=sys.stderr, flush=True)
            extras["turns"] = run_turns(path, peers, dtype=dtype)
    return {
        "model": str(path),
        "params_millions": round(spec.param_count() / 1e6, 1),
        "dtype": dtype,
        "servers": spans or "existing swarm",
        "torch_threads_per_server": args.torch_threads,
        "requests_per_level": args.requests,
        "max_tokens": args.max_tokens,
        "swarm_ready_s": swarm_s,
        "speedup_vs_1": speedup,
        "decode_speedup_vs_1": results[f"c{max(levels)}"].get("decode_speedup_vs_1"),
        "target_speedup": TARGET_SPEEDUP,
        "levels": results,
        **({"extras": extras} if extras else {}),
    }
