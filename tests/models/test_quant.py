"""Quantized matrices (``models.quant``): int8 / int4 modules against float references and GGUF's own block math.

Each module is checked against (a) a float matmul with its *own* dequantized weight (only bf16 rounding of
activations and outputs separates them) and (b) the original float weight (bounded quantization error).
``from_q4`` / ``from_q8`` are checked against tensors quantized and dequantized by the ``gguf`` package (the
reference implementation of ggml's block formats). Config errors are one line. Whole-model tests live in
``test_quant_model.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from meshinfer.errors import ConfigError
from meshinfer.models import quant, quant_math
from meshinfer.models.quant import (
    GEMV_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    QuantConfig,
    QuantEmbedding,
    quantize_matrix,
    weight_bytes,
)

pytestmark = pytest.mark.skipif(not quant_math.int4_layout_known(), reason="unknown int4 pack layout on this CPU")


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / k**0.5


def _x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def _close_to_own(module: torch.nn.Module, x: torch.Tensor) -> None:
    """module(x) equals x (bf16-rounded, as the kernel sees it) @ its own dequantized weight, up to bf16 output
    rounding (relative 2^-8 of each output, plus accumulation-order noise)."""
    xr = x.to(torch.bfloat16).float() if x.shape[0] <= GEMV_MAX_ROWS else x.float()
    ref = xr @ module.dequantize().t()
    if module.bias is not None:
        ref = ref + module.bias.float()
    y = module(x)
    assert y.dtype == x.dtype and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, rtol=2**-7, atol=2**-7 * float(ref.abs().max()))


# ---- config -----------------------------------------------------------------------------------------------


def test_config_defaults_and_one_line_errors() -> None:
    assert QuantConfig().mode == "none"
    assert QuantConfig("int4").group == quant.DEFAULT_GROUP == 32
    assert QuantConfig("int4", 128).group == 128
    for bad, words in [
        (dict(mode="int3"), ["int3", "none, int8, int4"]),
        (dict(mode="int4", group_size=48), ["48", "32, 64, 128, 256"]),
        (dict(mode="int8", group_size=32), ["int4 only"]),
    ]:
        with pytest.raises(ConfigError) as err:
            QuantConfig(**bad)
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


# ---- int8 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 5, GEMV_MAX_ROWS + 11])  # the kernel, and the dequantize + fp32 GEMM path
def test_int8_linear_matches_its_own_dequantized_weight_and_the_float_one(rows: int) -> None:
    w, bias = _weight(96, 64), torch.randn(96) * 0.1
    m = Int8Linear.from_float(w, bias)
    assert m.weight.dtype == torch.int8 and m.scales.dtype == torch.bfloat16 and m.bias.dtype == torch.float32
    _close_to_own(m, _x(rows, 64))
    # per-channel absmax / 127 rounded up to bf16: nothing clips, every weight within half a step
    step = m.scales.float()[:, None]
    assert torch.all((m.dequantize() - w).abs() <= step / 2 + 1e-7)
    assert torch.all(step >= w.abs().amax(1, keepdim=True) / 127)
    assert _rel_rms(m(_x(rows, 64)), _x(rows, 64) @ w.t() + bias) < 0.01


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_linears_keep_shapes_and_dtypes(kind: str) -> None:
    w = _weight(48, 64)
    m = Int8Linear.from_float(w) if kind == "int8" else Int4Linear.from_float(w, None, 32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in [(2, 3, 64), (64,), (1, 1, 64), (0, 64)]:
            x = _x(6, 64).to(dtype).reshape(-1)[: int(np.prod(shape))].view(shape)
            y = m(x)
            assert y.shape == (*shape[:-1], 48) and y.dtype == dtype
            tol = 0.05 if kind == "int8" else 0.3
            torch.testing.assert_close(y.float(), (x.float() @ w.t()), rtol=tol, atol=tol)


# ---- int4 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["search", "minmax"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 4, GEMV_MAX_ROWS + 3])
def test_int4_linear_matches_its_own_dequantized_weight(method: str, group: int, rows: int) -> None:
    n, k = 80, 256  # 80 = a full 64-row block + a 16-row tail in the AVX512 pack layout
    m = Int4Linear.from_float(_weight(n, k), torch.randn(n) * 0.1, group, method)
    assert m.weight.shape == (n, k // 2) and m.scales_and_zeros.shape == (k // group, n, 2)
    _close_to_own(m, _x(rows, k))


def test_int4_quantization_error_is_bounded_and_search_beats_minmax() -> None:
    w = _weight(256, 512)
    errors = {}
    for method in ("minmax", "search"):
        m = Int4Linear.from_float(w, None, 32, method)
        deq = m.dequantize()
        errors[method] = float((deq - w).pow(2).mean())
        scale = m.scales_and_zeros[..., 0].float().t().repeat_interleave(32, dim=1)  # [N, K]
        if method == "minmax":  # the group's range is covered: round-to-nearest, half a step (+ bf16 slack)
            assert torch.all((deq - w).abs() <= 0.5 * scale + 2**-8 * w.abs().amax())
        # 16 levels over a Gaussian group: relative MSE ~ 1/200 (minmax) .. 1/260 (search)
        assert errors[method] / float(w.pow(2).mean()) < 0.008
        x = _x(3, 512)
        assert _rel_rms(m(x), x @ w.t()) < 0.09
    assert errors["search"] < 0.9 * errors["minmax"], errors


def test_int4_constant_and_zero_groups() -> None:
    w = torch.zeros(16, 64)
    w[1] = 0.25
    w[2, :32] = -1.0
    m = Int4Linear.from_float(w, None, 32)
    torch.testing.assert_close(m.dequantize(), w)


# ---- GGUF blocks ------------------------------------------------------------------------------------------


def _gguf_decompose(raw: np.ndarray, kind: GGMLQuantizationType, n: int, k: int) -> tuple[torch.Tensor, ...]:
    """ggml's block bytes -> (q, scale, low) / (q, scale), as the GGUF room's q4_decompose / q8_decompose give."""
    size = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20, GGMLQuantizationType.Q8_0: 34}[kind]
    blocks = raw.reshape(n, k // 32, size)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))  # [N, K/32]
    if kind == GGMLQuantizationType.Q8_0:
        return torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(n, k)), d
    qs = torch.from_numpy(blocks[..., size - 16:].copy())  # [N, K/32, 16]: element j low nibble, j + 16 high
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, k)
    if kind == GGMLQuantizationType.Q4_1:
        low = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    else:
        low = -8.0 * d
    return q, d, low


def _gguf(w: torch.Tensor, kind: GGMLQuantizationType) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(our decomposition of gguf's quantization of w, gguf's own dequantization) ; checks they agree exactly."""
    n, k = w.shape
    raw = quantize(w.numpy(), kind)
    reference = torch.from_numpy(dequantize(raw, kind).reshape(n, k).astype(np.float32))
    parts = _gguf_decompose(raw, kind, n, k)
    ours = parts[0].float() * parts[1].repeat_interleave(32, dim=1)
    if len(parts) == 3:
        ours = ours + parts[2].repeat_interleave(32, dim=1)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    return parts, reference


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_from_q4_is_gguf_dequantization_up_to_bf16_scale_and_zero(kind: GGMLQuantizationType) -> None:
    w = _weight(144, 256, seed=3) + 0.05  # an offset: Q4_1's `low` is not -8 scale
    (q, scale, low), reference = _gguf(w, kind)
    m = Int4Linear.from_q4(q, scale, low)
    assert m.group_size == 32
    err = (m.dequantize() - reference).abs()  # [N, K]
    # scale and zero = low + 8 scale are rounded to bf16 (8 significant bits, relative error <= 2^-8)
    zero = low + 8 * scale
    bound = ((8 * scale.abs() + zero.abs()) * 2**-8).repeat_interleave(32, dim=1)
    assert torch.all(err <= bound * (1 + 1e-6)), float((err - bound).max())
    if kind == GGMLQuantizationType.Q4_0:  # zero = 0 exactly: only the scale rounds, |q - 8| <= 8 steps of it
        torch.testing.assert_close(m.scales_and_zeros[..., 1].float(), torch.zeros(256 // 32, 144))
    # the error is a small fraction of the Q4 step itself
    assert float(err.max()) < 0.05 * float(scale.max())
    _close_to_own(m, _x(2, 256))


def test_from_q8_requantizes_per_channel() -> None:
    w = _weight(64, 128, seed=4)
    (q, scale), reference = _gguf(w, GGMLQuantizationType.Q8_0)
    m = Int8Linear.from_q8(q, scale, None)
    step = m.scales.float()[:, None]
    assert torch.all((m.dequantize() - reference).abs() <= step / 2 + 1e-7)


def test_unsupported_int4_shapes_fall_back_to_int8() -> None:
    int4 = QuantConfig("int4")
    for n, k, group in [(40, 64, 32), (64, 96, 64), (64, 48, 32)]:  # N % 16, K % group
        with pytest.raises(ConfigError):
            Int4Linear.from_float(_weight(n, k), None, group)
        m = quantize_matrix(_weight(n, k), None, QuantConfig("int4", group))
        assert isinstance(m, Int8Linear)
    # a Q4 source of a shape the kernel cannot take: int8 from its dequantized values
    (q, scale, low), reference = _gguf(_weight(40, 64), GGMLQuantizationType.Q4_1)
    m = quantize_matrix(reference, None, int4, (q, scale, low))
    assert isinstance(m, Int8Linear)
    assert torch.all((m.dequantize() - reference).abs() <= m.scales.float()[:, None] / 2 + 1e-7)
    # sources of the mode's kind are used as they are; of the other kind, the float weight is quantized
    (q, scale, low), reference = _gguf(_weight(64, 64), GGMLQuantizationType.Q4_1)
    assert isinstance(quantize_matrix(reference, None, int4, (q, scale, low)), Int4Linear)
    assert isinstance(quantize_matrix(reference, None, QuantConfig("int8"), (q, scale, low)), Int8Linear)
    with pytest.raises(ConfigError, match="does not fit"):
        quantize_matrix(_weight(64, 128), None, int4, (q, scale, low))


# ---- layout, embeddings, bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [16, 48, 64, 80, 144, 352])
def test_packed_codes_read_back(n: int) -> None:
    k = 64
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    scale, zero = torch.rand(n, 2).bfloat16().float(), torch.randn(n, 2).bfloat16().float()
    packed, sz = quant_math.pack_int4(q, scale, zero)
    assert torch.equal(quant_math.unpack_int4(packed, n, k), q)
    rows = torch.tensor([0, n - 1, n // 2, 15, 0])
    assert torch.equal(quant_math.gather_int4_rows(packed, n, k, rows), q[rows])
    w = (q.float().view(n, 2, 32) - 8) * scale[:, :, None] + zero[:, :, None]  # [N, 2, 32]
    torch.testing.assert_close(quant_math.dequantize_packed_t(packed, sz, n, k, 32).t(), w.view(n, k))


@pytest.mark.parametrize("table", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_embedding_dequantizes_only_the_looked_up_rows(table: str, dtype: torch.dtype) -> None:
    w = _weight(80, 64, seed=5)
    linear = Int8Linear.from_float(w) if table == "int8" else Int4Linear.from_float(w, None, 32)
    emb = QuantEmbedding(linear, dtype)
    ids = torch.tensor([[3, 79, 0], [64, 65, 3]])
    rows = emb(ids)
    assert rows.shape == (2, 3, 64) and rows.dtype == dtype
    torch.testing.assert_close(rows, linear.dequantize()[ids].to(dtype), rtol=0, atol=0)


def test_weight_bytes_counts_shared_tensors_once() -> None:
    m = Int4Linear.from_float(_weight(64, 64), torch.zeros(64), 32)
    own = 64 * 32 + 2 * 64 * 2 * 2 + 64 * 4  # packed nibbles, bf16 (scale, zero) x 2 groups, fp32 bias
    assert weight_bytes(m) == own
    holder = torch.nn.ModuleDict({"head": m, "embedding": QuantEmbedding(m, torch.float32)})
    assert weight_bytes(holder) == own
