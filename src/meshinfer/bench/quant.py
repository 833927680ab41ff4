"""``meshinfer bench quant``: what int8 and int4 weights cost and buy on a real model, side by side in one run.

Contract: loads one model (default: the catalogue's SmolLM2-135M-Instruct, from its GGUF) once per VARIANT
(``VARIANTS``: blocks' mode and group, head's mode): ``none`` (the weights as loaded, fp32), ``int8`` (per output
channel, int8 head), ``int4`` (the default int4: groups of 32, and a GGUF's own Q4_0/Q4_1 blocks taken as they are;
int8 head), ``int4-g64`` (groups of 64 quantized from the fp32 weights: fewer bytes) and ``int4-head4`` (``int4``
with an int4 head: the fastest). For each variant it reports:

- memory: bytes of the blocks' weights (total and per block), of the client head, and the blocks' bytes over
  the same weights in bf16 (``int4`` target: <= 0.3);
- perplexity on a fixed public-domain text shipped in the repo (``bench/data/public_domain.txt``: the Declaration
  of Independence and two Lincoln addresses, ~2,900 tokens), scored in one pass (``LocalModel.score_prompt``),
  relative to ``none`` (targets: int8 within 1%, int4 within 10%);
- greedy agreement with ``none`` over ``--new-tokens`` tokens on a fixed set of prompts (chat and plain): the
  identical prefix (mean over prompts, in tokens) and the teacher-forced agreement (the share of positions
  where the variant's top token equals ``none``'s token, fed ``none``'s own continuation);
- decode tokens/s of the local engine with ``--threads`` threads, medians of ``--runs`` runs after a warm-up,
  the variants interleaved run by run so machine noise hits them alike (``--compile``: also with compiled
  decode steps, ``models.compiled``);
- with ``--swarm``: decode tokens/s through a local swarm of ``--servers`` processes holding the variant's
  weights (one thread each) against the local engine with one thread, alternating, and their ratio (int4
  target: >= 0.85).

``--llama-bench PATH`` also runs llama.cpp's ``llama-bench`` (tg ``--new-tokens``, ``--threads`` threads) on the
model's GGUF file in the same run, as the outside yardstick. Prints a table, writes JSON. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meshinfer.errors import ConfigError

DESCRIPTION = "memory, perplexity, greedy agreement and decode speed of none/int8/int4 weights on a real model"
TEXT = Path(__file__).parent / "data" / "public_domain.txt"
PROMPTS: tuple[tuple[str, bool], ...] = (
    ("What is the capital of France, and what is it known for?", True),
    ("Write a short poem about the sea.", True),
    ("Explain in two sentences why the sky is blue.", True),
    ("The history of the printing press begins", False),
    ("def fibonacci(n):\n", False),
)
"""(text, rendered through the chat template) pairs for the greedy agreement."""
TARGETS = {"int8_perplexity_ratio_max": 1.01, "int4_perplexity_ratio_max": 1.10, "int4_bytes_over_bf16_max": 0.30,
           "int4_swarm_over_local_min": 0.85, "fp32_decode_tokens_per_s_min": 45.0, "int4_decode_tokens_per_s_min": 80}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", metavar="MODEL",
                        help="the model (default: smollm2): a catalogue name, a .gguf file or a checkpoint directory")
    parser.add_argument("--variants", default=None, metavar="LIST",
                        help=f"comma-separated, of {','.join(VARIANTS)} (default: all)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per generation (default: 64)")
    parser.add_argument("--runs", type=int, default=3, help="timed decode runs per variant (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the local engine (default: 2)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each variant's local engine with compiled decode steps (models.compiled)")
    parser.add_argument("--swarm", action="store_true", help="also time decoding through a local swarm")
    parser.add_argument("--servers", type=int, default=3, help="with --swarm: server processes (default: 3)")
    parser.add_argument("--llama-bench", default=None, metavar="PATH",
                        help="llama.cpp's llama-bench binary: also time llama.cpp on the model's GGUF")


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


VARIANTS: dict[str, tuple[str, int | None, str]] = {
    "none": ("none", None, "none"), "int8": ("int8", None, "int8"), "int4": ("int4", None, "int8"),
    "int4-g64": ("int4", 64, "int8"), "int4-head4": ("int4", None, "int4"),
}
"""name -> (blocks' quant mode, int4 group size (None: the default), head's quant mode)."""


def _variants(args: argparse.Namespace) -> list[str]:
    if args.variants is None:
        return list(VARIANTS)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in chosen if v not in VARIANTS]
    if bad or not chosen:
        raise ConfigError(f"--variants takes {', '.join(VARIANTS)}; got {args.variants!r}")
    return (["none"] if "none" not in chosen else []) + chosen  # none is every comparison's reference


def _load(path: Path, variant: str, compile: bool = False) -> Any:
    from meshinfer.models.engine import LocalModel

    quant, group, head = VARIANTS[variant]
    return LocalModel.from_pretrained(path, dtype="float32", quant=quant, quant_group_size=group, head_quant=head,
                                      compile=compile)


def _memory(model: Any) -> dict[str, Any]:
    from meshinfer.models.quant import weight_bytes

    spec = model.spec
    blocks, head = weight_bytes(model.span), weight_bytes(model.head)
    bf16 = 2 * spec.num_blocks * spec.block_param_count()
    return {"blocks_bytes": blocks, "per_block_bytes": blocks // spec.num_blocks, "head_bytes": head,
            "total_bytes": blocks + head, "blocks_over_bf16": blocks / bf16}


def _prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        return [int(i) for i in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    return [int(i) for i in tokenizer(text)["input_ids"]]


def _perplexity(model: Any, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ``ids``, scored in windows as long as the model's context
    (one window for SmolLM2: 8192 positions); a window's first token has no context and is not scored."""
    window = max(2, min(model.spec.max_position_embeddings, 8192))
    logprobs = [s.logprob for a in range(0, len(ids) - 1, window) for s in model.score_prompt(ids[a:a + window])]
    return math.exp(-sum(logprobs) / len(logprobs))


