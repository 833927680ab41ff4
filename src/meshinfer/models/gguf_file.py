"""A GGUF file read from its header alone: metadata, a Hugging Face config and a tensor table by HF names.

Contract: ``GgufFile(path)`` parses a GGUF header with ``gguf.GGUFReader`` (memory-mapped; tensor data is
never read) and checks it completely before anyone trusts it: the magic (``is_gguf_file``), every key and
array inside the file, tensor byte ranges inside the file and not overlapping, no duplicate keys or tensor
names, a little-endian file, one file (no split GGUF). It knows llama.cpp's metadata and tensor names of
the architectures ``llama`` (Llama and Mistral GGUFs), ``qwen2`` and ``qwen3`` and maps them to a Hugging
Face config.json (``hf_config``) that ``ModelSpec.from_config`` parses, and the tensors to their HF names
(``tensors``: ``{hf_name: GgufTensorInfo}``) with logical shapes in torch order, checked against the spec.
Whatever it cannot honour exactly is an ``UnsupportedModelError`` naming it and what is supported: another
architecture, a metadata key it does not know for the architecture (rope scaling, sliding windows,
experts...), a tensor name it does not know (``rope_freqs.weight``...), a tensor type nothing can decode.
A bad magic, a cut header or data, a corrupt field, a vocabulary size that differs between metadata and
tensors: one-line ``CheckpointError``s naming the file. ``metadata`` holds every key/value except the
``GGUF.*`` internals as plain JSON values (what the tokenizer is rebuilt from). llama.cpp stores the q/k
rows of ``llama`` models permuted (``qk_permuted``); undoing that is the reader's job (``models.gguf``).
Pure file I/O plus numpy; no torch, no network.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from meshinfer.errors import CheckpointError, UnsupportedModelError
from meshinfer.models import ggml_types
from meshinfer.models.spec import ModelSpec

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
_SUPPORTED_TEXT = "llama (Llama, Mistral), qwen2, qwen3"
_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    **{f"attn_{g}.{k}": f"self_attn.{h}_proj.{k}" for g, h in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))
       for k in ("weight", "bias")},
    **{f"ffn_{g}.{k}": f"mlp.{g}_proj.{k}" for g in ("gate", "up", "down") for k in ("weight", "bias")},
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_BLOCK = {v: k for k, v in _BLOCK_NAMES.items()}
_HF_TO_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}
# "{arch}." keys honoured exactly (values checked below); any other key of the architecture is refused.
_ARCH_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base", "rope.scaling.type",
    "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned", "expert_count",
    "expert_used_count",
})


class _Truncated(Exception):
    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


def _reader_class() -> type:
    from gguf import GGUFReader

    class Reader(GGUFReader):  # type: ignore[misc]
        """GGUFReader whose primitive read refuses to run past the end of the file (a cut or corrupt file
        would otherwise yield empty arrays, or loop over a huge bogus array length) and slices a plain
        ndarray view of the memory map (about 3x faster on a 49k-token vocabulary)."""

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            dt, count, offset = np.dtype(dtype), int(count), int(offset)
            end = offset + dt.itemsize * count
            if offset < 0 or count < 0 or end > plain.shape[0]:
                raise _Truncated(end)
            arr = plain[offset:end].view(dt)
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name (None: not one we know)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES and str(int(m.group(1))) == m.group(1):
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def gguf_tensor_name(hf_name: str) -> str | None:
    """The llama.cpp name of a Hugging Face tensor name (None: not one we know)."""
    if hf_name in _HF_TO_GLOBAL:
        return _HF_TO_GLOBAL[hf_name]
    m = _HF_BLOCK_RE.match(hf_name)
    if m and m.group(2) in _HF_TO_BLOCK:
        return f"blk.{m.group(1)}.{_HF_TO_BLOCK[m.group(2)]}"
    return None


@dataclass(frozen=True)
class GgufTensorInfo:
    """One tensor of a GGUF file: llama.cpp name, ggml type, logical shape (torch order), bytes [start, end)."""

    gguf_name: str
    ggml_type: str
    shape: tuple[int, ...]
    start: int
    end: int


def _f32(value: float) -> float:
    """The shortest decimal that is the same float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


