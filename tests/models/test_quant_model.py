"""Quantized spans and heads of every tiny checkpoint (``quantize_span`` / ``quantize_head``).

For each family/variant and mode (int8, int4):
- against its *grid twin*, an fp32 model whose dense weights are the quantized model's own dequantized
  weights: the same math but for bf16 rounding of the activations the kernels see, so logits agree to
  ~1% of their spread, and prefill, decode and the LM head all go through the quantized modules;
- against the fp32 model: logits within the stated quantization error. Random tiny models have no redundancy
  and amplify every perturbation (a dense bf16 copy is already 2-4% off in rel. RMS of logits), and 16 levels
  per group of Gaussian weights are ~7% off per matrix: measured int8 3.5-7.6%, int4 30-60%; bounds 10% / 75%
  (a broken model is ~140%);
- ``forward_batch`` (ragged, decode steps + prefill chunks, small and large token counts) equals per-item
  ``forward``; a bf16 span gives the fp32 span's outputs to bf16 precision; ``weight_bytes`` of each block and
  of the head equals ``block_weight_bytes`` / ``head_weight_bytes``; GGUF Q4 sources are used as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from meshinfer.errors import ConfigError
from meshinfer.models import hugepages, quant_math
from meshinfer.models.engine import LocalModel
from meshinfer.models.ops import Linear
from meshinfer.models.quant import (
    BLOCK_LINEARS,
    GEMV_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    QuantConfig,
    QuantEmbedding,
    block_weight_bytes,
    head_weight_bytes,
    quantize_head,
    quantize_span,
    weight_bytes,
)
from meshinfer.testing.checkpoints import list_tiny_checkpoints

pytestmark = pytest.mark.skipif(not quant_math.int4_layout_known(), reason="unknown int4 pack layout on this CPU")

VARIANTS = list_tiny_checkpoints()
MODES = ["int8", "int4"]
PROMPT = [1, 45, 300, 77, 12, 401, 99, 250, 18, 333, 64, 7, 5, 6, 200, 201]
VS_FP32 = {"int8": 0.10, "int4": 0.75}  # rel. RMS of logits vs the fp32 model (measured max 0.076 / 0.60)
VS_TWIN = 0.03  # rel. RMS of logits vs the grid twin: bf16 activations only (measured max 0.020)
VS_TWIN_ROW = 0.08  # the same for one position's logits (decode steps; measured max 0.054)


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def _quantized(path: Path, mode: str, dtype: str = "float32") -> LocalModel:
    model = LocalModel.from_pretrained(path, dtype=dtype)
    quantize_span(model.span, QuantConfig(mode))
    quantize_head(model.head, QuantConfig(mode))
    return model


def _grid_twin(path: Path, q: LocalModel) -> LocalModel:
    """A dense fp32 model holding ``q``'s dequantized weights (q may be a bf16 model)."""
    twin = LocalModel.from_pretrained(path)
    with torch.no_grad():
        for dense, quantized in zip(twin.span.layers, q.span.layers, strict=True):
            for name in BLOCK_LINEARS:
                getattr(dense, name).weight.copy_(getattr(quantized, name).dequantize())
        twin.head.output.weight.copy_(q.head.output.dequantize())
        if not twin.spec.tie_word_embeddings:
            twin.head.embedding.weight.copy_(q.head.embedding.table.dequantize())
    return twin


@pytest.fixture(scope="module", params=[(v, m) for v in VARIANTS for m in MODES],
                ids=[f"{f}-{v}-{m}" for f, v in VARIANTS for m in MODES])
def case(request: pytest.FixtureRequest, tiny_checkpoints, our_model) -> tuple[LocalModel, LocalModel, LocalModel]:
    """(quantized, its grid twin, the fp32 model)."""
    variant, mode = request.param
    path = tiny_checkpoints[variant]
    q = _quantized(path, mode)
    return q, _grid_twin(path, q), our_model(path)


