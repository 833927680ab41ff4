"""Tiny, bench and demo checkpoints in real Hugging Face format, built locally and cached.

Contract: ``tiny_checkpoint(family, variant=..., seed=..., sharded=...)``, ``bench_checkpoint()`` and
``demo_checkpoint()`` return a directory laid out exactly as ``save_pretrained`` would write it:
config.json (in the classic hub style: ``torch_dtype``, ``rope_theta``, ``rope_scaling``),
generation_config.json, model.safetensors (or model.safetensors.index.json + 2 shards) with the HF
tensor names and ``{"format": "pt"}`` metadata, and tokenizer files from ``testing.tokenizer``.
Weights are random from seeded ``torch.Generator``s (one per tensor, derived from the seed and the
tensor name), so a checkpoint is a pure function of its parameters. Directories live under a cache
root (``cache_dir=`` argument, else ``config.cache_root()/checkpoints``, decided at call time:
``$MESHINFER_CACHE_DIR/checkpoints``, else ``~/.cache/meshinfer/checkpoints``) under a name carrying a hash
of every generator parameter and ``GENERATOR_VERSION``; they are built in a temporary directory and renamed
into place atomically, so concurrent processes never see a half-written checkpoint. This module knows
nothing of our model engine or the network; it never imports ``transformers``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshinfer.config import cache_root as config_cache_root
from meshinfer.errors import ConfigError
from meshinfer.testing.tokenizer import (
    TokenizerRecipe,
    corpus_sha256,
    recipe_for,
    unprintable_token_ids,
    write_tokenizer,
)

GENERATOR_VERSION = 4
"""Bump whenever the bytes a given set of parameters produces change (invalidates caches)."""

TINY_VOCAB = 512
_TRANSFORMERS_VERSION = "4.45.0"  # what the classic-style config.json claims to be written by

# Init scales. Linear weights get std = gain / sqrt(fan_in); the LM head's gain sets the logit spread
# (std of logits ~= LM_HEAD_GAIN since final-norm outputs have norm ~sqrt(hidden)), which keeps
# greedy choices well separated so fp32 rounding never flips them.
LINEAR_GAIN = 1.6
LM_HEAD_GAIN = 2.0
EMBED_STD = 0.5
TIED_EMBED_STD = 0.1  # tied: a small embedding keeps a token's own logit from dominating (no 1-token loops)
NORM_JITTER = 0.1  # norm weights = 1 + N(0, NORM_JITTER)
BIAS_STD = 0.1
# LM-head rows of special tokens (eos...) and of unprintable tokens (control characters, pieces of
# multi-byte characters) are shrunk, so random models rarely stop early and their text stays printable.
SPECIAL_HEAD_SCALE = 0.1
HEAD_ROW_SPREAD = 0.5  # LM-head rows scaled by exp(N(0, s)): heavier-tailed logits, wider top-1/top-2 gaps


@dataclass(frozen=True)
class _Recipe:
    """Everything a checkpoint is generated from (hashed into its cache name)."""

    name: str
    config: dict[str, Any]
    tokenizer: TokenizerRecipe
    seed: int
    sharded: bool

    def digest(self) -> str:
        doc = {
            "generator_version": GENERATOR_VERSION, "config": self.config,
            "tokenizer": self.tokenizer.as_dict(), "corpus": corpus_sha256(), "seed": self.seed,
            "sharded": self.sharded,
            "init": [LINEAR_GAIN, LM_HEAD_GAIN, EMBED_STD, TIED_EMBED_STD, NORM_JITTER, BIAS_STD,
                     SPECIAL_HEAD_SCALE, HEAD_ROW_SPREAD],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Configs


def _base_config(arch: str, model_type: str, tok: TokenizerRecipe, **hp: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok.token_id(tok.bos),
        "eos_token_id": tok.token_id(tok.eos),
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": model_type,
        "pad_token_id": tok.token_id(tok.pad),
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": tok.vocab_size,
    }
    cfg.update(hp)
    return dict(sorted(cfg.items()))


_TINY = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "max_position_embeddings": 256}

_FAMILY_VARIANTS: dict[str, tuple[str, ...]] = {
    "llama": ("default", "tied", "llama3", "mha"),
    "mistral": ("default",),
    "qwen2": ("default",),
    "qwen3": ("default",),
}


def list_tiny_checkpoints() -> list[tuple[str, str]]:
    """Every (family, variant) pair ``tiny_checkpoint`` can build."""
    return [(family, variant) for family, variants in _FAMILY_VARIANTS.items() for variant in variants]


def _tiny_config(family: str, variant: str) -> tuple[dict[str, Any], TokenizerRecipe]:
    if family not in _FAMILY_VARIANTS:
        raise ConfigError(f"unknown tiny checkpoint family {family!r}; choose one of "
                          f"{', '.join(_FAMILY_VARIANTS)}")
    if variant not in _FAMILY_VARIANTS[family]:
        raise ConfigError(f"unknown variant {variant!r} of {family}; choose one of "
                          f"{', '.join(_FAMILY_VARIANTS[family])}")
    if family == "llama":
        tok = recipe_for("llama", TINY_VOCAB)
        hp: dict[str, Any] = dict(_TINY, head_dim=16, mlp_bias=False, pretraining_tp=1)
        if variant == "tied":
            hp["tie_word_embeddings"] = True
        elif variant == "mha":
            hp["num_key_value_heads"] = hp["num_attention_heads"]
        elif variant == "llama3":
            hp.update(max_position_embeddings=512, rope_theta=500000.0, rope_scaling={
                "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 64, "rope_type": "llama3",
            })
        return _base_config("LlamaForCausalLM", "llama", tok, **hp), tok
    if family == "mistral":
        tok = recipe_for("mistral", TINY_VOCAB)
        hp = dict(_TINY, head_dim=16, intermediate_size=176, sliding_window=None)
        return _base_config("MistralForCausalLM", "mistral", tok, **hp), tok
    tok = recipe_for("qwen", TINY_VOCAB)
    qwen: dict[str, Any] = dict(_TINY, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=None,
                                use_sliding_window=False, max_window_layers=4)
    if family == "qwen2":
        cfg = _base_config("Qwen2ForCausalLM", "qwen2", tok, **qwen)
        del cfg["attention_bias"]  # Qwen2 always has q/k/v biases; its config has no such field
        return cfg, tok
    # qwen3: explicit head_dim (32) != hidden_size / heads (16), q_norm / k_norm weights.
    return _base_config("Qwen3ForCausalLM", "qwen3", tok, **dict(qwen, head_dim=32)), tok


# ---------------------------------------------------------------------------------------------------
# Weights


def tensor_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF tensor name, shape, init kind) in the order ``save_pretrained`` would list them."""
    h, v, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    inter = cfg["intermediate_size"]
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    out: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (v, h), "embed")]
    for i in range(n):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (heads * hd, h), "linear"),
            (p + "self_attn.k_proj.weight", (kv * hd, h), "linear"),
            (p + "self_attn.v_proj.weight", (kv * hd, h), "linear"),
            (p + "self_attn.o_proj.weight", (h, heads * hd), "linear"),
        ]
        if qkv_bias:
            out += [
                (p + "self_attn.q_proj.bias", (heads * hd,), "bias"),
                (p + "self_attn.k_proj.bias", (kv * hd,), "bias"),
                (p + "self_attn.v_proj.bias", (kv * hd,), "bias"),
            ]
        if cfg["model_type"] == "qwen3":
            out += [(p + "self_attn.q_norm.weight", (hd,), "norm"),
                    (p + "self_attn.k_norm.weight", (hd,), "norm")]
        out += [
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (inter, h), "linear"),
            (p + "mlp.up_proj.weight", (inter, h), "linear"),
            (p + "mlp.down_proj.weight", (h, inter), "linear"),
        ]
    out.append(("model.norm.weight", (h,), "norm"))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h), "head"))
    return out