def _agreement(model: Any, prompts: list[list[int]], reference: list[list[int]], n: int) -> dict[str, float]:
    prefix, forced = [], []
    for ids, ref in zip(prompts, reference, strict=True):
        mine = model.generate(ids, n, stop_token_ids=())
        prefix.append(next((i for i, (a, b) in enumerate(zip(mine, ref, strict=False)) if a != b), len(ref)))
        scored = model.score_prompt(ids + ref, top_logprobs=1)[len(ids) - 1:]  # predictions of ref's tokens
        forced.append(sum(1 for s, t in zip(scored, ref, strict=True) if s.top and s.top[0][0] == t) / len(ref))
    return {"identical_prefix_tokens_mean": statistics.mean(prefix), "identical_prefix_tokens_min": min(prefix),
            "teacher_forced_agreement": statistics.mean(forced)}


def _decode_rate(model: Any, ids: list[int], n: int) -> float:
    first = time.perf_counter()
    count = 0
    for _ in model.stream(ids, n, stop_token_ids=()):
        count += 1
        if count == 1:
            first = time.perf_counter()
    return (count - 1) / max(time.perf_counter() - first, 1e-9) if count > 1 else 0.0


def _llama_bench(binary: str, gguf: Path, threads: int, n: int) -> dict[str, Any]:
    cmd = [binary, "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(n), "-r", "3", "-o", "json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
        rows = json.loads(out)
        return {"model_type": rows[0].get("model_type"), "decode_tokens_per_s": rows[0].get("avg_ts"),
                "threads": threads, "build": rows[0].get("build_commit")}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, KeyError) as err:
        return {"error": str(err)[:300]}


