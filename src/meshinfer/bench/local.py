"""``meshinfer bench local``: our engine vs Hugging Face ``generate()`` on one machine, batch 1.

Contract: loads one checkpoint (default: the bench checkpoint from ``meshinfer.testing``) twice, as
our ``LocalModel`` and as ``transformers.AutoModelForCausalLM``, in the same process with the same
torch threads and dtype, and times a greedy generation of exactly ``--new-tokens`` tokens after a
``--prompt-tokens`` prompt (eos disabled on both sides). Per run: time to first token (prefill +
first sample), then decode tokens/s = (N - 1) / (total - time to first token). One warm-up run
each, then runs alternate between the two engines; figures are medians. Also reports whether both
produced the same greedy tokens. Imports torch and transformers only inside ``run``; never asserts
a timing (that is for humans reading the table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from meshinfer.errors import ConfigError

DESCRIPTION = "tokens/s of our local engine vs transformers generate() (batch 1, greedy)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="checkpoint directory (default: the bench checkpoint, built on first use)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per engine (default: 5)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (default: 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (default: fp32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for both engines (default: torch's choice)")


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """``n`` token ids of plain English (the shipped corpus, repeated if needed)."""
    from meshinfer.testing.tokenizer import corpus_text

    ids = [int(i) for i in tokenizer(corpus_text())["input_ids"]]
    while len(ids) < n:
        ids += ids
    return ids[:n]


def _time_ours(model: Any, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """(time to first token, total time, tokens) for one greedy generation with our engine."""
    tokens: list[int] = []
    start = time.perf_counter()
    first = start
    for token in model.stream(prompt, n, stop_token_ids=()):
        if not tokens:
            first = time.perf_counter()
        tokens.append(int(token))
    return first - start, time.perf_counter() - start, tokens


def _time_hf(model: Any, prompt: list[int], n: int, pad_id: int) -> tuple[float, float, list[int]]:
    """The same for ``transformers`` ``generate()``; a streamer stamps the first new token."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.first: float | None = None

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt, call 2 the first token
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    ids = torch.tensor([prompt])  # [1, T]
    streamer = FirstToken()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=pad_id, streamer=streamer)
    total = time.perf_counter() - start
    first = (streamer.first or start + total) - start
    return first, total, [int(t) for t in out[0, len(prompt):]]


def _summary(samples: list[tuple[float, float, list[int]]], prompt_len: int, n: int) -> dict[str, Any]:
    ttft = statistics.median(s[0] for s in samples)
    total = statistics.median(s[1] for s in samples)
    decode = statistics.median((n - 1) / max(s[1] - s[0], 1e-9) for s in samples) if n > 1 else 0.0
    per_run = [round((n - 1) / max(s[1] - s[0], 1e-9), 2) for s in samples] if n > 1 else []
    best_decode = max(per_run, default=0.0)
    return {
        "prefill_tokens_per_s": statistics.median(prompt_len / max(s[0], 1e-9) for s in samples),
        "decode_tokens_per_s": decode,
        "decode_tokens_per_s_best": best_decode,
        "decode_tokens_per_s_runs": per_run,  # to judge noise on a shared machine
        "time_to_first_token_ms": ttft * 1000,
        "total_ms": total * 1000,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from meshinfer.types import canonical_dtype

    if args.runs < 1 or args.prompt_tokens < 1 or args.new_tokens < 2:
        raise ConfigError("need --runs >= 1, --prompt-tokens >= 1 and --new-tokens >= 2")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    dtype = canonical_dtype(args.dtype)
    if args.model is None:
        from meshinfer.testing.checkpoints import bench_checkpoint

        print("preparing the bench checkpoint (built once, then cached)...", file=sys.stderr, flush=True)
        path = bench_checkpoint()
    else:
        path = Path(args.model)
        if not path.is_dir():
            raise ConfigError(f"model directory {args.model!r} does not exist")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from meshinfer.models.engine import LocalModel

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ours = LocalModel.from_pretrained(path, dtype=dtype)
    if ours.spec.max_position_embeddings < args.prompt_tokens + args.new_tokens:
        raise ConfigError(f"--prompt-tokens + --new-tokens exceeds the model's context of "
                          f"{ours.spec.max_position_embeddings}")
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype" if major >= 5 else "torch_dtype": getattr(torch, dtype)}
    hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **dtype_kw).eval()
    prompt = prompt_ids(ours.tokenizer, args.prompt_tokens)
    pad_id = ours.tokenizer.pad_token_id if ours.tokenizer.pad_token_id is not None else 0
    n = args.new_tokens

    _time_ours(ours, prompt, n)  # warm-up
    _time_hf(hf, prompt, n, pad_id)
    ours_s: list[tuple[float, float, list[int]]] = []
    hf_s: list[tuple[float, float, list[int]]] = []
    for _ in range(args.runs):
        ours_s.append(_time_ours(ours, prompt, n))
        hf_s.append(_time_hf(hf, prompt, n, pad_id))

    a, b = ours_s[0][2], hf_s[0][2]
    same_prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    mine, theirs = _summary(ours_s, len(prompt), n), _summary(hf_s, len(prompt), n)
    return {
        "model": str(path),
        "params_millions": round(ours.spec.param_count() / 1e6, 1),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "runs": args.runs,
        "prompt_tokens": len(prompt),
        "new_tokens": n,
        "meshinfer": mine,
        "transformers": theirs,
        "ratio_ours_over_hf": {
            "prefill": mine["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"],
            "decode": mine["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
        },
        "greedy_tokens_identical": a == b,
        "greedy_tokens_matching_prefix": same_prefix,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