def test_modules_are_replaced(case) -> None:
    q, _, _ = case
    for layer in q.span.layers:
        assert not any(isinstance(getattr(layer, n), Linear) for n in BLOCK_LINEARS)
    assert isinstance(q.head.output, Int8Linear | Int4Linear)
    assert isinstance(q.head.embedding, QuantEmbedding)
    if q.spec.tie_word_embeddings:
        assert q.head.embedding.table is q.head.output  # the table is stored once


def test_prefill_logits_match_the_grid_twin_and_stay_near_fp32(case) -> None:
    q, twin, fp32 = case
    logits = q.prefill_logits(PROMPT)  # 16 rows: the kernels
    assert _rel_rms(logits, twin.prefill_logits(PROMPT)) < VS_TWIN
    mode = "int8" if isinstance(q.span.layers[0].qkv, Int8Linear) else "int4"
    assert _rel_rms(logits, fp32.prefill_logits(PROMPT)) < VS_FP32[mode]


def test_decode_steps_match_the_grid_twin(case) -> None:
    q, twin, _ = case
    caches = [m.span.new_cache(len(PROMPT) + 8) for m in (q, twin)]
    ids = torch.tensor([PROMPT])
    for _ in range(8):
        a, b = (m._step(ids, c) for m, c in zip((q, twin), caches, strict=True))  # [V] each
        assert _rel_rms(a, b) < VS_TWIN_ROW
        ids = torch.tensor([[int(b.argmax())]])


def test_long_prefill_takes_the_dequantized_path_and_matches(case) -> None:
    q, twin, _ = case
    prompt = (PROMPT * 6)[:90]  # 90 rows > GEMV_MAX_ROWS: dequantize + fp32 GEMM, no bf16 activations
    torch.testing.assert_close(q.prefill_logits(prompt), twin.prefill_logits(prompt), rtol=1e-4, atol=1e-3)


def test_forward_batch_equals_forward_per_item(case) -> None:
    q, _, _ = case
    for lengths in ([1, 1, 5, 2], [30, 1, 41]):  # 9 rows: the kernels; 72 rows: dequantize + GEMM vs kernels
        prefixes = [PROMPT[: 3 + i] for i in range(len(lengths))]
        alone = [q.span.new_cache(64) for _ in lengths]
        batched = [q.span.new_cache(64) for _ in lengths]
        for p, c1, c2 in zip(prefixes, alone, batched, strict=True):  # caches at different lengths
            h = q.head.embed(torch.tensor([p]))
            q.span(h, c1)
            q.span(h, c2)
        hidden = [q.head.embed(torch.tensor([(PROMPT * 3)[:t]]))[0] for t in lengths]  # each [T_i, H]
        ref = [q.span(h[None], c)[0] for h, c in zip(hidden, alone, strict=True)]
        out = q.span.forward_batch(list(zip(hidden, batched, strict=True)))
        for a, b in zip(out, ref, strict=True):
            if sum(lengths) <= GEMV_MAX_ROWS:  # the same kernels on the same rows
                torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * float(b.abs().max()))
            else:  # fp32 activations in the batch, bf16 ones alone
                assert _rel_rms(a, b) < VS_TWIN


def test_weight_bytes_equal_the_estimates(case) -> None:
    q, _, _ = case
    mode = "int8" if isinstance(q.span.layers[0].qkv, Int8Linear) else "int4"
    for layer in q.span.layers:
        assert weight_bytes(layer) == block_weight_bytes(q.spec, QuantConfig(mode), 4)
    assert weight_bytes(q.head) == head_weight_bytes(q.spec, QuantConfig(mode), 4)


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{f}-{v}" for f, v in VARIANTS])
@pytest.mark.parametrize("mode", ["none", *MODES])
def test_bf16_spans_and_estimates(variant: tuple[str, str], mode: str, tiny_checkpoints) -> None:
    path = tiny_checkpoints[variant]
    bf16 = _quantized(path, mode, "bfloat16")
    for layer in bf16.span.layers:
        assert weight_bytes(layer) == block_weight_bytes(bf16.spec, QuantConfig(mode), 2)
    assert weight_bytes(bf16.head) == head_weight_bytes(bf16.spec, QuantConfig(mode), 2)
    if mode == "none":
        return
    # against the fp32 grid twin of the bf16 model's own quantized weights: a bf16 residual stream, norms and
    # activations are all that differ (a dense bf16 model is 2-4% off its fp32 original)
    hidden = bf16.span(bf16.head.embed(torch.tensor([PROMPT])), bf16.span.new_cache(16))
    assert hidden.dtype == torch.bfloat16
    logits = bf16.head.logits(hidden[0])
    assert logits.dtype == torch.float32
    assert _rel_rms(logits, _grid_twin(path, bf16).prefill_logits(PROMPT)) < 0.08