def _generator(seed: int, name: str):
    import torch

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _row_spread(seed: int, name: str, rows: int):
    import torch

    g = _generator(seed, name + ":rows")
    return torch.exp(HEAD_ROW_SPREAD * torch.randn(rows, 1, generator=g))  # [rows, 1]


def _make_weights(cfg: dict[str, Any], quiet_ids: list[int], seed: int) -> dict[str, Any]:
    """Random tensors by HF name; LM-head rows of ``quiet_ids`` are shrunk (rarely generated)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for name, shape, kind in tensor_shapes(cfg):
        g = _generator(seed, name)
        w = torch.randn(shape, generator=g, dtype=torch.float32)  # [*shape]
        if kind == "linear":
            w *= LINEAR_GAIN / math.sqrt(shape[1])
        elif kind == "head":
            w *= LM_HEAD_GAIN / math.sqrt(shape[1])
            w *= _row_spread(seed, name, shape[0])
            w[quiet_ids] *= SPECIAL_HEAD_SCALE
        elif kind == "embed":
            w *= TIED_EMBED_STD if cfg["tie_word_embeddings"] else EMBED_STD
            if cfg["tie_word_embeddings"]:  # the embedding doubles as the LM head
                w *= _row_spread(seed, name, shape[0])
                w[quiet_ids] *= SPECIAL_HEAD_SCALE
        elif kind == "norm":
            w = 1.0 + NORM_JITTER * w
        else:  # bias
            w *= BIAS_STD
        tensors[name] = w.contiguous()
    return tensors


def _generation_config(cfg: dict[str, Any], tok: TokenizerRecipe) -> dict[str, Any]:
    eos = [tok.token_id(tok.eos), tok.token_id(tok.chat_end)]
    out: dict[str, Any] = {}
    if cfg.get("bos_token_id") is not None:
        out["bos_token_id"] = cfg["bos_token_id"]
    out.update(eos_token_id=eos, pad_token_id=cfg["pad_token_id"], transformers_version=_TRANSFORMERS_VERSION)
    return out


def _write_checkpoint(recipe: _Recipe, directory: Path) -> None:
    from safetensors.torch import save_file

    cfg = recipe.config
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (directory / "generation_config.json").write_text(
        json.dumps(_generation_config(cfg, recipe.tokenizer), indent=2) + "\n")
    tok_doc = write_tokenizer(recipe.tokenizer, directory)
    specials = range(len(recipe.tokenizer.special_tokens))  # special tokens take the first ids
    quiet = sorted(set(specials) | set(unprintable_token_ids(tok_doc)))
    tensors = _make_weights(cfg, quiet, recipe.seed)
    meta = {"format": "pt"}
    if not recipe.sharded:
        save_file(tensors, str(directory / "model.safetensors"), metadata=meta)
    else:
        names = list(tensors)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        # Split at the middle of the byte count so both shards hold real layers.
        acc, cut = 0, len(names)
        for i, name in enumerate(names):
            acc += tensors[name].numel() * tensors[name].element_size()
            if acc >= total / 2:
                cut = i + 1
                break
        cut = min(max(cut, 1), len(names) - 1)
        shards = [names[:cut], names[cut:]]
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in shard}, str(directory / fname), metadata=meta)
            weight_map.update({n: fname for n in shard})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# Cache


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where checkpoints are cached: ``cache_dir``, else ``config.cache_root()/checkpoints``."""
    return Path(cache_dir) if cache_dir is not None else config_cache_root() / "checkpoints"


