"""int8 / int4 weights on a CUDA GPU (torch's kernels: ``_weight_int8pack_mm``, tinygemm's ``_weight_int4pack_mm``).

Skipped without CUDA (and the int4 tests below compute capability 8.0). Checks:
- torch's packer (``_convert_weight_to_int4pack``) writes exactly the int32 tiles ``models.tinygemm.pack``
  builds, for every inner k-tile count (so ``unpack`` / ``rows``, tested on the CPU, read the kernel's layout);
- ``Int8Linear`` / ``Int4Linear`` on CUDA, built from the same codes as the CPU module, against the outside
  reference x @ W^T in fp32 with W the CPU module's dequantized weight, on both sides of the GPU row limits
  (kernel, and chunked dequantize + ``F.linear``). Tolerance: the int4 kernel sees bf16 activations and
  dequantizes each weight with one bf16 fma (2^-9 relative), int8 keeps fp32 activations; both accumulate in
  fp32 and int4 rounds outputs to bf16 (2^-9), so outputs agree within 2^-7 of the largest output, as on the CPU;
- quantizing on the GPU gives the CPU's codes (the same IEEE arithmetic; a few ties may round apart);
- a quantized tiny model generates the CPU model's greedy tokens on CUDA (or parts only where the CPU's own
  logits of both tokens are within 2% of their spread, 10% for bf16 models); its blocks hold
  ``block_weight_bytes(..., device_type="cuda")``;
- loading a quantized span on the GPU keeps peak memory near one float block above the quantized span;
- (printed, not asserted) kernel vs dequantize timings per row count, to place ``CUDA_*_GEMV_MAX_ROWS``.
"""

from __future__ import annotations

import time

import pytest
import torch

from meshinfer.models import quant_math as qm
from meshinfer.models import quant_modules as qmod
from meshinfer.models import tinygemm as tg
from meshinfer.models.quant import (
    BLOCK_LINEARS,
    Int4Linear,
    Int8Linear,
    QuantConfig,
    QuantEmbedding,
    block_weight_bytes,
    weight_bytes,
)

CUDA_OK = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU")]
SM80 = CUDA_OK and torch.cuda.get_device_capability() >= (8, 0) and torch.version.hip is None
needs_sm80 = pytest.mark.skipif(not SM80, reason="int4 (tinygemm) needs an NVIDIA GPU of compute capability 8.0+")
CUDA = torch.device("cuda")


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5


def _close(y: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(y.float().cpu(), reference, rtol=2**-7, atol=2**-7 * float(reference.abs().max()))


@needs_sm80
def test_torch_packer_writes_the_layout_we_read() -> None:
    assert tg.layout_ok(CUDA)
    for n, k in [(8, 32), (24, 576), (256, 1024), (4096, 4096)]:
        q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
        pairs = tg.pair_nibbles(q)
        for inner in (2, 4, 8):
            if k % (inner * 16) == 0:
                got = torch.ops.aten._convert_weight_to_int4pack(pairs.to(CUDA), inner)
                assert torch.equal(got.cpu(), tg.pack(pairs, inner)), (n, k, inner)
                assert torch.equal(tg.unpack(got).cpu(), q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17, 300])  # the kernel (<= CUDA_INT8_GEMV_MAX_ROWS), then chunks
def test_int8_linear_on_cuda_matches_the_cpu_module(rows: int, dtype: torch.dtype) -> None:
    n, k = 1000, 768
    q, scale = qm.quantize_int8(_weight(n, k))
    bias = torch.randn(n) * 0.1
    cpu, gpu = Int8Linear(q, scale, bias), Int8Linear(q.to(CUDA), scale.to(CUDA), bias.to(CUDA))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
    reference = x.float() @ cpu.dequantize().t() + bias
    y = gpu(x.to(CUDA))
    assert y.dtype == dtype and y.device.type == CUDA.type and y.shape == (rows, n)
    _close(y, reference)
    _close(cpu(x), reference)


def test_int8_quantization_on_cuda_gives_the_cpu_codes() -> None:
    w = _weight(512, 1024, seed=4)
    q, scale = qm.quantize_int8(w)
    qg, scale_g = qm.quantize_int8(w.to(CUDA))
    assert torch.equal(scale_g.cpu(), scale)
    assert (qg.cpu() != q).float().mean() < 1e-4


@needs_sm80
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 16, 33, 300])  # tinygemm (<= CUDA_INT4_GEMV_MAX_ROWS), then chunks
@pytest.mark.parametrize(("n", "k", "group"), [(256, 512, 32), (96, 576, 64), (2048, 4096, 128)])
def test_int4_linear_on_cuda_matches_the_cpu_module(n: int, k: int, group: int, rows: int,
                                                    dtype: torch.dtype) -> None:
    q, scale, zero = qm.quantize_int4(_weight(n, k, seed=n), group, "minmax")
    cpu = Int4Linear.from_codes(q, scale, zero, group)
    gpu = Int4Linear.from_codes(q.to(CUDA), scale.to(CUDA), zero.to(CUDA), group)
    assert gpu.layout == "tinygemm" and weight_bytes(gpu) == weight_bytes(cpu)
    w = cpu.dequantize()
    torch.testing.assert_close(gpu.dequantize().cpu(), w, rtol=2**-20, atol=0)  # the same codes, scales, zeros
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
    xr = x.bfloat16().float() if rows <= qmod.CUDA_INT4_GEMV_MAX_ROWS else x.float()  # what the kernel sees
    y = gpu(x.to(CUDA))
    assert y.dtype == dtype and y.shape == (rows, n)
    _close(y, xr @ w.t())


