"""torch's CUDA int4 layout (``models.tinygemm``) and the GPU-side paths of the quantized modules, run on the CPU.

- ``pack`` (written from the packer kernel) and ``unpack`` / ``rows`` (written from the matmul kernel's B-fragment
  reads) round-trip exactly, for several shapes and every inner k-tile count, and agree with the layout formula
  of the module docstring checked word by word in plain Python (a third reading of int4mm.cu);
- an ``Int4Linear`` in the tinygemm layout, built here on the CPU from ``quant_math``'s codes, dequantizes
  (whole, by rows, by n-tile chunks) to exactly ``quant_math.dequantize_int4`` of those codes, for several
  shapes and group sizes; its above-the-row-limit forward (chunks dequantized in x's dtype + ``F.linear``) and
  ``Int8Linear``'s GPU chunk path match x @ the dequantized weight;
- ``quant_support``'s device rules (pure) and ``check_quant_device`` on this machine: MPS refused, CUDA without
  a GPU a clear ConfigError, int4 on pre-Ampere / ROCm / an unknown layout refused naming ``--quant int8``;
- byte counts per device type equal what the modules hold.
"""

from __future__ import annotations

import pytest
import torch

from meshinfer.errors import ConfigError
from meshinfer.models import quant_math as qm
from meshinfer.models import quant_modules
from meshinfer.models import tinygemm as tg
from meshinfer.models.quant import (
    Int4Linear,
    Int8Linear,
    QuantConfig,
    QuantEmbedding,
    check_quant_device,
    linear_weight_bytes,
    weight_bytes,
)
from meshinfer.models.quant_modules import chunked_linear
from meshinfer.models.quant_support import QuantDeviceFacts, int4_shape_fits, quant_refusal

SHAPES = [(8, 32), (16, 64), (24, 128), (40, 576), (64, 1536)]


