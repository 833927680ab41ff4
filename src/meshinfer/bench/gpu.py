"""``meshinfer bench gpu``: decode speed of a Llama-3-8B-shaped random model on a device, against the HBM roofline.

Contract: builds, in memory on ``--device`` (no checkpoint on disk), a model of ``--shape`` (``llama3-8b``:
hidden 4096, 32 blocks, 32 heads, 8 KV heads, head_dim 128, intermediate 14336, vocab 128256, rope theta 500000;
``tiny``: a small one for smoke runs) with ``--layers`` blocks: a ``ModelSpec`` from an HF-style config dict, then
block by block ``TransformerBlock``s whose matrices are drawn from N(0, 0.02) (norm weights 1) directly on the
device, and a ``ClientHead`` likewise (untied embeddings). Per ``--formats`` entry: ``bf16`` (weights as built) or
``int4`` (each block quantized by ``models.quant.quantize_block`` as soon as it is built, groups of 32, and an
int8 LM head, as ``LocalModel`` holds an int4 model). Per ``--batches`` entry: batch 1 is one session's decode
step as the local engine runs it (embed, ``BlockSpan.forward`` of one token, LM head, greedy token back to the
host); batch N is N sessions, each with its own batch-1 cache, run by one ``BlockSpan.forward_batch`` per step as
the server's scheduler runs them (projections and MLP once for all N rows, attention per session). Per mode:
``eager``, ``graphed`` (``models.cuda_graphs``, CUDA only, batch 1 only), ``fused`` (``graphed`` of the
torch.compiled block step, ``GraphedDecode(fuse=True)``: one block compiled, then captured; CUDA and batch 1 only;
not in the default: the compile takes a minute or more), ``tuned`` (``fused`` compiled with inductor's coordinate
descent tuning, ``GraphedDecode(tune=True)``: one-row matmuls become tuned Triton reductions) and
``compiled`` (``models.compiled``, batch 1 only;
never by default: minutes of compiling a whole big model). Every cache is first filled with a
``--context``-token prefill of random hidden states.

Timing: ``--warmup`` steps, then ``--steps`` steps, each between two ``synchronize`` calls; figures are medians.
Reported per config: tokens/s, ms/step, bytes of weights read per step (the blocks and the LM head as held; the
embedding reads one row per token and is not counted), KV bytes read per step (eager attention reads the filled
slots, a graphed step the whole capacity), achieved bandwidth = bytes per step / time per step, and the roofline
fraction = achieved / peak bandwidth (``models.device.peak_bandwidth`` of the device's name, or
``--peak-bandwidth`` GB/s; null when unknown, as on a CPU). The target printed is batch 1 bf16 >= 70% of the
roofline (best mode). A format the device cannot hold (a ConfigError from the quantizer, an out-of-memory) is
reported as an error string, not raised. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from meshinfer.bench.common import parse_counts
from meshinfer.devices import DEVICE_HELP
from meshinfer.errors import ConfigError

DESCRIPTION = "decode tokens/s and HBM-roofline fraction of a random Llama-3-8B-shaped model on a device"
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                  "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
             "intermediate_size": 768, "vocab_size": 1024, "rope_theta": 500000.0},
}
FORMATS = ("bf16", "int4")
MODES = ("eager", "graphed", "fused", "tuned", "compiled")
TARGET_BATCH1_BF16_ROOFLINE = 0.70


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="model shape (default: llama3-8b)")
    parser.add_argument("--layers", type=int, default=32, help="transformer blocks (default: 32; fewer: a smoke run)")
    parser.add_argument("--formats", default="bf16,int4", help="comma-separated, of bf16,int4 (default: both)")
    parser.add_argument("--batches", default="1,32", help="comma-separated sessions per step (default: 1,32)")
    parser.add_argument("--modes", default="auto",
                        help="comma-separated, of eager,graphed,fused,tuned,compiled "
                             "(default: eager, and graphed on CUDA)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per config (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--context", type=int, default=256, help="tokens in each cache before timing (default: 256)")
    parser.add_argument("--peak-bandwidth", type=float, default=None, metavar="GB/s",
                        help="the device's peak memory bandwidth (default: known GPUs by name; unknown: no fraction)")
    parser.add_argument("--seed", type=int, default=0, help="random weights' seed (default: 0)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line on stdout")


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ConfigError(f"{flag}: {','.join(bad) or 'nothing'} is not one of {','.join(allowed)}")
    return items


def config_dict(shape: str, layers: int) -> dict[str, Any]:
    """The HF-style config.json dict of ``shape`` with ``layers`` blocks."""
    if layers < 1:
        raise ConfigError(f"--layers must be >= 1, got {layers}")
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from meshinfer.models.device import device_label, peak_bandwidth, resolve_device
    from meshinfer.models.spec import ModelSpec

    device = resolve_device(args.device)
    formats = _choices(args.formats, FORMATS, "--formats")
    batches = parse_counts(args.batches, "--batches", 256)
    modes = (["eager", "graphed"] if device.type == "cuda" else ["eager"]) if args.modes == "auto" \
        else _choices(args.modes, MODES, "--modes")
    if args.steps < 1 or args.warmup < 0 or args.context < 1:
        raise ConfigError("--steps and --context must be >= 1 and --warmup >= 0")
    spec = ModelSpec.from_config(config_dict(args.shape, args.layers))
    label = device_label(device)
    peak = args.peak_bandwidth * 1e9 if args.peak_bandwidth else peak_bandwidth(label)
    out: dict[str, Any] = {
        "device": str(device), "device_label": label, "torch": torch.__version__, "shape": args.shape,
        "layers": args.layers, "context": args.context, "steps": args.steps, "warmup": args.warmup,
        "peak_bandwidth_gbs": None if peak is None else peak / 1e9, "batch_n": "one forward_batch of N batch-1 caches",
        "configs": {},
    }
    for fmt in formats:
        from meshinfer.bench.gpu_model import build, release

        _note(f"building {args.shape} x {args.layers} blocks, {fmt}, on {device}...")
        start = time.perf_counter()
        try:
            head, span = build(spec, fmt, device, args.seed)
        except Exception as err:  # the quantizer refusing this device, or out of memory: report, go on
            out["configs"][fmt] = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
            _note(f"  {fmt}: {out['configs'][fmt]['error']}")
            release(device)
            continue
        out[f"build_s.{fmt}"] = round(time.perf_counter() - start, 2)
        for batch in batches:
            for mode in modes:
                key = f"{fmt}.b{batch}.{mode}"
                try:
                    figures = _measure(head, span, spec, batch, mode, args)
                except Exception as err:
                    figures = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
                if "error" not in figures:
                    figures |= _bandwidth(figures, peak)
                out["configs"][key] = figures
                _note(f"  {key}: {figures}")
                release(device)
        del head, span
        release(device)
    out["target"] = _target(out["configs"], peak)
    if args.json:
        print(json.dumps(out), flush=True)
    return out


def _bandwidth(figures: dict[str, Any], peak: float | None) -> dict[str, Any]:
    per_step = figures["weight_bytes"] + figures["kv_bytes_per_step"]
    achieved = per_step / (figures["ms_per_step"] / 1e3)
    return {"bytes_per_step": per_step, "achieved_gbs": round(achieved / 1e9, 2),
            "roofline_fraction": None if peak is None else round(achieved / peak, 4)}


def _target(configs: dict[str, dict[str, Any]], peak: float | None) -> dict[str, Any]:
    fractions = [c["roofline_fraction"] for k, c in configs.items()
                 if k.startswith("bf16.b1.") and c.get("roofline_fraction") is not None]
    best = max(fractions) if fractions else None
    return {"batch1_bf16_roofline_min": TARGET_BATCH1_BF16_ROOFLINE, "batch1_bf16_roofline_best": best,
            "met": None if best is None or peak is None else best >= TARGET_BATCH1_BF16_ROOFLINE}


def _measure(head: Any, span: Any, spec: Any, batch: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.steps`` decode steps of ``batch`` sessions in ``mode``; figures without the bandwidth ones."""
    import torch

    from meshinfer.bench.gpu_model import weights_read
    from meshinfer.models.compiled import CompiledDecode, capacity
    from meshinfer.models.cuda_graphs import GraphedDecode
    from meshinfer.models.device import synchronize

    device = span.device
    if mode != "eager" and batch != 1:
        return {"error": f"{mode} steps are batch-1 only (forward_batch runs eager)"}
    if mode in ("graphed", "fused", "tuned") and device.type != "cuda":
        return {"error": f"{mode} steps need a CUDA device"}
    span.compiled = (None if mode == "eager" else GraphedDecode(span, fuse=mode != "graphed", tune=mode == "tuned")
                     if mode in ("graphed", "fused", "tuned") else CompiledDecode(span))
    total = args.context + args.warmup + args.steps
    cap = capacity(total, spec.max_position_embeddings)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    with torch.inference_mode():
        caches = [span.new_cache(cap) for _ in range(batch)]
        for cache in caches:
            span(torch.randn(1, args.context, spec.hidden_size, generator=gen, device=device, dtype=span.dtype), cache)
        tokens = [7] * batch
        times: list[float] = []
        kv_read = 0
        slot_bytes = 2 * spec.num_kv_heads * spec.head_dim * span.dtype.itemsize * len(span)  # K+V, all blocks
        for step in range(args.warmup + args.steps):
            synchronize(device)
            t0 = time.perf_counter()
            x = head.embed(torch.tensor([tokens]))  # [1, B, H]
            if batch == 1:
                hidden = span(x, caches[0])[0]  # [1, H]
            else:
                hidden = torch.cat(span.forward_batch([(x[0, i : i + 1], c) for i, c in enumerate(caches)]))  # [B, H]
            tokens = head.logits(hidden).argmax(-1).tolist()  # greedy, back on the host as a sampler would
            synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
                filled = [c.length for c in caches]
                kv_read += sum(cap if mode != "eager" else n for n in filled) * slot_bytes
    ms = statistics.median(times) * 1e3
    figures: dict[str, Any] = {
        "tokens_per_s": round(batch / (ms / 1e3), 2), "ms_per_step": round(ms, 4),
        "ms_per_step_min": round(min(times) * 1e3, 4), "weight_bytes": weights_read(head, span),
        "kv_bytes_per_step": kv_read // args.steps, "capacity": cap,
    }
    if span.compiled is not None:
        figures["fell_back_to_eager"] = bool(span.compiled.failed)
        if mode in ("fused", "tuned"):
            figures["blocks_compiled"] = bool(getattr(span.compiled, "compiled_blocks", False))
    span.compiled = None
    return figures