def _materialise(recipe: _Recipe, cache_dir: str | os.PathLike[str] | None) -> Path:
    root = cache_root(cache_dir)
    final = root / f"{recipe.name}-{recipe.digest()}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{recipe.name}-", dir=root))
    try:
        _write_checkpoint(recipe, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_checkpoint(family: str, *, variant: str = "default", seed: int = 0, sharded: bool = False,
                    cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A tiny checkpoint of ``family`` ("llama", "mistral", "qwen2", "qwen3") and ``variant``."""
    cfg, tok = _tiny_config(family, variant)
    name = f"tiny-{family}-{variant}-s{seed}" + ("-sharded" if sharded else "")
    return _materialise(_Recipe(name, cfg, tok, seed, sharded), cache_dir)


def tiny_config(family: str, variant: str = "default") -> dict[str, Any]:
    """The config.json contents ``tiny_checkpoint(family, variant=variant)`` writes (a copy)."""
    return copy.deepcopy(_tiny_config(family, variant)[0])


def _bench() -> tuple[dict[str, Any], TokenizerRecipe]:
    tok = recipe_for("llama", 32000)
    cfg = _base_config("LlamaForCausalLM", "llama", tok, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12, head_dim=64, intermediate_size=2048,
                       max_position_embeddings=2048, mlp_bias=False, pretraining_tp=1)
    return cfg, tok


def _demo() -> tuple[dict[str, Any], TokenizerRecipe]:
    tok = recipe_for("llama", TINY_VOCAB)
    cfg = _base_config("LlamaForCausalLM", "llama", tok, hidden_size=128, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=352,
                       max_position_embeddings=1024, mlp_bias=False, pretraining_tp=1)
    return cfg, tok


def bench_config() -> dict[str, Any]:
    """The config.json of ``bench_checkpoint()`` (without building it)."""
    return copy.deepcopy(_bench()[0])


def demo_config() -> dict[str, Any]:
    """The config.json of ``demo_checkpoint()`` (without building it)."""
    return copy.deepcopy(_demo()[0])


def parameter_count(config: dict[str, Any]) -> int:
    """Number of parameters stored by a checkpoint with this config.json."""
    return sum(math.prod(shape) for _, shape, _ in tensor_shapes(config))


def bench_checkpoint(seed: int = 0, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Llama-shaped bench checkpoint: 12 layers, hidden 768, vocab 32000, untied (~134M params)."""
    cfg, tok = _bench()
    return _materialise(_Recipe(f"bench-llama-s{seed}", cfg, tok, seed, False), cache_dir)


def demo_checkpoint(*, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The built-in demo model: a small Llama (8 layers, hidden 128) that splits well across 3 servers."""
    cfg, tok = _demo()
    return _materialise(_Recipe("demo-llama", cfg, tok, 0, False), cache_dir)
