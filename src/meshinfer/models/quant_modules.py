"""The int8 / int4 weight modules that ``quant`` puts in place of a built model's ``ops.Linear`` / ``ops.Embedding``.

Contract: pure torch; each module has the call signature of the module it replaces, so block and head code
never learn how weights are stored. A module lives on the device it was built on, in that device's layout
(built at load on the device, never shipped, never moved: ``.to()`` of a packed int4 module is meaningless).
- ``Int8Linear``: int8 [N, K] + bf16 per-output-channel scales, run by ``aten._weight_int8pack_mm`` (CPU and
  CUDA kernels; the CUDA one computes in fp32 for any float x and returns x's dtype, so x is passed as it is).
- ``Int4Linear``: packed int4 + bf16 ``scales_and_zeros`` [K/g, N, 2] (asymmetric, one scale and zero per group
  of g inputs). On the CPU: torch's CPU pack [N, K/2] (this CPU build's layout: AVX512 / AVX2 / scalar differ),
  run by ``aten._weight_int4pack_mm_for_cpu``. On CUDA: tinygemm's int32 [N/8, K/(I*16), 32, I/2]
  (``models.tinygemm``), run by ``aten._weight_int4pack_mm`` (sm80+, bf16 activations only).
  The CPU kernels are GEMVs, fast only on bf16 activations, so ``forward`` casts x to bf16 and the result
  back to x's dtype (fp32, bf16 and fp16 spans all work; a bf16 span skips both casts).
- Above a device's GEMV row limit (``GEMV_MAX_ROWS`` on the CPU, ``CUDA_INT8_GEMV_MAX_ROWS`` /
  ``CUDA_INT4_GEMV_MAX_ROWS`` on CUDA) a kernel's cost grows with rows, so that call dequantizes instead: on the
  CPU the whole weight to fp32 and one fp32 GEMM; on a GPU ``DEQUANT_CHUNK_BYTES`` of weight rows at a time
  in x's dtype (bf16 / fp16 there), one ``F.linear`` per chunk; the dequantized weight is never kept.
- ``QuantEmbedding``: token rows of an Int8Linear / Int4Linear table, only the looked-up rows dequantized (on
  the table's device), into the model dtype.
``int4_supported`` says which shapes the int4 kernel takes on a device type. Which module a matrix gets, and
from which source, is ``quant``'s business; the arithmetic (quantizers, packing) is ``quant_math``'s and
``tinygemm``'s. No autograd (construction runs under ``no_grad``, forward under the caller's inference mode).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from meshinfer.errors import ConfigError
from meshinfer.models import quant_math as qm
from meshinfer.models import tinygemm as tg
from meshinfer.models.quant_support import int4_shape_fits

DEFAULT_GROUP = 32
"""int4 group size for weights quantized from floats. Measured on SmolLM2-135M (1431 tokens, fp32 ppl 27.51),
span int4 with the grid shifted off the checkpoint's own Q4_1 groups: ppl 30.3 at 32 vs 33.4 at 64 (minmax:
35.5 vs 38.1); unshifted, 32 keeps a GGUF-born model's grid (27.49) where 64 re-quantizes it (33.3). It costs
0.625 vs 0.5625 bytes per weight and ~7% more kernel time (SmolLM2's 120 block matmuls: 4.97 vs 4.64 ms)."""
GEMV_MAX_ROWS = 64
"""Rows (batch x tokens) up to which a CPU call runs the int8/int4 kernel; more rows: dequantize + fp32 GEMM."""
CUDA_INT8_GEMV_MAX_ROWS = 4
"""Rows up to which a CUDA call runs ``_weight_int8pack_mm``. Its CUDA kernel reads the whole weight once per
row (one warp per output), so at M rows it moves ~M bytes per weight against ~5 for dequantizing a chunk to
bf16 and one GEMM: a (not yet measured) crossover near 4 rows."""
CUDA_INT4_GEMV_MAX_ROWS = 32
"""Rows up to which a CUDA call runs tinygemm (``_weight_int4pack_mm``). It computes 16-row m-tiles on tensor
cores and re-reads each m-tile of x for every 8 output columns, so beyond a few m-tiles a dequantized bf16 chunk
and one cuBLAS GEMM is cheaper (an estimate, to be measured: ``tests/gpu/test_gpu_quant.py`` prints both)."""
DEQUANT_CHUNK_BYTES = 64 << 20
"""On a GPU, the most bytes of dequantized weight alive at once in a call above the row limit."""

_BF16 = torch.bfloat16
_INT8_MM = torch.ops.aten._weight_int8pack_mm
_INT4_MM_CPU = torch.ops.aten._weight_int4pack_mm_for_cpu
_INT4_MM_CUDA = torch.ops.aten._weight_int4pack_mm


def int4_supported(out_features: int, in_features: int, group: int, kind: str = "cpu") -> bool:
    """Whether an [out, in] matrix can be int4 with this group size on device type ``kind`` of this machine."""
    fits = int4_shape_fits(kind, out_features, in_features, group)
    return fits and (kind != "cpu" or qm.int4_layout_known())


@functools.cache
def cuda_int8_kernel() -> bool:
    """Whether this torch has a CUDA kernel for ``_weight_int8pack_mm`` (recent ones; without it every CUDA
    int8 call takes the dequantizing path)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CUDA"))
    except (AttributeError, RuntimeError):  # no such introspection: assume the kernel
        return True


def _bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


def chunked_linear(x: torch.Tensor, n: int, k: int, align: int,
                   part: Callable[[torch.Tensor, int, int], torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype, ``part(x, a, b)`` giving x @ W[a:b]^T for row ranges of at most
    ``DEQUANT_CHUNK_BYTES`` of dequantized weight (``align`` divides each range's start)."""
    rows = max(align, DEQUANT_CHUNK_BYTES // (k * x.element_size()) // align * align)
    if rows >= n:
        return part(x, 0, n)
    return torch.cat([part(x, a, min(n, a + rows)) for a in range(0, n, rows)], dim=-1)


class Int8Linear(nn.Module):
    """``y = x @ (q * scale[:, None])^T + bias``: q int8 [N, K], scale bf16 [N], bias [N] in the activation dtype."""

    weight: torch.Tensor  # buffers, declared for the type checker (nn.Module.__getattr__ says Tensor | Module)
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.on_cpu = weight.device.type == "cpu"
        rows = GEMV_MAX_ROWS if self.on_cpu else CUDA_INT8_GEMV_MAX_ROWS if cuda_int8_kernel() else 0
        self._gemv_numel = rows * self.in_features
        self.register_buffer("weight", weight.contiguous())  # int8 [N, K]
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())  # bf16 [N]
        self.bias = _bias(bias)

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Symmetric per-channel int8 (absmax / 127 rounded up to bf16, round-to-nearest) of weight [N, K]."""
        return cls(*qm.quantize_int8(weight), bias)

    @classmethod
    @torch.no_grad()
    def from_q8(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """From a GGUF Q8_0 matrix (q int8 [N, K], scale [N, K/32]): *re-quantized* per channel from its
        dequantized values (the kernel has one scale per row), so not bit-exact: error <= row scale / 2."""
        n, k = q.shape
        w = (q.float().view(n, scale.shape[1], -1) * scale.float()[:, :, None]).view(n, k)
        return cls.from_float(w, bias)

    def dequantize(self) -> torch.Tensor:  # -> float32 [N, K]
        return torch.mul(self.weight, self.scales.float()[:, None])  # int8 * fp32 -> fp32 in one pass

    def rows(self, ids: torch.Tensor) -> torch.Tensor:  # ids [T] int64 -> float32 [T, K]
        return self.weight.index_select(0, ids).float() * self.scales.index_select(0, ids).float()[:, None]

    def _part(self, x: torch.Tensor, a: int, b: int) -> torch.Tensor:  # x [M, K] -> [M, b - a]: x @ W[a:b]^T
        # int8 codes are exact in bf16 / fp16; the scale applies to the outputs (one rounding, as the kernel)
        return F.linear(x, self.weight[a:b].to(x.dtype)).mul_(self.scales[a:b].to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        # Per call ~10 us of Python/dispatch on top of the kernel, so: plain dict reads (nn.Module.__getattr__
        # costs ~1 us a name), a precomputed row limit, no torch.Size arithmetic (~3 us).
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        numel = x.numel()
        if numel <= self._gemv_numel and (numel or self.on_cpu):  # (a GPU grid of 0 blocks cannot launch)
            b = self._buffers
            y = _INT8_MM(x2.to(_BF16) if self.on_cpu else x2.contiguous(), b["weight"], b["scales"])  # [M, N]
        elif self.on_cpu:
            y = F.linear(x2.float(), self.dequantize())  # [M, N] fp32
        else:
            y = chunked_linear(x2, self.out_features, self.in_features, 1, self._part)  # [M, N] x's dtype
        bias = self._parameters.get("bias")
        if bias is not None:
            y = torch.add(y, bias)  # a bf16 y promotes to an fp32 bias's dtype in the same op
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """``y = x @ W^T + bias`` with W[n, k] = (q - 8) * scale[g, n] + zero[g, n], g = k // group_size.

    ``layout``: ``cpu`` (torch's CPU pack, uint8 [N, K/2]) or ``tinygemm`` (CUDA, int32 4-D), told by the
    packed tensor's shape; a tinygemm module built on the CPU (tests) dequantizes but has no kernel there."""

    weight: torch.Tensor  # buffers, declared for the type checker as in Int8Linear
    scales_and_zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 out_features: int, in_features: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layout = "tinygemm" if packed.dim() == 4 else "cpu"
        if not int4_supported(out_features, in_features, group_size, "cpu" if self.layout == "cpu" else "cuda"):
            raise ConfigError(f"int4 cannot hold a [{out_features}, {in_features}] matrix in groups of {group_size}")
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        rows = GEMV_MAX_ROWS if self.layout == "cpu" else CUDA_INT4_GEMV_MAX_ROWS
        self._gemv_numel = rows * in_features
        self.register_buffer("weight", packed.contiguous())  # the layout's packed codes
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())  # bf16 [K/group, N, 2]
        self.bias = _bias(bias)

    @classmethod
    @torch.no_grad()
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None, layout: str | None = None) -> Int4Linear:
        """From codes q [N, K] (0..15) and per-group scale / zero [N, K/group] (w = (q - 8) * scale + zero), packed
        in ``layout`` (None: q's device's, ``cpu`` or ``tinygemm``; tinygemm on the CPU packs with the pure
        ``tinygemm.pack``, on CUDA with torch's own packer)."""
        n, k = q.shape
        layout = layout or ("cpu" if q.device.type == "cpu" else "tinygemm")
        if layout == "cpu":
            return cls(*qm.pack_int4(q, scale, zero), group_size, n, k, bias)
        if not int4_shape_fits("cuda", n, k, group_size):
            raise ConfigError(f"int4 cannot hold a [{n}, {k}] matrix in groups of {group_size}")
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
        if q.device.type == "cuda":
            packed = tg.pack_on_device(q)
        else:
            packed = tg.pack(tg.pair_nibbles(q), tg.inner_k_tiles(k))
        return cls(packed, sz, group_size, n, k, bias)

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = DEFAULT_GROUP,
                   method: str = "search", layout: str | None = None) -> Int4Linear:
        """Asymmetric group-wise int4 of weight [N, K] (``quant_math.quantize_int4``: ``search`` or ``minmax``)."""
        n, k = weight.shape
        kind = "cpu" if (layout or ("cpu" if weight.device.type == "cpu" else "tinygemm")) == "cpu" else "cuda"
        if not int4_supported(n, k, group_size, kind):
            raise ConfigError(f"int4 cannot hold a [{n}, {k}] matrix in groups of {group_size}")
        return cls.from_codes(*qm.quantize_int4(weight, group_size, method), group_size, bias, layout)

    @classmethod
    @torch.no_grad()
    def from_q4(cls, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                bias: torch.Tensor | None = None) -> Int4Linear:
        """From a GGUF Q4_0/Q4_1 matrix (w = scale * q + low per 32-group; Q4_0: low = -8 scale). The codes are
        kept; scale and zero = low + 8 scale are rounded to bf16 (8 significant bits), so each weight is off
        by at most (8 |scale| + |zero|) 2^-8: a few % of a quantization step."""
        return cls.from_codes(q, *qm.int4_from_affine(scale, low), q.shape[1] // scale.shape[1], bias)

    def dequantize(self) -> torch.Tensor:  # -> float32 [N, K] (a transposed view on the CPU layout)
        if self.layout == "tinygemm":
            return qm.dequantize_int4(tg.unpack(self.weight), self.scales_and_zeros, self.group_size)
        return self._dequantize_t().t()

    def _dequantize_t(self) -> torch.Tensor:  # -> float32 [K, N], contiguous (CPU layout)
        return qm.dequantize_packed_t(self.weight, self.scales_and_zeros, self.out_features, self.in_features,
                                      self.group_size)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:  # ids [T] int64 -> float32 [T, K]
        if self.layout == "tinygemm":
            q = tg.rows(self.weight, ids)
        else:
            q = qm.gather_int4_rows(self.weight, self.out_features, self.in_features, ids)  # [T, K]
        return qm.dequantize_int4(q, self.scales_and_zeros.index_select(1, ids), self.group_size)

    def _part(self, x: torch.Tensor, a: int, b: int) -> torch.Tensor:  # x [M, K] -> [M, b - a] (tinygemm)
        codes = tg.unpack(self.weight[a // 8: b // 8])  # [b - a, K]
        w = tg.dequantize(codes, self.scales_and_zeros[:, a:b], self.group_size, x.dtype)
        return F.linear(x, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]; see Int8Linear.forward
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        b = self._buffers
        if self.layout == "cpu":
            if x.numel() <= self._gemv_numel:
                y = _INT4_MM_CPU(x2.to(_BF16), b["weight"], self.group_size, b["scales_and_zeros"])  # [M, N] bf16
            else:
                y = torch.mm(x2.float(), self._dequantize_t())  # [M, N] fp32
        elif 0 < x.numel() <= self._gemv_numel:
            x16 = x2.to(_BF16).contiguous()  # tinygemm: bf16, row-major, rows read as 4-byte words
            if x16.data_ptr() % 16:  # a view at an odd offset: copy rather than a misaligned load
                x16 = x16.clone()
            y = _INT4_MM_CUDA(x16, b["weight"], self.group_size, b["scales_and_zeros"])  # [M, N] bf16
        else:
            y = chunked_linear(x2, self.out_features, self.in_features, 8, self._part)  # [M, N] x's dtype
        bias = self._parameters.get("bias")
        if bias is not None:
            y = torch.add(y, bias)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group={self.group_size}, layout={self.layout}, "
                f"bias={self.bias is not None}")


class QuantEmbedding(nn.Module):
    """Token rows of a quantized table ``table`` ([V, H] Int8Linear / Int4Linear, possibly the tied LM head),
    dequantized on the table's device into ``dtype``: ids [...] -> [..., H]."""

    def __init__(self, table: Int8Linear | Int4Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] int -> [..., H]
        rows = self.table.rows(ids.reshape(-1).long())  # [T, H] fp32
        return rows.to(self.dtype).view(*ids.shape, self.table.in_features)