@needs_sm80
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_embedding_rows_on_cuda_equal_the_cpu_rows(kind: str) -> None:
    w = _weight(512, 256, seed=9)
    codes = qm.quantize_int8(w) if kind == "int8" else qm.quantize_int4(w, 32)  # one quantization for both

    def make(device: torch.device) -> Int8Linear | Int4Linear:
        on = [t.to(device) for t in codes]
        return Int8Linear(on[0], on[1]) if kind == "int8" else Int4Linear.from_codes(on[0], on[1], on[2], 32)

    cpu, gpu = QuantEmbedding(make(torch.device("cpu")), torch.bfloat16), QuantEmbedding(make(CUDA), torch.bfloat16)
    ids = torch.tensor([[0, 511, 77], [3, 3, 300]])
    out = gpu(ids.to(CUDA))
    assert out.device.type == CUDA.type and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.cpu(), cpu(ids), rtol=2**-7, atol=1e-6)


def _greedy_agrees(cpu_model, tokens_cpu: list[int], tokens_gpu: list[int], prompt: list[int],
                   near: float) -> None:
    """Equal tokens, or a first difference where the CPU's own logits of both tokens are within ``near`` of
    their spread (random tiny models have steps with top-2 margins of 0.3% of the spread)."""
    for i, (a, b) in enumerate(zip(tokens_cpu, tokens_gpu, strict=True)):
        if a != b:
            logits = cpu_model.prefill_logits(prompt + tokens_cpu[:i])[-1]
            spread = float(logits.max() - logits.min())
            assert float(logits[a] - logits[b]) < near * spread, (i, a, b, float(logits[a] - logits[b]) / spread)
            return


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_tiny_model_greedy_tokens_on_cuda_match_cpu(mode: str, dtype: str, tiny_checkpoints) -> None:
    from meshinfer.models.engine import LocalModel

    if mode == "int4" and not SM80:
        pytest.skip("int4 needs sm80+")
    prompt = [1, 45, 300, 77, 12, 401, 99, 250]
    for variant in [("llama", "default"), ("llama", "tied"), ("qwen3", "default")]:
        path = tiny_checkpoints[variant]
        cpu = LocalModel.from_pretrained(path, dtype=dtype, quant=mode)
        gpu = LocalModel.from_pretrained(path, dtype=dtype, device="cuda", quant=mode)
        layer = gpu.span.layers[0]
        assert all(getattr(layer, n).weight.device.type == "cuda" for n in BLOCK_LINEARS)
        size = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        assert weight_bytes(layer) == block_weight_bytes(gpu.spec, QuantConfig(mode), size, device_type="cuda")
        near = 0.02 if dtype == "float32" else 0.1  # bf16 spans: every activation rounded, by other kernels
        _greedy_agrees(cpu, cpu.generate(prompt, 12, stop_token_ids=[]), gpu.generate(prompt, 12, stop_token_ids=[]),
                       prompt, near)


@pytest.mark.slow
@needs_sm80
def test_loading_a_quantized_span_on_cuda_holds_about_one_float_block_extra() -> None:
    from meshinfer.models.checkpoint import Checkpoint
    from meshinfer.testing.checkpoints import bench_checkpoint
    from meshinfer.types import BlockRange

    ckpt = Checkpoint(bench_checkpoint())
    blocks = BlockRange(0, ckpt.spec.num_blocks)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    span = ckpt.load_span(blocks, "bfloat16", "cuda", quant=QuantConfig("int4"))
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    extra = torch.cuda.max_memory_allocated() - base - held
    fp_span = ckpt.spec.num_blocks * block_weight_bytes(ckpt.spec, QuantConfig(), 2)
    print(f"\nint4 span held {held / 2**20:.1f} MiB, load peak {extra / 2**20:.1f} MiB above it, "
          f"bf16 span {fp_span / 2**20:.1f} MiB")
    assert held >= sum(weight_bytes(layer) for layer in span.layers)
    assert extra < fp_span / 2  # never the whole span in bf16: one float block plus quantizer temporaries


def _time(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


@needs_sm80
def test_print_kernel_vs_dequantize_timings() -> None:
    n, k = 4096, 4096
    w = _weight(n, k).to(CUDA)
    i8, i4 = Int8Linear.from_float(w), Int4Linear.from_float(w, None, 64, "minmax")
    dense = w.bfloat16()
    print(f"\n[{n}x{k}] ms per call: rows | bf16 F.linear | int8 kernel | int8 dequant | int4 tinygemm | int4 dequant")
    for rows in (1, 2, 4, 8, 16, 32, 64, 128, 512):
        x = torch.randn(rows, k, device=CUDA, dtype=torch.bfloat16)
        calls = (
            lambda x: torch.nn.functional.linear(x, dense),
            lambda x: torch.ops.aten._weight_int8pack_mm(x, i8.weight, i8.scales),
            lambda x: qmod.chunked_linear(x, n, k, 1, i8._part),
            lambda x: torch.ops.aten._weight_int4pack_mm(x, i4.weight, 64, i4.scales_and_zeros),
            lambda x: qmod.chunked_linear(x, n, k, 8, i4._part),
        )
        ms = [1e3 * _time(lambda f=f, x=x: f(x)) for f in calls]
        print(f"{rows:5d} | " + " | ".join(f"{m:.4f}" for m in ms))
