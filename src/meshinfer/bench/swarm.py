"""``meshinfer bench swarm``: greedy decoding through a local swarm vs the local engine, same run, same threads.

Contract: starts a ``LocalSwarm`` (a bootstrap peer and ``--servers`` ``meshinfer serve`` processes on
127.0.0.1, the model's blocks split evenly, see ``even_spans``) of one checkpoint (default: the bench
checkpoint from ``meshinfer.testing``), joins it with a ``DistributedModel`` (push route) and loads
the same checkpoint as a ``LocalModel`` in this process. Fairness: each server gets
``--torch-threads`` compute threads and so does this process (which runs the client's embeddings and
LM head, and the whole local engine): a token's blocks run one server after the other, so the local
engine gets the threads that one token gets in the swarm. After one warm-up each, runs alternate
between the two; per run: time to first token (prefill + first sample; in the swarm it also opens
the session on every hop) and decode tokens/s = (N - 1) / (total - time to first token); figures are
medians. Reported: both engines' figures, swarm/local ratios (of the medians, of the best runs, and
the median of each swarm run over the local run right after it, the figure least disturbed by other
load on the machine, whose 1-minute load average is recorded), whether the greedy tokens are identical,
and the per-hop overhead in ms per token = (swarm ms/token - local ms/token) / hops (hops = servers;
each hop adds one transfer and one server turn). ``breakdown`` says where that gap goes
(``bench.swarm_parts``): the servers run with ``--metrics-port 0`` and their decode step times are read
before and after the timed runs, and so is the client's time per decode step from sending it to the last
server's output (``DistributedModel.decode_route_s_total``), so the split uses mean ms per token over
those runs; the local engine's blocks and head are timed apart afterwards, and so is what a pause as long
as a stage's wait costs one server's blocks. ``--private-blocks K`` also joins with a private split's client
(``bench.swarm_private``: K first and last blocks on the client, routes over the middle) and times it in the same
rounds (plain, local, private), reported side by side with the plain split under ``private_split``. Every process
started is stopped by PID whatever happens.
Imports torch and the network only inside ``run``; never asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterable
from typing import Any

from meshinfer.bench.common import swarm_bench_setup
from meshinfer.errors import ConfigError
from meshinfer.types import BlockRange

DESCRIPTION = "decode tokens/s and time to first token through a local swarm vs the local engine"

TARGET_RATIO = 0.95
"""What we aim for on the bench checkpoint over loopback: swarm decode tokens/s >= 95% of local."""


def even_spans(num_blocks: int, servers: int) -> list[BlockRange]:
    """``num_blocks`` split into ``servers`` consecutive spans, sizes differing by at most one
    (the larger ones first): 8 blocks over 3 servers -> 0:3, 3:6, 6:8."""
    if servers < 1:
        raise ConfigError(f"need at least one server, got {servers}")
    if servers > num_blocks:
        raise ConfigError(f"cannot split {num_blocks} blocks over {servers} servers (at most one server per block)")
    base, extra = divmod(num_blocks, servers)
    spans, start = [], 0
    for i in range(servers):
        end = start + base + (1 if i < extra else 0)
        spans.append(BlockRange(start, end))
        start = end
    return spans


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="checkpoint directory (default: the bench checkpoint, built on first use)")
    parser.add_argument("--servers", type=int, default=3, help="server processes splitting the blocks (default: 3)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per engine (default: 3)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (default: 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (default: fp32)")
    parser.add_argument("--torch-threads", type=int, default=1, metavar="N",
                        help="compute threads of each server and of the local engine (default: 1)")
    parser.add_argument("--no-push", action="store_true",
                        help="the client drives every hop itself instead of servers pushing to the next hop")
    parser.add_argument("--private-blocks", type=int, default=0, metavar="K",
                        help="also time a private split (the client runs the first and last K blocks) beside the "
                             "plain one, in the same rounds (default: 0, off)")


Sample = tuple[float, float, list[int]]
"""(time to first token s, total s, tokens) of one generation."""


def time_stream(tokens: Iterable[int]) -> Sample:
    """Consume a token stream, stamping the first token and the end."""
    out: list[int] = []
    start = time.perf_counter()
    first = start
    for token in tokens:
        if not out:
            first = time.perf_counter()
        out.append(int(token))
    return first - start, time.perf_counter() - start, out


def _decode_rate(sample: Sample, n: int) -> float:
    ttft, total, _ = sample
    return (n - 1) / max(total - ttft, 1e-9)


def summarise(samples: list[Sample], n: int) -> dict[str, Any]:
    """Median figures of several runs of ``n`` new tokens each (and the mean ms per decoded token)."""
    decode = [_decode_rate(s, n) for s in samples]
    return {
        "decode_ms_per_token_mean": 1000 * sum(s[1] - s[0] for s in samples) / ((n - 1) * len(samples)),
        "decode_tokens_per_s_runs": [round(d, 2) for d in decode],
        "decode_tokens_per_s": statistics.median(decode),
        "decode_tokens_per_s_best": max(decode),
        "decode_ms_per_token": 1000 / statistics.median(decode),
        "time_to_first_token_ms": statistics.median(s[0] for s in samples) * 1000,
        "total_ms": statistics.median(s[1] for s in samples) * 1000,
    }


def _check(args: argparse.Namespace) -> None:
    if args.runs < 1 or args.prompt_tokens < 1 or args.new_tokens < 2:
        raise ConfigError("need --runs >= 1, --prompt-tokens >= 1 and --new-tokens >= 2")
    if args.servers < 1:
        raise ConfigError(f"--servers must be >= 1, got {args.servers}")
    if args.torch_threads < 1:
        raise ConfigError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    if args.private_blocks < 0:
        raise ConfigError(f"--private-blocks must be >= 0 (0: off), got {args.private_blocks}")


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from meshinfer.bench.local import prompt_ids
    from meshinfer.bench.swarm_parts import breakdown, local_parts, pause_penalty, per_step_ms, server_decode_seconds
    from meshinfer.bench.swarm_private import compare, local_blocks_ms, open_private
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel
    from meshinfer.client.private_split import private_middle
    from meshinfer.testing.swarm import LocalSwarm

    _check(args)
    setup = swarm_bench_setup(args, args.prompt_tokens + args.new_tokens)
    path, dtype, local, load_before = setup.path, setup.dtype, setup.local, setup.load_before
    spec = local.spec
    spans = even_spans(spec.num_blocks, args.servers)
    if args.private_blocks:
        private_middle(args.private_blocks, spec.num_blocks)  # a ConfigError before any process starts
    prompt = prompt_ids(local.tokenizer, args.prompt_tokens)
    n = args.new_tokens

    _note(f"starting a swarm of {args.servers} servers ({', '.join(map(str, spans))}), "
          f"{args.torch_threads} torch thread(s) each...")
    t0 = time.perf_counter()
    with LocalSwarm(path, spans, dtype=dtype, torch_threads=args.torch_threads,
                    server_args=["--metrics-port", "0"]) as swarm:
        swarm_up_s = time.perf_counter() - t0
        remote = DistributedModel.from_pretrained(path, swarm.initial_peers, dtype=dtype,
                                                  config=ClientConfig(push=not args.no_push))
        private = None
        try:
            join_s = time.perf_counter() - t0 - swarm_up_s
            _note(f"swarm ready in {swarm_up_s:.1f} s; timing {args.runs} run(s) of {n} tokens each way...")
            time_stream(remote.stream(prompt, n, stop_token_ids=()))  # warm-up
            time_stream(local.stream(prompt, n, stop_token_ids=()))
            private_before = (0.0, 0)
            if args.private_blocks:
                private = open_private(path, swarm.initial_peers, dtype, args.private_blocks, not args.no_push)
                time_stream(private.stream(prompt, n, stop_token_ids=()))  # warm-up
                private_before = (private.decode_route_s_total, private.decode_steps_total)
            private_s: list[Sample] = []
            urls = [str(s.info.get("metrics_url")) for s in swarm.servers]
            before = [server_decode_seconds(url) for url in urls]
            route_before = (remote.decode_route_s_total, remote.decode_steps_total)
            swarm_s: list[Sample] = []
            local_s: list[Sample] = []
            for _ in range(args.runs):
                swarm_s.append(time_stream(remote.stream(prompt, n, stop_token_ids=())))
                local_s.append(time_stream(local.stream(prompt, n, stop_token_ids=())))
                if private is not None:
                    private_s.append(time_stream(private.stream(prompt, n, stop_token_ids=())))
            after = [server_decode_seconds(url) for url in urls]
            route_ms = per_step_ms(route_before, (remote.decode_route_s_total, remote.decode_steps_total))
            route = [f"{hop.span}" for hop in remote.last_route]
            private_split = None
            if private is not None:
                private_split = compare(
                    k=args.private_blocks, plain=summarise(swarm_s, n), private=summarise(private_s, n),
                    plain_route_ms=route_ms,
                    private_route_ms=per_step_ms(private_before,
                                                 (private.decode_route_s_total, private.decode_steps_total)),
                    local_blocks=local_blocks_ms(private), identical=all(s[2] == local_s[0][2] for s in private_s),
                    private_route=[f"{hop.span}" for hop in private.last_route],
                    weight_bytes=private.private.weight_bytes(),
                    cache_bytes=private.private.cache_bytes(args.prompt_tokens + n),
                    paired=[_decode_rate(p, n) / _decode_rate(s, n) for s, p in zip(swarm_s, private_s, strict=True)])
        finally:
            remote.close()
            if private is not None:
                private.close()
        servers = [{"blocks": str(s.span), "announced_tokens_per_s": s.info.get("throughput"),
                    "torch_threads": s.info.get("torch_threads")} for s in swarm.servers]

    paired = [_decode_rate(sw, n) / _decode_rate(lo, n) for sw, lo in zip(swarm_s, local_s, strict=True)]
    a, b = swarm_s[0][2], local_s[0][2]
    same_prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    mine, base = summarise(swarm_s, n), summarise(local_s, n)
    hops = len(route)
    _note("timing the local engine's parts and a stage's pause...")
    server_ms = [per_step_ms(b, a) for b, a in zip(before, after, strict=True)]
    parts = local_parts(local, prompt, n)
    wait_s = max(0.0, (mine["decode_ms_per_token"] - (sum(m or 0.0 for m in server_ms) / hops)) / 1000)
    pause = pause_penalty(local, spans[0], wait_s)
    split = (breakdown(swarm_ms=mine["decode_ms_per_token_mean"], local_ms=base["decode_ms_per_token_mean"],
                       route_ms=route_ms, server_ms=[m for m in server_ms if m is not None],
                       local_blocks_ms=parts["blocks_ms"], penalty_ms=pause["penalty_ms"])
             if route_ms is not None and all(m is not None for m in server_ms) else None)
    return {
        "model": str(path),
        "params_millions": round(spec.param_count() / 1e6, 1),
        "dtype": dtype,
        "torch_threads_per_process": args.torch_threads,
        "runs": args.runs,
        "prompt_tokens": len(prompt),
        "new_tokens": n,
        "push": not args.no_push,
        "route": route,
        "hops": hops,
        "swarm": mine,
        "local": base,
        "ratio_swarm_over_local": {
            "decode_tokens_per_s": mine["decode_tokens_per_s"] / base["decode_tokens_per_s"],
            "decode_tokens_per_s_best": mine["decode_tokens_per_s_best"] / base["decode_tokens_per_s_best"],
            "decode_paired_median": statistics.median(paired),
            "time_to_first_token": mine["time_to_first_token_ms"] / base["time_to_first_token_ms"],
        },
        "target_decode_ratio": TARGET_RATIO,
        "per_hop_overhead_ms_per_token": (mine["decode_ms_per_token"] - base["decode_ms_per_token"]) / hops,
        "breakdown": split,
        **({"private_split": private_split} if private_split is not None else {}),
        "local_parts": parts,
        "stage_pause": {"blocks": str(spans[0]), **pause},
        "greedy_tokens_identical": all(s[2] == b for s in swarm_s + local_s),
        "greedy_tokens_matching_prefix": same_prefix,
        "startup": {"swarm_ready_s": swarm_up_s, "client_join_s": join_s},
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "servers": servers,
        "versions": {"torch": torch.__version__},
    }
