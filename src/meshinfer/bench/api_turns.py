"""Time to first token of a chat's later turns, with and without prompt-cache reuse (``client.prefix_cache``).

Contract: ``conversation(vocab, ...)`` (pure) builds a deterministic token-level chat: a system prompt of
``system_tokens`` ids and per turn a user message of ``user_tokens`` ids (seeded, ids in [10, vocab)); turn k's prompt
is everything so far (previous prompts, the previous answers, the new user message), as a chat template renders a
conversation, so reuse finds its prefix. ``time_turns(model, ...)`` plays it through one ``DistributedModel``
(greedy, ``answer_tokens`` new tokens per turn, no stop ids) and stamps each turn's time to first token (from the
call to the first token reaching the calling thread). ``run(path, peers, ...)`` does so with two clients of the same
swarm: one with ``prompt_cache_sessions`` (reuse), one with 0; both see the same answers (greedy), so the prompts
match; it reports per-turn TTFTs, the last turn's of each and their ratio (off / on), and the reusing client's
cache counters. ``main`` (``python -m meshinfer.bench.api_turns``) starts a ``LocalSwarm`` of the bench checkpoint
(``--servers`` processes, ``bench.swarm.even_spans``) unless ``--initial-peers`` are given, stops what it started by
PID, and prints JSON. Imports torch and the network only inside ``run``/``main``; never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshinfer.client.model import DistributedModel

DESCRIPTION = "time to first token of turn N of a chat, with and without prompt-cache reuse"


def conversation(vocab: int, *, turns: int = 5, system_tokens: int = 300, user_tokens: int = 24,
                 seed: int = 0) -> tuple[list[int], list[list[int]]]:
    """The system prompt's ids and each turn's user message (deterministic for ``seed``)."""
    rng = random.Random(seed)
    system = [rng.randrange(10, vocab) for _ in range(system_tokens)]
    return system, [[rng.randrange(10, vocab) for _ in range(user_tokens)] for _ in range(turns)]


def time_turns(model: DistributedModel, system: list[int], users: Sequence[list[int]],
               answer_tokens: int) -> tuple[list[float], list[list[int]]]:
    """Each turn's time to first token (seconds) and answer, one conversation through ``model``."""
    history = list(system)
    ttfts: list[float] = []
    answers: list[list[int]] = []
    for user in users:
        prompt = history + user
        started = time.perf_counter()
        answer: list[int] = []
        for token in model.stream(prompt, answer_tokens, stop_token_ids=()):
            if not answer:
                ttfts.append(time.perf_counter() - started)
            answer.append(token)
        answers.append(answer)
        history = prompt + answer
    return ttfts, answers


def run(path: Path, peers: Sequence[str], *, turns: int = 5, system_tokens: int = 300, user_tokens: int = 24,
        answer_tokens: int = 16, sessions: int = 8, dtype: str = "float32",
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Play the conversation with reuse off, then on (fresh clients of the swarm of ``peers``); see the module
    docstring. ``overrides``: further ``ClientConfig`` fields of both clients."""
    from meshinfer.client.model import DistributedModel

    extra = dict(overrides or {})
    result: dict[str, Any] = {"turns": turns, "system_tokens": system_tokens, "user_tokens": user_tokens,
                              "answer_tokens": answer_tokens}
    answers: dict[int, list[list[int]]] = {}
    for cached in (0, sessions):
        with DistributedModel.from_pretrained(path, peers, dtype=dtype, prompt_cache_sessions=cached,
                                              **extra) as model:
            system, users = conversation(model.spec.vocab_size, turns=turns, system_tokens=system_tokens,
                                         user_tokens=user_tokens)
            time_turns(model, [11, 12, 13], [[14, 15]], 2)  # untimed warm-up: routes measured, code paths hot
            ttfts, answers[cached] = time_turns(model, system, users, answer_tokens)
            key = "reuse" if cached else "no_reuse"
            result[f"{key}_ttft_s"] = [round(t, 4) for t in ttfts]
            if cached:
                stats = model.prompt_cache.stats
                result["cache"] = {"hits": stats.hits, "misses": stats.misses, "tokens_reused": stats.tokens_reused,
                                   "fallbacks": stats.fallbacks}
    on, off = result["reuse_ttft_s"][-1], result["no_reuse_ttft_s"][-1]
    result[f"turn{turns}_ttft_reuse_s"] = on
    result[f"turn{turns}_ttft_no_reuse_s"] = off
    result["speedup"] = round(off / on, 2) if on > 0 else None
    result["same_answers"] = answers[0] == answers[sessions]
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="REF",
                        help="checkpoint directory, .gguf file or catalogue name (default: the bench checkpoint)")
    parser.add_argument("--quant", default=None, help="servers' and client's weight mode: none, int8, int4")
    parser.add_argument("--servers", type=int, default=3, help="server processes splitting the blocks (default: 3)")
    parser.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                        help="an existing swarm serving --model (default: start one)")
    parser.add_argument("--turns", type=int, default=5, help="turns of the conversation (default: 5)")
    parser.add_argument("--system-tokens", type=int, default=300, help="system prompt length (default: 300)")
    parser.add_argument("--user-tokens", type=int, default=24, help="tokens of each user message (default: 24)")
    parser.add_argument("--answer-tokens", type=int, default=16, help="tokens of each answer (default: 16)")
    parser.add_argument("--torch-threads", type=int, default=1, metavar="N", help="torch threads per server")
    parser.add_argument("--no-audit", action="store_true", help="clients without audits")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshinfer.bench.api_turns", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    import contextlib

    from meshinfer.bench.common import bench_model_dir
    from meshinfer.bench.swarm import even_spans
    from meshinfer.models.checkpoint import Checkpoint
    from meshinfer.testing.swarm import LocalSwarm
    from meshinfer.weights.resolve import local_checkpoint

    path = local_checkpoint(args.model) if args.model else None
    path = path if path is not None else bench_model_dir(args.model)
    overrides: dict[str, Any] = {"audit": False} if args.no_audit else {}
    server_args: list[str] = []
    if args.quant:
        overrides["quant"] = args.quant
        server_args = ["--quant", args.quant]
    with contextlib.ExitStack() as stack:
        peers = list(args.initial_peers)
        if not peers:
            ranges = even_spans(Checkpoint(path).spec.num_blocks, args.servers)
            print(f"starting a swarm of {args.servers} servers...", file=sys.stderr, flush=True)
            peers = stack.enter_context(LocalSwarm(path, ranges, torch_threads=args.torch_threads,
                                                   server_args=server_args, startup_timeout=180)).initial_peers
        result = run(path, peers, turns=args.turns, system_tokens=args.system_tokens, user_tokens=args.user_tokens,
                     answer_tokens=args.answer_tokens, overrides=overrides)
    result["model"] = str(path)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
