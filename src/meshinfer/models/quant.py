"""Quantized weights (int8 / int4) as a transform of a built model, gpt-fast style.

Contract: pure torch, on the CPU or a CUDA GPU (``check_quant_device`` applies ``quant_support``'s rules:
MPS, and int4 on pre-Ampere GPUs, are refused with a one-line ConfigError naming the fix).
``quantize_span`` / ``quantize_head`` replace, in place, the ``ops.Linear`` and ``ops.Embedding`` seams of a
built ``BlockSpan`` / ``ClientHead`` with the modules of ``quant_modules`` (``Int8Linear``, ``Int4Linear``,
``QuantEmbedding``; re-exported here), which have the same call signature and hold int8 or int4 weights;
block and head code never learn how weights are stored. Modules are built on the device of the weights they
replace, in its layout (a loader quantizes each block right after building it on the device: peak memory is
the quantized span plus one float block; GGUF sources are moved to that device first).
Shapes the int4 kernel cannot take (N % 16 on the CPU, N % 8 on CUDA, K % group) get an ``Int8Linear``
(logged once per shape at debug level), as does everything when this CPU build's pack layout is unknown
(``int4_supported``). Tied embeddings read the quantized LM head itself (stored once, int8 or int4); untied
tables are int8 (int4 lookups would save little where the table is not shared).
Weights quantized from floats use groups of ``DEFAULT_GROUP`` (32) and the ``search`` quantizer in blocks,
``minmax`` in the LM head (measured, see the constants); GGUF Q4_0/Q4_1 ``sources`` keep their native
32-groups and codes (exact up to bf16 rounding of scale and zero). ``block_weight_bytes`` /
``head_weight_bytes`` mirror these rules exactly without building tensors, for a ``device_type``: the bytes
held are the same on the CPU and CUDA (tinygemm's int32 tiles hold N * K / 2 bytes, no padding: shapes that
would need it become int8), but which shapes stay int4 differs. Knows nothing of files, GGUF parsing,
checkpoints, sessions or the network; no autograd.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from meshinfer.errors import ConfigError
from meshinfer.models import quant_math as qm
from meshinfer.models import tinygemm
from meshinfer.models.block import TransformerBlock
from meshinfer.models.device import device_label, resolve_device
from meshinfer.models.head import ClientHead
from meshinfer.models.ops import Embedding, Linear
from meshinfer.models.quant_modules import (
    DEFAULT_GROUP,
    GEMV_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    QuantEmbedding,
    int4_supported,
)
from meshinfer.models.quant_support import QuantDeviceFacts, quant_refusal
from meshinfer.models.span import BlockSpan
from meshinfer.models.spec import ModelSpec
from meshinfer.types import QUANT_MODES

__all__ = [
    "BLOCK_LINEARS", "DEFAULT_GROUP", "GEMV_MAX_ROWS", "GGUF_GROUP", "HEAD_INT4_METHOD", "SPAN_INT4_METHOD",
    "Int4Linear", "Int8Linear", "Q4Source", "Q8Source", "QuantConfig", "QuantEmbedding", "block_weight_bytes",
    "check_quant_device", "head_weight_bytes", "int4_supported", "linear_weight_bytes", "quantize_block",
    "quantize_head", "quantize_linear", "quantize_matrix", "quantize_span", "weight_bytes",
]

log = logging.getLogger(__name__)

GGUF_GROUP = 32
"""The group of GGUF's Q4_0/Q4_1 blocks (taken as they are when a config leaves the group size to the source)."""
SPAN_INT4_METHOD = "search"
"""Block matrices: least-squares search (ppl 30.3 vs minmax 35.5 at group 32, see ``DEFAULT_GROUP``; weighting
by |w| or w^2 was worse)."""
HEAD_INT4_METHOD = "minmax"
"""The LM head: min/max (ppl 29.1 vs search 30.6 at group 64): clipping a group's extremes to cut its squared
error hurts logits more than it helps."""
BLOCK_LINEARS = ("qkv", "o", "gate_up", "down")