def _codes(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _inners(k: int) -> list[int]:
    return [i for i in (2, 4, 8) if k % (i * 16) == 0]


# ---- the layout -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_pack_unpack_round_trip_for_every_inner_k_tiles(n: int, k: int) -> None:
    q = _codes(n, k, seed=n + k)
    pairs = tg.pair_nibbles(q)
    assert pairs.shape == (n, k // 2) and torch.equal(pairs[:, 0], q[:, 0] << 4 | q[:, 1])  # even k high
    assert tg.inner_k_tiles(k) == max(_inners(k))
    for inner in _inners(k):
        words = tg.pack(pairs, inner)
        assert words.shape == (n // 8, k // (inner * 16), 32, inner // 2) and words.dtype == torch.int32
        assert torch.equal(tg.unpack(words), q)
        ids = torch.tensor([n - 1, 0, 7, n // 2, 0])
        assert torch.equal(tg.rows(words, ids), q[ids])
        if n >= 16:  # a slice of n-tiles reads just its rows (the GPU's chunked dequantization)
            assert torch.equal(tg.unpack(words[1:2]), q[8:16])


def test_words_follow_the_documented_formula() -> None:
    n, k = 16, 128
    q = _codes(n, k, seed=3)
    for inner in (2, 4, 8):
        words = tg.pack(tg.pair_nibbles(q), inner)
        for nt in range(n // 8):
            for ko in range(k // (inner * 16)):
                for t in (0, 5, 18, 31):
                    for j in range(inner // 2):
                        word = int(words[nt, ko, t, j]) & 0xFFFFFFFF
                        for s in range(8):
                            e, h, f = s >> 2, (s >> 1) & 1, s & 1
                            row = 8 * nt + t // 4
                            col = 16 * (ko * inner + 2 * j + h) + 8 * f + 2 * (t % 4) + e
                            assert (word >> (4 * s)) & 15 == int(q[row, col]), (inner, nt, ko, t, j, s)


def test_inner_k_tiles_needs_k_multiple_of_32() -> None:
    assert [tg.inner_k_tiles(k) for k in (32, 64, 96, 128, 576)] == [2, 4, 2, 8, 4]
    with pytest.raises(ValueError):
        tg.inner_k_tiles(48)


# ---- the modules in the tinygemm layout ---------------------------------------------------------------------


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize(("n", "k"), [(8, 256), (24, 512), (48, 768)])
def test_tinygemm_module_dequantizes_exactly_as_quant_math(n: int, k: int, group: int) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(group)) / k**0.5
    q, scale, zero = qm.quantize_int4(w, group, "minmax")
    m = Int4Linear.from_codes(q, scale, zero, group, layout="tinygemm")
    assert m.layout == "tinygemm" and m.weight.dim() == 4
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16)
    reference = qm.dequantize_int4(q, sz, group)  # [N, K] fp32
    assert torch.equal(m.dequantize(), reference)
    ids = torch.tensor([n - 1, 0, 3, n - 1])
    assert torch.equal(m.rows(ids), reference[ids])
    for a, b in [(0, 8), (8, n)]:  # an n-tile chunk in fp32: the same values, (q - 8) * s + z vs q * s + (z - 8 s)
        codes = tg.unpack(m.weight[a // 8: b // 8])
        chunk = tg.dequantize(codes, m.scales_and_zeros[:, a:b], group, torch.float32)
        torch.testing.assert_close(chunk, reference[a:b], rtol=2**-20, atol=0)
    if int4_shape_fits("cpu", n, k, group) and qm.int4_layout_known():  # the CPU layout holds the same matrix
        torch.testing.assert_close(Int4Linear.from_codes(q, scale, zero, group).dequantize(), reference,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tinygemm_chunked_forward_matches_its_dequantized_weight(dtype: torch.dtype,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    n, k, rows = 40, 128, quant_modules.CUDA_INT4_GEMV_MAX_ROWS + 9  # above the limit: the dequantizing path
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7)) / k**0.5
    bias = torch.randn(n) * 0.1
    m = Int4Linear.from_float(w, bias, 32, layout="tinygemm")
    x = torch.randn(2, rows, k, generator=torch.Generator().manual_seed(8)).to(dtype)
    reference = x.float() @ m.dequantize().t() + bias
    monkeypatch.setattr(quant_modules, "DEQUANT_CHUNK_BYTES", 16 * k * x.element_size())  # 3 chunks of 16 rows
    y = m(x)
    assert y.dtype == dtype and y.shape == (2, rows, n)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(y.float(), reference, rtol=tol, atol=tol * float(reference.abs().max()))
    empty = m(x[:, :0])  # no rows: never the kernel (a GPU grid of no blocks cannot launch)
    assert empty.shape == (2, 0, n) and empty.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_gpu_chunk_path_matches_its_dequantized_weight(dtype: torch.dtype) -> None:
    n, k = 72, 96
    m = Int8Linear.from_float(torch.randn(n, k, generator=torch.Generator().manual_seed(9)) / k**0.5)
    x = torch.randn(30, k, generator=torch.Generator().manual_seed(10)).to(dtype)
    reference = x.float() @ m.dequantize().t()
    y = chunked_linear(x, n, k, 1, m._part)  # what a GPU call above CUDA_INT8_GEMV_MAX_ROWS runs
    assert y.dtype == dtype and y.shape == (30, n)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(y.float(), reference, rtol=tol, atol=tol * float(reference.abs().max()))
    assert isinstance(quant_modules.cuda_int8_kernel(), bool)  # False on CPU-only builds: every call dequantizes
    small = chunked_linear(x, n, k, 8, lambda x, a, b: torch.full((x.shape[0], b - a), float(a), dtype=x.dtype))
    assert small.shape == (30, n)  # one chunk: the whole matrix fits DEQUANT_CHUNK_BYTES


def test_tinygemm_embedding_and_bytes() -> None:
    n, k = 24, 64  # N % 16 != 0: int8 on the CPU, int4 on CUDA
    m = Int4Linear.from_float(torch.randn(n, k) / 8, None, 32, layout="tinygemm")
    emb = QuantEmbedding(m, torch.bfloat16)
    ids = torch.tensor([[3, 23], [0, 3]])
    torch.testing.assert_close(emb(ids), m.dequantize()[ids].bfloat16(), rtol=0, atol=0)
    int4 = QuantConfig("int4")
    assert weight_bytes(m) == linear_weight_bytes(n, k, False, int4, 4, device_type="cuda") == n * k // 2 + 2 * n * 4
    assert linear_weight_bytes(n, k, False, int4, 4, device_type="cpu") == n * k + 2 * n  # int8 there
    with pytest.raises(ConfigError, match="int4 cannot hold"):
        Int4Linear.from_float(torch.randn(20, 64), None, 32, layout="tinygemm")


# ---- device support ---------------------------------------------------------------------------------------


def test_quant_refusal_rules() -> None:
    h200 = QuantDeviceFacts("cuda", "NVIDIA H200", capability=(9, 0))
    t4 = QuantDeviceFacts("cuda", "Tesla T4", capability=(7, 5), bf16=False)
    for mode in ("none", "int8", "int4"):
        assert quant_refusal(mode, QuantDeviceFacts("cpu")) is None
        assert quant_refusal(mode, h200) is None
    assert quant_refusal("int8", t4) is None
    cases = [
        ("int8", QuantDeviceFacts("mps", "Apple MPS"), ["Apple MPS", "--quant none", "--device cpu"]),
        ("int4", QuantDeviceFacts("mps", "Apple MPS"), ["Apple MPS", "--quant none"]),
        ("int4", t4, ["8.0", "Tesla T4", "7.5", "--quant int8"]),
        ("int4", QuantDeviceFacts("cuda", "A100", capability=(8, 0), bf16=False), ["--quant int8"]),
        ("int4", QuantDeviceFacts("cuda", "MI300X", capability=(9, 4), rocm=True), ["ROCm", "--quant int8"]),
        ("int4", QuantDeviceFacts("cuda", "H100", capability=(9, 0), layout_ok=False), ["packer", "--quant int8"]),
    ]
    for mode, facts, words in cases:
        reason = quant_refusal(mode, facts)
        assert reason is not None and "\n" not in reason and all(w in reason for w in words), reason
    assert quant_refusal("none", QuantDeviceFacts("mps")) is None


def test_int4_shape_rules_per_device() -> None:
    assert int4_shape_fits("cuda", 24, 64, 32) and not int4_shape_fits("cpu", 24, 64, 32)
    assert int4_shape_fits("cpu", 32, 64, 32) and int4_shape_fits("cuda", 32, 64, 64)
    assert not int4_shape_fits("cuda", 20, 64, 32)  # N % 8
    assert not int4_shape_fits("cuda", 32, 96, 64)  # K % group
    assert not int4_shape_fits("cuda", 32, 64, 16)  # no such group


def test_check_quant_device_on_this_machine() -> None:
    for mode in ("none", "int8", "int4"):
        check_quant_device("cpu", mode)
    check_quant_device("mps", "none")
    with pytest.raises(ConfigError, match="--quant none or --device cpu") as err:
        check_quant_device("mps", "int8")
    assert "\n" not in str(err.value)
    if not torch.cuda.is_available():  # a span on CUDA cannot exist here: the check says why, in one line
        with pytest.raises(ConfigError) as err:
            check_quant_device("cuda", "int4")
        assert "\n" not in str(err.value) and "cuda" in str(err.value).lower()