def _q4_source(w: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """gguf's Q4_1 of w as (q, scale, low) and gguf's dequantization of it."""
    n, k = w.shape
    raw = quantize(w.float().numpy(), GGMLQuantizationType.Q4_1)
    blocks = raw.reshape(n, k // 32, 20)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    qs = torch.from_numpy(blocks[..., 4:].copy())
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, k)
    return (q, d, m), torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_1).reshape(n, k).copy())


@pytest.mark.parametrize("variant", [("llama", "default"), ("mistral", "default"), ("qwen2", "default")],
                         ids=["llama", "mistral", "qwen2"])
def test_gguf_sources_are_used_as_they_are(variant: tuple[str, str], tiny_checkpoints) -> None:
    model = LocalModel.from_pretrained(tiny_checkpoints[variant])
    sources, references = {}, {}
    for layer in model.span.layers:
        for name in BLOCK_LINEARS:
            w = getattr(layer, name).weight
            if w.shape[1] % 32 == 0:  # mistral's down (K = 176) has no Q4 form: quantized from floats
                sources[(layer.index, name)], references[(layer.index, name)] = _q4_source(w)
    sources[(99, "qkv")] = sources[(0, "qkv")]  # a block outside the span: ignored
    quantize_span(model.span, QuantConfig("int4", 64), sources)
    for layer in model.span.layers:
        for name in BLOCK_LINEARS:
            module = getattr(layer, name)
            ref = references.get((layer.index, name))
            if ref is None:
                assert isinstance(module, Int8Linear | Int4Linear)
                continue
            assert isinstance(module, Int4Linear) and module.group_size == 32  # native groups kept
            torch.testing.assert_close(module.dequantize(), ref, rtol=0, atol=float(ref.abs().max()) * 2**-6)
    assert model.generate(PROMPT, 4, stop_token_ids=())  # it runs


def test_mode_none_changes_nothing_and_bad_input_is_one_line(tiny_checkpoints) -> None:
    path = tiny_checkpoints[("llama", "default")]
    model = LocalModel.from_pretrained(path)
    before = model.prefill_logits(PROMPT)
    assert quantize_span(model.span, QuantConfig()) is model.span
    assert quantize_head(model.head, QuantConfig()) is model.head
    assert isinstance(model.span.layers[0].qkv, Linear)
    torch.testing.assert_close(model.prefill_logits(PROMPT), before, rtol=0, atol=0)
    bad = {(0, "qkv"): _q4_source(torch.randn(64, 64))[0]}  # qkv is [128, 64]
    with pytest.raises(ConfigError) as err:
        quantize_span(model.span, QuantConfig("int4"), bad)
    assert "block 0 qkv" in str(err.value) and "\n" not in str(err.value)


def test_quantized_span_survives_huge_page_rehoming(tiny_checkpoints) -> None:
    if not hugepages.supported():
        pytest.skip("transparent huge pages unavailable")
    q = _quantized(tiny_checkpoints[("llama", "tied")], "int4")
    before = q.prefill_logits(PROMPT)
    assert hugepages.rehome(q.span, min_bytes=1) > 0 and hugepages.rehome(q.head, min_bytes=1) > 0
    assert q.head.embedding.table is q.head.output
    torch.testing.assert_close(q.prefill_logits(PROMPT), before, rtol=0, atol=0)