def _swarm_ratio(path: Path, variant: str, args: argparse.Namespace, ids: list[int]) -> dict[str, Any]:
    import torch

    from meshinfer.bench.swarm import even_spans
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel
    from meshinfer.testing.swarm import LocalSwarm

    torch.set_num_threads(1)
    local = _load(path, variant)
    quant, group, head = VARIANTS[variant]
    server_args = ["--quant", quant] + (["--quant-group-size", str(group)] if group else [])
    spans = even_spans(local.spec.num_blocks, args.servers)
    with LocalSwarm(path, spans, torch_threads=1, server_args=server_args) as swarm:
        remote = DistributedModel.from_pretrained(path, swarm.initial_peers,
                                                  config=ClientConfig(quant=quant, head_quant=head))
        try:
            remote.generate(ids, args.new_tokens, stop_token_ids=())  # warm-up
            local.generate(ids, args.new_tokens, stop_token_ids=())
            pairs = [(_decode_rate(remote, ids, args.new_tokens), _decode_rate(local, ids, args.new_tokens))
                     for _ in range(args.runs)]
            same = remote.generate(ids, args.new_tokens, stop_token_ids=()) == local.generate(
                ids, args.new_tokens, stop_token_ids=())
        finally:
            remote.close()
    torch.set_num_threads(args.threads)
    swarm_rate, local_rate = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    return {"servers": [str(s) for s in spans], "swarm_decode_tokens_per_s": swarm_rate,
            "local_1thread_decode_tokens_per_s": local_rate, "swarm_over_local": swarm_rate / local_rate,
            "paired_median": statistics.median(a / b for a, b in pairs), "greedy_identical_to_local": same}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.new_tokens < 2 or args.runs < 1 or args.threads < 1 or args.servers < 1:
        raise ConfigError("need --new-tokens >= 2, --runs >= 1, --threads >= 1 and --servers >= 1")
    from meshinfer.weights.resolve import display_name, local_checkpoint

    path = local_checkpoint(args.model)
    if path is None:
        raise ConfigError(f"bench quant needs a model on this machine (a directory, a .gguf file or a catalogue "
                          f"name), not {args.model!r}")
    name = display_name(args.model, path)
    import torch

    from meshinfer.models.checkpoint import Checkpoint

    torch.set_num_threads(args.threads)
    ckpt = Checkpoint(path)
    q4 = ckpt.has_gguf_q4
    variants = _variants(args)
    _note(f"bench quant on {name}: {', '.join(variants)}")
    models: dict[str, Any] = {}
    for v in variants:
        t0 = time.perf_counter()
        models[v] = _load(path, v)
        _note(f"  loaded {v} in {time.perf_counter() - t0:.1f} s")
    tok = models["none"].tokenizer
    text_ids = [int(i) for i in tok(TEXT.read_text(encoding="utf-8"))["input_ids"]]
    prompts = [_prompt_ids(tok, text, chat) for text, chat in PROMPTS]
    n = args.new_tokens
    reference = [models["none"].generate(ids, n, stop_token_ids=()) for ids in prompts]
    results: dict[str, Any] = {v: {"memory": _memory(m)} for v, m in models.items()}
    for v, m in models.items():
        _note(f"  scoring {v}: perplexity over {len(text_ids)} tokens, agreement over {len(prompts)} prompts")
        results[v]["perplexity"] = _perplexity(m, text_ids)
        results[v]["agreement_with_none"] = _agreement(m, prompts, reference, n)
    timed = dict(models)
    if args.compile:
        for v in variants:
            _note(f"  compiling {v}'s decode step (the first time per model takes tens of seconds)...")
            timed[v + " compiled"] = _load(path, v, compile=True)
    rates: dict[str, list[float]] = {v: [] for v in timed}
    for m in timed.values():
        _decode_rate(m, prompts[0], n)  # warm-up (and compile)
    for _ in range(args.runs):
        for v, m in timed.items():
            rates[v].append(_decode_rate(m, prompts[0], n))
    base_ppl = results["none"]["perplexity"]
    for v in models:
        results[v]["perplexity_over_none"] = results[v]["perplexity"] / base_ppl
        results[v]["decode_tokens_per_s"] = statistics.median(rates[v])
        results[v]["decode_tokens_per_s_runs"] = [round(r, 2) for r in rates[v]]
        if args.compile:
            results[v]["compiled_decode_tokens_per_s"] = statistics.median(rates[v + " compiled"])
            results[v]["compiled_decode_tokens_per_s_runs"] = [round(r, 2) for r in rates[v + " compiled"]]
    if args.swarm:
        for v in variants:
            _note(f"  timing {v} through a swarm of {args.servers} servers...")
            results[v]["swarm"] = _swarm_ratio(path, v, args, prompts[0])
    out: dict[str, Any] = {"model": name, "model_dir": str(path),
                           "text_tokens": len(text_ids), "new_tokens": n, "threads": args.threads,
                           "runs": args.runs, "variants": results, "targets": TARGETS,
                           "int4_blocks_from": "the GGUF's Q4 blocks as they are" if q4 else "the float weights",
                           "load_average_1min": os.getloadavg()[0], "versions": {"torch": torch.__version__}}
    gguf = path / "model.gguf"
    if args.llama_bench and gguf.exists():
        _note("  timing llama.cpp (llama-bench) on the same GGUF...")
        out["llama_cpp"] = _llama_bench(args.llama_bench, gguf.resolve(), args.threads, n)
    return out
