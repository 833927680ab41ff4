"""Model specification: the architecture facts meshinfer needs, parsed from a Hugging Face config.json.

Contract: knows the config.json dialects of transformers 4.x and 5.x for the supported families
(llama incl. Llama-3 ``llama3`` rope scaling, mistral, qwen2, qwen3) and the Hugging Face tensor
names and shapes of each block and of the head. Pure data: it reads config.json (and, through
``from_dir``, generation_config.json for end-of-sequence ids) and nothing else; it never imports
torch, transformers or network code. Anything it cannot honour exactly is rejected with an
``UnsupportedModelError``; a malformed config.json raises a ``CheckpointError``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshinfer.errors import CheckpointError, UnsupportedModelError
from meshinfer.types import DTYPE_ALIASES

SUPPORTED_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")

_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_SUPPORTED_ROPE = "default, llama3"


def _unsupported(name: object) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"unsupported architecture '{name}'; supported: {', '.join(SUPPORTED_FAMILIES)}"
    )


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Parameters of Llama-3 style rope scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model's architecture that the engine, servers and clients need."""

    family: str
    num_blocks: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    """q/k/v projections carry a bias (qwen2 always; llama/qwen3 when ``attention_bias``)."""
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    """Per-head RMSNorm of q and k before rope (qwen3)."""
    sliding_window: int | None
    """Tokens a query attends to (itself included) in sliding-window layers; None: full attention."""
    sliding_layers: tuple[bool, ...]
    """Per block: whether it uses ``sliding_window``."""
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelSpec:
        """Parse ``path/config.json``; add eos ids from ``path/generation_config.json`` if present."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"model directory {str(root)!r} does not exist")
        config = _read_json(root / "config.json", required=True)
        spec = cls.from_config(config)
        gen = _read_json(root / "generation_config.json", required=False)
        extra = _token_ids(gen.get("eos_token_id")) if gen else ()
        if extra:
            merged = tuple(dict.fromkeys(spec.eos_token_ids + extra))
            spec = _replace(spec, eos_token_ids=merged)
        return spec

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        """Parse a config.json dict (transformers 4.x or 5.x keys)."""
        if not isinstance(config, dict):
            raise CheckpointError("config.json must hold a JSON object")
        family = _family(config)
        act = config.get("hidden_act", config.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"unsupported activation {act!r}; only silu (SwiGLU) is supported")

        hidden = _pos_int(config, "hidden_size")
        heads = _pos_int(config, "num_attention_heads")
        kv_heads = _pos_int(config, "num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = config.get("head_dim") or None
        if head_dim is None:
            if hidden % heads:
                raise CheckpointError(f"config.json: hidden_size {hidden} is not divisible by {heads} heads")
            head_dim = hidden // heads
        head_dim = _as_pos_int("head_dim", head_dim)
        if head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        num_blocks = _pos_int(config, "num_hidden_layers")
        max_pos = _pos_int(config, "max_position_embeddings")

        rope_theta, rope_scaling = _rope(config)
        window, sliding_layers = _sliding(config, family, num_blocks, max_pos)
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            family=family,
            num_blocks=num_blocks,
            hidden_size=hidden,
            intermediate_size=_pos_int(config, "intermediate_size"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_pos_int(config, "vocab_size"),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=True if family == "qwen2" else attention_bias,
            o_proj_bias=attention_bias if family in ("llama", "qwen3") else False,
            mlp_bias=bool(config.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family == "qwen3",
            sliding_window=window,
            sliding_layers=sliding_layers,
            torch_dtype=DTYPE_ALIASES.get(str(config.get("dtype") or config.get("torch_dtype")).lower()),
            bos_token_id=_first_or_none(_token_ids(config.get("bos_token_id"))),
            eos_token_ids=_token_ids(config.get("eos_token_id")),
        )

    # ---- derived facts ------------------------------------------------------------------------

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def window_of(self, block: int) -> int | None:
        """The sliding window of ``block`` (None: full causal attention)."""
        return self.sliding_window if self.sliding_layers[block] else None

    def block_tensors(self, block: int) -> dict[str, tuple[int, ...]]:
        """Hugging Face names and shapes of the tensors of transformer block ``block``."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(block)
        p = f"model.layers.{block}."
        h, i = self.hidden_size, self.intermediate_size
        out: dict[str, tuple[int, ...]] = {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (self.q_size, h),
            p + "self_attn.k_proj.weight": (self.kv_size, h),
            p + "self_attn.v_proj.weight": (self.kv_size, h),
            p + "self_attn.o_proj.weight": (h, self.q_size),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        if self.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (self.q_size,)
            out[p + "self_attn.k_proj.bias"] = (self.kv_size,)
            out[p + "self_attn.v_proj.bias"] = (self.kv_size,)
        if self.o_proj_bias:
            out[p + "self_attn.o_proj.bias"] = (h,)
        if self.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (self.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (self.head_dim,)
        if self.mlp_bias:
            out[p + "mlp.gate_proj.bias"] = (i,)
            out[p + "mlp.up_proj.bias"] = (i,)
            out[p + "mlp.down_proj.bias"] = (h,)
        return out

    def head_tensors(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the client's tensors: embeddings, final norm, LM head (unless tied)."""
        out = {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
            "model.norm.weight": (self.hidden_size,),
        }
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return out

    def block_param_count(self) -> int:
        return sum(_numel(s) for s in self.block_tensors(0).values())

    def param_count(self) -> int:
        return self.num_blocks * self.block_param_count() + sum(_numel(s) for s in self.head_tensors().values())

    def kv_cache_bytes(self, num_blocks: int, max_length: int, batch: int = 1, dtype_bytes: int = 4) -> int:
        """Bytes of a K+V cache for ``num_blocks`` blocks holding ``max_length`` tokens per sequence."""
        return 2 * num_blocks * batch * self.num_kv_heads * max_length * self.head_dim * dtype_bytes


# ---- helpers ----------------------------------------------------------------------------------


def _replace(spec: ModelSpec, **changes: Any) -> ModelSpec:
    return dataclasses.replace(spec, **changes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.name} not found in {str(path.parent)!r}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _family(config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    if model_type is None:
        if not archs:
            raise CheckpointError("config.json has neither 'model_type' nor 'architectures'")
        model_type = _ARCHITECTURES.get(str(archs[0]))
        if model_type is None:
            raise _unsupported(archs[0])
    if model_type not in SUPPORTED_FAMILIES:
        raise _unsupported(model_type)
    for arch in archs:
        if _ARCHITECTURES.get(str(arch)) != model_type:
            raise _unsupported(arch)
    return str(model_type)


def _as_pos_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"config.json: {key!r} must be a positive integer, got {value!r}")
    return value


def _pos_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise CheckpointError(f"config.json: missing {key!r}")
        return default
    return _as_pos_int(key, value)


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise CheckpointError(f"config.json: token id must be an integer or a list of integers, got {value!r}")


def _first_or_none(ids: tuple[int, ...]) -> int | None:
    return ids[0] if ids else None


def _rope(config: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """(rope_theta, scaling) from 5.x ``rope_parameters`` or 4.x ``rope_theta`` + ``rope_scaling``."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise CheckpointError("config.json: 'rope_parameters' must be an object")
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError("config.json: 'rope_scaling' must be an object or null")
    merged: dict[str, Any] = {**(scaling or {}), **(params or {})}
    theta = merged.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise CheckpointError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    if float(merged.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise UnsupportedModelError(f"unsupported rope scaling type {kind!r}; supported: {_SUPPORTED_ROPE}")
    try:
        rs = Llama3RopeScaling(
            factor=float(merged["factor"]),
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"config.json: llama3 rope scaling lacks a valid {err}") from None
    if rs.factor <= 0 or rs.high_freq_factor <= rs.low_freq_factor or rs.original_max_position_embeddings <= 0:
        raise CheckpointError(f"config.json: invalid llama3 rope scaling parameters {rs}")
    return float(theta), rs


def _sliding(
    config: dict[str, Any], family: str, num_blocks: int, max_pos: int
) -> tuple[int | None, tuple[bool, ...]]:
    """Sliding window size and which blocks use it, as transformers 5.x decides them."""
    none = (None, (False,) * num_blocks)
    if family == "llama":
        return none
    window = config.get("sliding_window")
    if family in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        window = None
    if window is None:
        return none
    window = _as_pos_int("sliding_window", window)
    layer_types = config.get("layer_types")
    if family == "mistral":
        layers = (True,) * num_blocks
    elif isinstance(layer_types, list) and len(layer_types) == num_blocks:
        layers = tuple(t == "sliding_attention" for t in layer_types)
    else:
        start = int(config.get("max_window_layers", num_blocks))
        layers = tuple(i >= start for i in range(num_blocks))
    if window >= max_pos or not any(layers):
        return none  # the window never excludes a token
    return window, layers
