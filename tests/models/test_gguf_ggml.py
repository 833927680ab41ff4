"""ggml tensor formats (``models.ggml``) against outside references: the ``gguf`` package's own quantizer and
dequantizer (llama.cpp's reference Python implementation) and transformers' inverse of llama.cpp's q/k permutation.

Random float tensors are quantized with ``gguf.quants.quantize``; our torch dequantizer must give the very same
float32 values as ``gguf.quants.dequantize`` (bit-exact), the Q4/Q8 decompositions must rebuild them exactly,
row gathers and concatenations must commute with dequantization, and other types must go through gguf's decoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from meshinfer.errors import UnsupportedModelError
from meshinfer.models.ggml import (
    GgmlTensor,
    cat_rows,
    container,
    is_supported_type,
    permute_rows,
    q4_decompose,
    q8_decompose,
    unpermute_rows,
)

QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _encode(values: np.ndarray, name: str) -> GgmlTensor:
    raw = np.ascontiguousarray(quantize(values, GGMLQuantizationType[name]))
    data = torch.from_numpy(raw.view(np.uint8).reshape(values.shape[0], -1).copy())
    return GgmlTensor(name, tuple(values.shape), data)


def _reference(t: GgmlTensor) -> torch.Tensor:
    raw = t.data.numpy()
    if t.ggml_type in ("F32", "F16"):
        raw = raw.view(np.float32 if t.ggml_type == "F32" else np.float16)
    return torch.from_numpy(np.asarray(dequantize(raw, GGMLQuantizationType[t.ggml_type]), dtype=np.float32))


@pytest.fixture(scope="module")
def values() -> np.ndarray:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    w[3] = 0.0  # an all-zero block: scale 0
    w[5, :32] = 1e-8  # a tiny block
    w[6] *= 50.0  # a large one
    return w


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_dequantize_is_bit_exact_with_gguf(values: np.ndarray, name: str) -> None:
    t = _encode(values, name)
    ours = t.dequantize()
    assert ours.dtype == torch.float32 and tuple(ours.shape) == t.shape
    assert torch.equal(ours, _reference(t)), name
    assert t.nbytes == values.shape[0] * values.shape[1] // GGML_QUANT_SIZES[GGMLQuantizationType[name]][0] * \
        GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]
    assert torch.equal(t.dequantize(torch.bfloat16), _reference(t).to(torch.bfloat16))


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"])
def test_other_types_are_decoded_by_gguf(name: str) -> None:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 0x3C, (4, 2 * size), dtype=np.uint8)  # any fp16 read from these bytes is finite
    t = GgmlTensor(name, (4, 2 * block), torch.from_numpy(raw.copy()))
    expected = torch.from_numpy(np.asarray(dequantize(raw, GGMLQuantizationType[name]), dtype=np.float32))
    assert torch.equal(t.dequantize(), expected.reshape(4, 2 * block))
    assert is_supported_type(name)


def test_unknown_and_undecodable_types_are_refused() -> None:
    assert not is_supported_type("Q8_1") and not is_supported_type("I32") and not is_supported_type("Q9_9")
    with pytest.raises(UnsupportedModelError, match="Q8_1"):
        GgmlTensor("Q8_1", (1, 32), torch.zeros(1, 40, dtype=torch.uint8)).dequantize()
    with pytest.raises(UnsupportedModelError, match="Q9_9"):
        GgmlTensor("Q9_9", (1, 32), torch.zeros(1, 36, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 bytes"):
        GgmlTensor("Q8_0", (2, 32), torch.zeros(2, 33, dtype=torch.uint8))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
def test_q4_decomposition_rebuilds_the_values_exactly(values: np.ndarray, name: str) -> None:
    t = _encode(values, name)
    q, scale, low = q4_decompose(t)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and tuple(q.shape) == t.shape
    assert scale.shape == low.shape == (t.shape[0], t.shape[1] // 32) and scale.dtype == low.dtype == torch.float32
    rebuilt = scale.repeat_interleave(32, dim=1) * q.float() + low.repeat_interleave(32, dim=1)
    assert torch.equal(rebuilt, _reference(t))
    if name == "Q4_0":
        assert torch.equal(low, -8 * scale)


def test_q8_decomposition_rebuilds_the_values_exactly(values: np.ndarray) -> None:
    t = _encode(values, "Q8_0")
    q, scale = q8_decompose(t)
    assert q.dtype == torch.int8 and scale.shape == (t.shape[0], t.shape[1] // 32)
    assert torch.equal(scale.repeat_interleave(32, dim=1) * q.float(), _reference(t))
    with pytest.raises(ValueError):
        q8_decompose(_encode(values, "Q4_0"))


@pytest.mark.parametrize("name", ["F16", "Q8_0", "Q4_1", "Q5_0"])
def test_row_gather_and_concatenation_work_on_raw_bytes(values: np.ndarray, name: str) -> None:
    t = _encode(values, name)
    index = torch.tensor([5, 0, 47, 5, 12])
    assert torch.equal(t.take_rows(index).dequantize(), t.dequantize()[index])
    a, b = _encode(values[:10], name), _encode(values[10:], name)
    assert torch.equal(cat_rows([a, b]).data, t.data) and cat_rows([a, b]).shape == t.shape
    with pytest.raises(ValueError):
        cat_rows([a, _encode(values[:, :128], name)])


def test_one_dimensional_float_tensors_gather_elements() -> None:
    v = torch.arange(64, dtype=torch.float32)
    t = GgmlTensor("F32", (64,), v.view(torch.uint8).clone())
    assert torch.equal(t.take_rows(torch.tensor([3, 1])).dequantize(), torch.tensor([3.0, 1.0]))
    assert container("F32", (64,)) == ("F32", (64,)) and container("Q4_1", (8, 64)) == ("U8", (8, 40))


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("rows", "heads"), [(576, 9), (192, 3), (64, 4), (8, 1)])
def test_unpermute_matches_llama_cpp_and_transformers(rows: int, heads: int) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((rows, 5)).astype(np.float32)
    permuted = _llama_cpp_permute(w, heads)
    assert np.array_equal(w[permute_rows(rows, heads).numpy()], permuted)
    assert np.array_equal(permuted[unpermute_rows(rows, heads).numpy()], w)
    reference = LlamaTensorProcessor()._reverse_permute_weights(permuted, heads, heads)
    assert np.array_equal(permuted[unpermute_rows(rows, heads).numpy()], reference)
    with pytest.raises(ValueError):
        unpermute_rows(rows + 1, heads)