class GgufFile:
    """A GGUF file's header, parsed and checked: architecture, metadata, tensors by HF name, HF config."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            st = self.path.stat()
        except OSError as err:
            raise CheckpointError(f"cannot read {self.path}: {err.strerror or err}") from None
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
        if not is_gguf_file(self.path):
            raise CheckpointError(f"{self.path} is not a GGUF file (it does not start with b'GGUF')")
        try:
            reader = _reader_class()(self.path)
            self.metadata, self._float32 = self._fields(reader)
            raw = [(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())),
                    int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in reader.tensors]
            swapped = reader.byte_order == "S"
        except _Truncated as err:
            raise CheckpointError(f"{self.path} is cut short: it needs {err.end} bytes but has {self.size} "
                                  f"(truncated or corrupt GGUF file)") from None
        except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError, UnicodeDecodeError) as err:
            brief = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise CheckpointError(f"{self.path} is not a valid GGUF file: {brief}") from None
        del reader
        if swapped:
            raise UnsupportedModelError(f"{self.path} is a big-endian GGUF file; only little-endian is supported")
        self.architecture = self._architecture()
        self.qk_permuted = self.architecture == "llama"
        self.tensors = self._tensor_table(raw)
        self._config = self._build_config()

    # ---- metadata -----------------------------------------------------------------------------

    @staticmethod
    def _fields(reader: Any) -> tuple[dict[str, Any], set[str]]:
        from gguf import GGUFValueType

        out: dict[str, Any] = {}
        float32: set[str] = set()
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            value = field.contents()
            if isinstance(value, np.generic):
                value = value.item()
            out[key] = value
            if field.types and field.types[-1] == GGUFValueType.FLOAT32:
                float32.add(key)
        return out, float32

    def _architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path} has no general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported GGUF architecture '{arch}'; supported: {_SUPPORTED_TEXT}")
        kind = self.metadata.get("general.type", "model")
        if kind != "model":
            raise UnsupportedModelError(f"{self.path.name} is a GGUF of type '{kind}'; only models are supported")
        if self.metadata.get("split.count", 1) not in (0, 1):
            raise UnsupportedModelError(f"{self.path.name} is one part of a split GGUF; merge the parts first "
                                        f"(llama-gguf-split --merge)")
        prefix = arch + "."
        for key, value in self.metadata.items():
            if key.startswith(prefix) and key[len(prefix):] not in _ARCH_KEYS:
                raise UnsupportedModelError(f"GGUF metadata {key} = {str(value)[:80]} is not supported for {arch} "
                                            f"(only plain rotary attention without extra options)")
        scaling = self.metadata.get(prefix + "rope.scaling.type", "none")
        factor = self.metadata.get(prefix + "rope.scaling.factor", 1.0)
        if not (scaling == "none" or (scaling == "linear" and factor in (0.0, 1.0))):
            raise UnsupportedModelError(f"GGUF rope scaling '{scaling}' (factor {factor}) is not supported; "
                                        f"supported: none")
        for key in ("expert_count", "expert_used_count"):
            if self.metadata.get(prefix + key, 0) != 0:
                raise UnsupportedModelError(f"mixture-of-experts GGUFs ({prefix}{key}) are not supported")
        return arch

    def _int(self, key: str, default: int | None = None) -> int:
        full = f"{self.architecture}.{key}"
        value = self.metadata.get(full, default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer array holding one value is that value
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            if value is None:
                raise CheckpointError(f"{self.path} lacks GGUF metadata {full}")
            raise UnsupportedModelError(f"GGUF metadata {full} = {str(value)[:80]} is not supported "
                                        f"(one positive integer for every layer)")
        return value

    def _float(self, key: str, default: float | None = None) -> float:
        full = f"{self.architecture}.{key}"
        value = self.metadata.get(full, default)
        if value is None:
            raise CheckpointError(f"{self.path} lacks GGUF metadata {full}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"{self.path}: GGUF metadata {full} = {value!r} is not a positive number")
        return _f32(value) if full in self._float32 else float(value)

    # ---- tensors ------------------------------------------------------------------------------

    def _tensor_table(self, raw: list[tuple[str, str, tuple[int, ...], int, int]]) -> dict[str, GgufTensorInfo]:
        out: dict[str, GgufTensorInfo] = {}
        for name, ggml_type, shape, start, end in raw:
            hf = hf_tensor_name(name)
            if name == "rope_freqs.weight":
                raise UnsupportedModelError(f"{self.path.name} has rope frequency factors (rope_freqs.weight, "
                                            f"Llama-3.1-style rope scaling); supported: plain rotary embeddings")
            if hf is None:
                raise UnsupportedModelError(f"{self.path.name} has tensor {name[:100]!r}, which {self.architecture} "
                                            f"GGUFs do not have here; supported: token_embd, output_norm, output, "
                                            f"blk.N.{{attn_*,ffn_*}}")
            ggml_types.check_supported_type(ggml_type, f"tensor {name}")
            if len(shape) not in (1, 2) or (len(shape) == 1 and ggml_type not in ggml_types.FLOAT_TYPE_NAMES):
                raise UnsupportedModelError(f"tensor {name} of type {ggml_type} and shape {list(shape)} is not "
                                            f"supported (1-D tensors must be F32, F16 or BF16; at most 2-D)")
            try:
                size = math.prod(ggml_types.byte_shape(ggml_type, shape))
            except ValueError as err:
                raise CheckpointError(f"{self.path}: tensor {name}: {err}") from None
            if end - start != size or end > self.size:
                raise CheckpointError(f"{self.path}: tensor {name} ends at byte {end} of {self.size} "
                                      f"(truncated or corrupt GGUF file)")
            out[hf] = GgufTensorInfo(name, ggml_type, shape, start, end)
        spans = sorted((t.start, t.end, t.gguf_name) for t in out.values())
        for (_, end, a), (start, _, b) in pairwise(spans):
            if start < end:
                raise CheckpointError(f"{self.path}: tensors {a} and {b} overlap (corrupt GGUF file)")
        return out

    # ---- the Hugging Face config --------------------------------------------------------------

    def _token_ids(self, *keys: str) -> list[int]:
        out: list[int] = []
        for key in keys:
            value = self.metadata.get(f"tokenizer.ggml.{key}")
            if isinstance(value, int) and not isinstance(value, bool) and value not in out:
                out.append(value)
        return out

    def _build_config(self) -> dict[str, Any]:
        arch, t = self.architecture, self.tensors
        if "model.embed_tokens.weight" not in t:
            raise CheckpointError(f"{self.path} lacks tensor token_embd.weight")
        hidden, heads = self._int("embedding_length"), self._int("attention.head_count")
        head_dim = self._int("attention.key_length", hidden // heads if hidden % heads == 0 else None)
        if self._int("attention.value_length", head_dim) != head_dim:
            raise UnsupportedModelError("GGUF key and value head sizes differ; only equal sizes are supported")
        if self._int("rope.dimension_count", head_dim) != head_dim:
            raise UnsupportedModelError("partial rotary embeddings (rope.dimension_count != head size) are not "
                                        "supported")
        vocab = t["model.embed_tokens.weight"].shape[0]
        for what, n in ((f"{arch}.vocab_size", self.metadata.get(f"{arch}.vocab_size")),
                        ("tokenizer.ggml.tokens", len(self.metadata.get("tokenizer.ggml.tokens") or []) or None),
                        ("output.weight", t["lm_head.weight"].shape[0] if "lm_head.weight" in t else None)):
            if n is not None and n != vocab:
                raise CheckpointError(f"{self.path}: vocabulary size {n} of {what} differs from token_embd's {vocab}")
        eos = self._token_ids("eos_token_id", "eot_token_id", "eom_token_id")
        cfg: dict[str, Any] = {
            "architectures": [_HF_ARCH[arch]], "model_type": arch, "hidden_act": "silu",
            "hidden_size": hidden, "intermediate_size": self._int("feed_forward_length"),
            "num_hidden_layers": self._int("block_count"), "num_attention_heads": heads,
            "num_key_value_heads": self._int("attention.head_count_kv", heads), "head_dim": head_dim,
            "max_position_embeddings": self._int("context_length"), "vocab_size": vocab,
            "rms_norm_eps": self._float("attention.layer_norm_rms_epsilon"),
            "rope_theta": self._float("rope.freq_base", 10000.0), "rope_scaling": None,
            "tie_word_embeddings": "lm_head.weight" not in t,
        }
        if arch in ("llama", "qwen3"):
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in t
        if arch == "llama":
            cfg["mlp_bias"] = "model.layers.0.mlp.gate_proj.bias" in t
        else:
            cfg.update(use_sliding_window=False, sliding_window=None)
        for key, ids in (("bos_token_id", self._token_ids("bos_token_id")), ("eos_token_id", eos),
                         ("pad_token_id", self._token_ids("padding_token_id"))):
            if ids:
                cfg[key] = ids[0] if len(ids) == 1 else ids
        self._check_against_spec(cfg)
        return cfg

    def _check_against_spec(self, cfg: dict[str, Any]) -> None:
        spec = ModelSpec.from_config(cfg)
        expected = dict(spec.head_tensors())
        for i in range(spec.num_blocks):
            expected.update(spec.block_tensors(i))
        for name, info in self.tensors.items():
            if name not in expected:
                raise UnsupportedModelError(f"{self.path.name}: tensor {info.gguf_name} does not belong in a "
                                            f"{self.architecture} model of {spec.num_blocks} blocks with this config")
            if info.shape != expected[name]:
                raise CheckpointError(f"{self.path}: tensor {info.gguf_name} has shape {list(info.shape)}, expected "
                                      f"{list(expected[name])} from the GGUF metadata")
        missing = [gguf_tensor_name(n) or n for n in expected if n not in self.tensors]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(f"{self.path} lacks tensor(s) {', '.join(missing[:3])}{more}")

    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face config.json (a copy) describing this model."""
        return dict(self._config)

    def generation_config(self) -> dict[str, Any]:
        """generation_config.json: the bos and eos ids of the GGUF metadata."""
        return {k: self._config[k] for k in ("bos_token_id", "eos_token_id") if k in self._config}