Q4Source = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A GGUF Q4_0/Q4_1 matrix: (q uint8 [N, K] in 0..15, scale fp32 [N, K/32], low fp32 [N, K/32]), w = scale*q + low."""
Q8Source = tuple[torch.Tensor, torch.Tensor]
"""A GGUF Q8_0 matrix: (q int8 [N, K], scale fp32 [N, K/32]), w = scale * q."""

_logged_fallbacks: set[tuple[int, int, int]] = set()


@dataclass(frozen=True)
class QuantConfig:
    """How to store a span's or a head's matrices: ``none`` (as built), ``int8`` or ``int4``.

    ``group_size`` (int4 only): inputs per scale/zero, one of 32, 64, 128, 256; None: ``DEFAULT_GROUP``
    for weights quantized from floats (GGUF Q4 sources always keep their 32)."""

    mode: str = "none"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise ConfigError(f"unknown quantization mode {self.mode!r}; choose one of {', '.join(QUANT_MODES)}")
        if self.group_size is not None:
            if self.mode != "int4":
                raise ConfigError(f"a group size applies to int4 only, not to mode {self.mode!r}")
            if self.group_size not in qm.INT4_GROUPS:
                raise ConfigError(
                    f"int4 group size must be one of {', '.join(map(str, qm.INT4_GROUPS))}, got {self.group_size}"
                )

    @property
    def takes_gguf_q4(self) -> bool:
        """Whether GGUF Q4_0/Q4_1 weights become int4 as they are (int4 with the group size left to the source
        or equal to theirs), rather than being re-quantized."""
        return self.mode == "int4" and self.group_size in (None, GGUF_GROUP)

    @property
    def group(self) -> int:
        """The int4 group size for weights quantized from floats."""
        return self.group_size or DEFAULT_GROUP


# ---- the transform ----------------------------------------------------------------------------------------


def _check_source(source: tuple[torch.Tensor, ...], n: int, k: int, where: str) -> None:
    q, scale = source[0], source[1]
    if tuple(q.shape) != (n, k) or scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise ConfigError(f"{where}: a quantized source of shape {tuple(q.shape)} with {tuple(scale.shape)} "
                          f"scales does not fit [{n}, {k}]")


def _int8_fallback(n: int, k: int, group: int) -> None:
    if (n, k, group) not in _logged_fallbacks:
        _logged_fallbacks.add((n, k, group))
        log.debug("int4 cannot hold a [%d, %d] matrix in groups of %d: stored as int8", n, k, group)


def quantize_matrix(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: QuantConfig,
    source: Q4Source | Q8Source | None = None,
    where: str = "matrix",
    method: str = SPAN_INT4_METHOD,
) -> Int8Linear | Int4Linear:
    """weight [N, K] (+ bias [N]) as an Int8Linear / Int4Linear (config.mode int8 / int4).

    ``source``, when given and of the mode's kind (a Q4 triple for int4, a Q8 pair for int8), is used
    directly; otherwise ``weight`` (the float values) is quantized. int4 shapes the kernel cannot take
    become int8 (from the source's dequantized values when there is one)."""
    n, k = weight.shape
    kind = weight.device.type
    if source is not None:
        _check_source(source, n, k, where)
        source = tuple(t.to(weight.device) for t in source)  # type: ignore[assignment]  # the same arity
    if config.mode == "int8":
        if source is not None and len(source) == 2:
            return Int8Linear.from_q8(source[0], source[1], bias)
        return Int8Linear.from_float(weight, bias)
    if source is not None and len(source) == 3:
        q, scale, low = source
        group = k // scale.shape[1]
        if int4_supported(n, k, group, kind):
            return Int4Linear.from_q4(q, scale, low, bias)
        _int8_fallback(n, k, group)
        w = (q.float().view(n, -1, group) * scale.float()[:, :, None] + low.float()[:, :, None]).view(n, k)
        return Int8Linear.from_float(w, bias)
    if int4_supported(n, k, config.group, kind):
        return Int4Linear.from_float(weight, bias, config.group, method)
    _int8_fallback(n, k, config.group)
    return Int8Linear.from_float(weight, bias)


def quantize_linear(
    linear: Linear,
    config: QuantConfig,
    source: Q4Source | Q8Source | None = None,
    where: str = "matrix",
    method: str = SPAN_INT4_METHOD,
) -> nn.Module:
    """The quantized replacement of an ``ops.Linear`` (``linear`` itself for mode none): ``quantize_matrix``."""
    if config.mode == "none":
        return linear
    return quantize_matrix(linear.weight, linear.bias, config, source, where, method)


def quant_device_facts(device: torch.device, probe: bool = True) -> QuantDeviceFacts:
    """What ``quant_support`` needs to know of ``device`` (on CUDA: asks the GPU and, with ``probe``, checks the
    int4 packer's layout once per device when the GPU could run int4 at all)."""
    if device.type != "cuda":
        return QuantDeviceFacts(device.type, device.type)
    device = resolve_device(device)  # a ConfigError where this machine has no such GPU
    facts = QuantDeviceFacts(
        "cuda", device_label(device), capability=torch.cuda.get_device_capability(device),
        bf16=torch.cuda.is_bf16_supported(), rocm=torch.version.hip is not None,
    )
    if probe and quant_refusal("int4", facts) is None and not tinygemm.layout_ok(device):
        facts = replace(facts, layout_ok=False)
    return facts


def check_quant_device(device: torch.device | str, mode: str) -> None:
    """Refuse ``--quant mode`` on a device that cannot hold it (a one-line ConfigError naming the fix)."""
    dev = torch.device(device)
    if mode == "none" or dev.type == "cpu":
        return
    reason = quant_refusal(mode, quant_device_facts(dev, probe=mode == "int4"))
    if reason is not None:
        raise ConfigError(reason)


def quantize_span(
    span: BlockSpan, config: QuantConfig, sources: Mapping[tuple[int, str], Q4Source | Q8Source] | None = None
) -> BlockSpan:
    """Replace every ``Linear`` of every block of ``span`` (a ``BlockSpan``) in place; returns the span.

    ``sources`` maps (model block index, "qkv" | "o" | "gate_up" | "down") to GGUF decompositions to use
    directly (q|k|v and gate|up rows already fused, q/k un-permuted); keys of other blocks are ignored."""
    if config.mode == "none":
        return span
    check_quant_device(span.device, config.mode)
    for layer in span.layers:
        if isinstance(layer, TransformerBlock):  # always (narrows nn.ModuleList's nn.Module for the checker)
            quantize_block(layer, config, sources)
    return span


def quantize_block(
    layer: TransformerBlock, config: QuantConfig, sources: Mapping[tuple[int, str], Q4Source | Q8Source] | None = None
) -> TransformerBlock:
    """``quantize_span`` for one block (loaders quantize each block as soon as it is built)."""
    if config.mode == "none":
        return layer
    check_quant_device(layer.input_norm.device, config.mode)
    sources = sources or {}
    for name in BLOCK_LINEARS:
        module = getattr(layer, name)
        if isinstance(module, Linear):
            source = sources.get((layer.index, name))
            setattr(layer, name, quantize_linear(module, config, source, f"block {layer.index} {name}"))
    return layer


def quantize_head(
    head: ClientHead, config: QuantConfig, sources: Mapping[str, Q4Source | Q8Source] | None = None
) -> ClientHead:
    """Quantize a ``ClientHead`` in place (its LM head in the config's mode); returns the head.

    With tied embeddings the embedding reads the quantized LM head itself: one table, int8 or int4. For
    an int4 head that means int4 token rows; measured on SmolLM2 (ppl 29.13 shared vs 29.20 with its own
    int8 table) they cost nothing, and 16 MB beat 44 MB. Untied, the embedding table becomes its own int8
    table. ``sources`` may hold "output" and "embedding" GGUF decompositions (Q4 triples or Q8 pairs),
    used as in ``quantize_matrix``."""
    if config.mode == "none":
        return head
    check_quant_device(head.norm.device, config.mode)
    sources = sources or {}
    tied = head.spec.tie_word_embeddings
    if isinstance(head.output, Linear):
        head.output = quantize_linear(head.output, config, sources.get("output"), "LM head", HEAD_INT4_METHOD)
    if isinstance(head.embedding, Embedding):
        if tied:
            table = head.output
            if not isinstance(table, (Int8Linear, Int4Linear)):
                raise ConfigError(f"a tied embedding needs a quantized LM head, not a {type(table).__name__}")
        else:
            table = quantize_matrix(head.embedding.weight, None, QuantConfig("int8"), sources.get("embedding"),
                                    "embedding")
        head.embedding = QuantEmbedding(table, head.dtype)
    return head


# ---- bytes --------------------------------------------------------------------------------------------------


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each distinct tensor counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def linear_weight_bytes(out_features: int, in_features: int, bias: bool, config: QuantConfig, dtype_bytes: int,
                        group: int | None = None, device_type: str = "cpu") -> int:
    """Bytes ``quantize_linear`` leaves for an [out, in] ``Linear`` on a ``device_type`` device (``group``: a GGUF
    source's, else the config's). CUDA's tinygemm int32 tiles hold N * K / 2 bytes, as the CPU pack."""
    n, k = out_features, in_features
    b = n * dtype_bytes if bias else 0
    if config.mode == "none":
        return n * k * dtype_bytes + b
    g = group or config.group
    if config.mode == "int4" and int4_supported(n, k, g, device_type):
        return n * k // 2 + (k // g) * n * 2 * 2 + b  # packed nibbles + bf16 (scale, zero) per group
    return n * k + n * 2 + b  # int8 + a bf16 scale per row


def block_weight_bytes(spec: ModelSpec, config: QuantConfig, dtype_bytes: int, group: int | None = None,
                       device_type: str = "cpu") -> int:
    """Bytes of one block after ``quantize_span`` on a ``device_type`` device (``group``=32 for GGUF Q4 sources);
    builds no tensors."""
    h, i, qs = spec.hidden_size, spec.intermediate_size, spec.q_size
    norms = 2 * h + (2 * spec.head_dim if spec.qk_norm else 0)

    def lin(n: int, k: int, bias: bool) -> int:
        return linear_weight_bytes(n, k, bias, config, dtype_bytes, group, device_type)

    return (norms * dtype_bytes + lin(qs + 2 * spec.kv_size, h, spec.attention_bias) + lin(h, qs, spec.o_proj_bias)
            + lin(2 * i, h, spec.mlp_bias) + lin(h, i, spec.mlp_bias))


def head_weight_bytes(spec: ModelSpec, config: QuantConfig, dtype_bytes: int, group: int | None = None,
                      device_type: str = "cpu") -> int:
    """Bytes of a ``ClientHead`` after ``quantize_head``: final norm, LM head, and the embedding table
    unless it is the (tied) head itself; builds no tensors."""
    v, h = spec.vocab_size, spec.hidden_size
    output = linear_weight_bytes(v, h, False, config, dtype_bytes, group, device_type)
    if spec.tie_word_embeddings:
        embedding = 0
    elif config.mode == "none":
        embedding = v * h * dtype_bytes
    else:
        embedding = linear_weight_bytes(v, h, False, QuantConfig("int8"), dtype_bytes, device_type=device_type)
    return h * dtype_bytes + output + embedding
