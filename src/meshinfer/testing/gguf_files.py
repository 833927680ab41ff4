"""Tiny GGUF files written from the tiny Hugging Face test checkpoints, as llama.cpp's converter would write them.

Contract: ``tiny_gguf(family, ggml_type, variant=...)`` writes (once; cached) a GGUF with ``gguf.GGUFWriter`` from
``testing.checkpoints.tiny_checkpoint(family, variant=variant)``: architecture ``llama`` for the llama and mistral
families (q/k rows permuted like ``convert_hf_to_gguf.py`` does: weights and biases, ``n_head`` = the tensor's own
head count), ``qwen2`` and ``qwen3`` unpermuted; the llama.cpp metadata keys of each architecture; tensors under
their llama.cpp names, 1-D tensors in F32 and 2-D tensors in ``ggml_type`` (F32, F16, BF16, or what
``gguf.quants.quantize`` can write: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; a tensor whose rows are not whole blocks stays
F32: llama.cpp's quantizer falls back to another type there too); and the checkpoint's byte-level BPE tokenizer
as a ``gpt2`` vocabulary (tokens by id, merges, token types: the tokenizer's special added tokens as control
(3), the rest normal (1); pre-tokenizer ``gpt-2``: the tiny tokenizers split with ``ByteLevel(use_regex=True)``,
which is GPT-2's regex; bos/eos/pad ids, ``add_bos_token`` when the tokenizer adds one, the chat template; llama.cpp's
``llama-tokenize`` loads them and gives the source tokenizer's ids). Files live under
``config.cache_root()/gguf-tests`` (the session cache in tests) under a name hashing every
parameter, the source checkpoint's name and ``GGUF_GENERATOR_VERSION``; they are written to a temporary file
and renamed into place. Test helper only: never used by the engine; no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from meshinfer.errors import ConfigError
from meshinfer.models.ggml import permute_rows
from meshinfer.models.gguf_file import gguf_tensor_name
from meshinfer.testing.checkpoints import tiny_checkpoint

GGUF_GENERATOR_VERSION = 1
GGUF_FAMILIES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
"""Tiny checkpoint family -> the GGUF architecture llama.cpp converts it to."""
GGUF_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
_VARIANTS = ("default", "tied", "mha")  # llama3 rope scaling needs rope_freqs.weight, which views refuse
_CONTROL, _NORMAL = 3, 1


def gguf_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where tiny GGUFs are cached: ``cache_dir``, else ``config.cache_root()/gguf-tests``."""
    from meshinfer.config import cache_root as meshinfer_cache

    return Path(cache_dir) if cache_dir is not None else meshinfer_cache() / "gguf-tests"


def _metadata(writer: Any, arch: str, cfg: dict[str, Any], ggml_type: str) -> None:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer.add_name(f"tiny-{cfg['model_type']}")
    writer.add_type("model")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_file_type({"F32": 0, "F16": 1}.get(ggml_type, 7))
    if arch == "llama":  # what convert_hf_to_gguf.py writes for llama
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3" or head_dim != cfg["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _tokenizer(writer: Any, ckpt: Path, cfg: dict[str, Any]) -> None:
    doc = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = doc["model"]["vocab"]
    tokens = [""] * cfg["vocab_size"]
    for text, i in vocab.items():
        tokens[i] = text
    specials = {t["id"] for t in doc["added_tokens"] if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([_CONTROL if i in specials else _NORMAL for i in range(len(tokens))])
    writer.add_token_merges(merges)
    if cfg.get("bos_token_id") is not None:
        writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_add_bos_token((doc.get("post_processor") or {}).get("type") == "TemplateProcessing")
    writer.add_chat_template(tok_cfg["chat_template"])


def _encode(values: np.ndarray, ggml_type: str) -> tuple[np.ndarray, Any]:
    """(array to write, raw ggml type or None) of float32 ``values`` in ``ggml_type`` (F32 when not blockable)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    qt = GGMLQuantizationType[ggml_type]
    if values.ndim == 1 or ggml_type == "F32" or values.shape[-1] % GGML_QUANT_SIZES[qt][0]:
        return values, None
    if ggml_type == "F16":
        return values.astype(np.float16), None
    return quantize(values, qt), qt


def _write(path: Path, family: str, variant: str, ggml_type: str, ckpt: Path) -> None:
    from gguf import GGUFWriter
    from safetensors.numpy import load_file

    cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    arch = GGUF_FAMILIES[family]
    writer = GGUFWriter(str(path), arch=arch)
    _metadata(writer, arch, cfg, ggml_type)
    _tokenizer(writer, ckpt, cfg)
    tensors = load_file(str(ckpt / "model.safetensors"))
    for name, values in tensors.items():
        gguf_name = gguf_tensor_name(name)
        if gguf_name is None:
            raise ConfigError(f"no GGUF name for tensor {name}")
        values = np.ascontiguousarray(values, dtype=np.float32)
        if arch == "llama" and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            heads = cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"]
            values = values[permute_rows(values.shape[0], heads).numpy()]
        data, raw = _encode(values, ggml_type)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_gguf(family: str, ggml_type: str = "F32", *, variant: str = "default",
              cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A tiny GGUF of ``family`` (llama, mistral, qwen2, qwen3) with 2-D tensors in ``ggml_type`` (cached)."""
    if family not in GGUF_FAMILIES:
        raise ConfigError(f"no tiny GGUF for family {family!r}; choose one of {', '.join(GGUF_FAMILIES)}")
    if ggml_type not in GGUF_TYPES:
        raise ConfigError(f"no tiny GGUF in type {ggml_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if variant not in _VARIANTS:
        raise ConfigError(f"no tiny GGUF of variant {variant!r}; choose one of {', '.join(_VARIANTS)}")
    ckpt = tiny_checkpoint(family, variant=variant)
    key = hashlib.sha256(json.dumps([GGUF_GENERATOR_VERSION, ckpt.name, family, variant, ggml_type])
                         .encode()).hexdigest()[:12]
    root = gguf_cache_root(cache_dir)
    path = root / f"tiny-{family}-{variant}-{ggml_type}-{key}.gguf"
    if path.is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=root)
    os.close(fd)
    try:
        _write(Path(tmp), family, variant, ggml_type, ckpt)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
