"""Quantization arithmetic: float weights to int8 / int4 codes, and torch's CPU int4 pack layout.

Contract: pure torch functions over plain tensors, no modules, no files; the quantizers run on the weight's
device (a GPU quantizes its own blocks at load; larger chunks there). Conventions:
- int8 is symmetric per output channel: ``w ~= q * scale``, q int8 [N, K] in -127..127, scale bf16 [N]
  (the ``_weight_int8pack_mm`` kernel takes bf16 scales; each scale is rounded *up* to a bf16 so that
  no value clips: every weight is within scale / 2 of its code).
- int4 is asymmetric per group of ``group`` consecutive inputs: ``w ~= (q - 8) * scale + zero``, q in
  0..15 [N, K], scale and zero [N, K / group] float32 holding bf16-exact values (the kernel stores them
  as bf16 in ``scales_and_zeros`` [K / group, N, 2]). Two ways to pick (scale, zero) per group:
  ``minmax`` (scale = (max - min) / 15, gpt-fast's) and ``search`` (default): a grid of
  candidate scales around (max - min) / 15, each followed by the least-squares (scale, offset) fit for
  its codes (llama.cpp's ``make_qkx2_quants`` idea, unweighted), the lowest squared error kept, then two
  rounds of alternating least squares (codes for the fit, fit for the codes), then rounded to bf16 with
  the offset refitted and the codes re-rounded. On SmolLM2's matrices at group 64 ``search`` has ~29%
  less squared error than ``minmax`` (Gaussian weights: ~16%), at ~10x its (small) cost.
- The int4 weight is packed by torch's ``_convert_weight_to_int4pack_for_cpu``, whose byte layout
  depends on the CPU build (AVX512: blocks of 64 rows, AVX2: 32, scalar: 32, pairs in partial
  blocks); ``unpack_int4`` / ``gather_int4_rows`` read it back through a layout learnt once per
  process by packing a probe, so a packed tensor is only meaningful on the machine that packed it.
  (The CUDA int4 layout is ``models.tinygemm``'s; codes, scales and zeros are the same.)
Knows nothing of blocks, heads, checkpoints or GGUF files.
"""

from __future__ import annotations

import functools

import torch

from meshinfer.errors import ConfigError
from meshinfer.models.quant_support import INT4_GROUPS as INT4_GROUPS  # re-exported: quant_math.INT4_GROUPS

INT4_METHODS = ("search", "minmax")
_CHUNK = 1 << 18  # elements per quantization chunk: temporaries stay in cache (4x faster than 1 << 22)
_GPU_CHUNK = 1 << 22  # on a GPU: fewer, larger kernels (~10 fp32 temporaries of 16 MiB)
_SEARCH_STEPS = tuple(15.0 + 0.25 * i for i in range(-4, 5))  # code spans tried: 14.0 .. 16.0
_REFITS = 2  # alternating least-squares rounds after the search


def to_bf16_exact(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest bfloat16, as float32."""
    return x.to(torch.bfloat16).float()


def bf16_round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= ``x`` (x >= 0, finite), as float32."""
    y = x.to(torch.bfloat16)
    low = y.float() < x
    return torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y).float()


# ---- int8 -------------------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight [N, K] float -> (q int8 [N, K], scale bf16 [N]); round-to-nearest."""
    w = weight.float()
    scale = bf16_round_up(w.abs().amax(dim=1) / 127.0)  # [N]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale works
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


# ---- int4 quantization ------------------------------------------------------------------------------------


def _fit(
    w: torch.Tensor, q: torch.Tensor, sw: torch.Tensor, sww: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares ``w ~= s * q + off`` per row of w, q [G, g] (sw, sww [G]: sums of w and w^2):
    (s [G], off [G], squared error [G])."""
    n = w.shape[1]
    sq, sqq, sqw = q.sum(1), (q * q).sum(1), (q * w).sum(1)
    det = n * sqq - sq * sq
    ok = det > 0
    safe = torch.where(ok, det, torch.ones_like(det))
    s = torch.where(ok, (n * sqw - sq * sw) / safe, torch.zeros_like(det))
    off = torch.where(ok, (sqq * sw - sq * sqw) / safe, sw / n)
    err = sww - s * sqw - off * sw  # the residual of the normal equations' solution
    return s, off, err


def _int4_chunk(w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize groups w [G, g] float32 -> (q uint8 [G, g], scale [G], zero [G]) with bf16-exact scale, zero."""
    mn, mx = w.amin(1), w.amax(1)  # [G]
    span = mx - mn
    scale, low = span / 15.0, mn  # w ~= scale * q + low, q in 0..15
    if method == "search":
        sw, sww = w.sum(1), (w * w).sum(1)
        best_err = torch.full_like(mn, float("inf"))
        inv_span = torch.where(span > 0, 1.0 / span, torch.zeros_like(span))
        shifted = w - mn[:, None]  # [G, g]
        for steps in _SEARCH_STEPS:  # candidate codes, each with its least-squares (scale, low)
            q = (shifted * (inv_span * steps)[:, None]).round_().clamp_(0, 15)
            s, off, err = _fit(w, q, sw, sww)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, s, scale)
            low = torch.where(better, off, low)
        for _ in range(_REFITS):  # alternate: codes for (scale, low), then (scale, low) for the codes
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = ((w - low[:, None]) / safe[:, None]).round_().clamp_(0, 15)
            s, off, _ = _fit(w, q, sw, sww)
            keep = scale > 0
            scale, low = torch.where(keep, s, scale), torch.where(keep, off, low)
    scale_b = to_bf16_exact(scale)  # [G]
    safe = torch.where(scale_b > 0, scale_b, torch.ones_like(scale_b))
    if method == "minmax":
        zero_b = to_bf16_exact(low + 8.0 * scale)
    else:  # refit the offset for the rounded scale, then round it
        q = ((w - low[:, None]) / safe[:, None]).round_().clamp_(0, 15)
        zero_b = to_bf16_exact((w - (q - 8.0) * scale_b[:, None]).mean(1))
    q = ((w - zero_b[:, None]) / safe[:, None] + 8.0).round_().clamp_(0, 15)
    q = torch.where(scale_b[:, None] > 0, q, torch.full_like(q, 8.0))
    return q.to(torch.uint8), scale_b, zero_b


def quantize_int4(
    weight: torch.Tensor, group: int, method: str = "search"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4: weight [N, K] -> (q uint8 [N, K] in 0..15, scale [N, K/g], zero [N, K/g]).

    ``w ~= (q - 8) * scale + zero``; scale and zero are float32 holding bf16-exact values.
    """
    if method not in INT4_METHODS:
        raise ConfigError(f"unknown int4 method {method!r}; choose one of {', '.join(INT4_METHODS)}")
    n, k = weight.shape
    if k % group:
        raise ConfigError(f"{k} inputs do not split into groups of {group}")
    groups = weight.reshape(n * k // group, group)  # [G, g]
    rows = max(1, (_CHUNK if weight.device.type == "cpu" else _GPU_CHUNK) // group)
    qs, ss, zs = [], [], []
    for a in range(0, groups.shape[0], rows):
        q, s, z = _int4_chunk(groups[a:a + rows].float(), method)
        qs.append(q)
        ss.append(s)
        zs.append(z)
    return torch.cat(qs).view(n, k), torch.cat(ss).view(n, k // group), torch.cat(zs).view(n, k // group)


def int4_from_affine(scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``w = scale * q + low`` (q 0..15) as the kernel's (scale, zero), rounded to bf16: [N, G] each."""
    return to_bf16_exact(scale.float()), to_bf16_exact(low.float() + 8.0 * scale.float())


# ---- the CPU pack layout ----------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q uint8 [N, K] (0..15), scale / zero [N, G] -> (packed uint8 [N, K/2], scales_and_zeros bf16 [G, N, 2])."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
    return packed, sz


@functools.cache
def _layout() -> tuple[int, bool] | None:
    """(rows per block, whether full blocks put row j and j + block/2 in one byte) of this build's packer.

    Partial blocks always pair rows (2i, 2i+1). None: a layout this code does not know."""
    n, k = 144, 32  # 144 = 2 * 64 + 16 = 4 * 32 + 16: full and partial blocks for either block size
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for layout in ((64, True), (32, True), (32, False), (64, False)):
        if torch.equal(_unpack(packed, n, k, *layout), q.to(torch.uint8)):
            return layout
    return None


def int4_layout_known() -> bool:
    """Whether packed int4 weights can be read back here (needed for prefill and embedding lookups)."""
    return _layout() is not None


def _pair_block(b: torch.Tensor, k: int, rows: int) -> torch.Tensor:  # bytes [K * rows/2] -> [rows, K]
    b = b.view(k, rows // 2)
    return torch.stack([b & 15, b >> 4], dim=-1).view(k, rows).t()


def _unpack(packed: torch.Tensor, n: int, k: int, block: int, halves: bool) -> torch.Tensor:
    flat = packed.reshape(-1)
    full = n // block
    parts = []
    if full:
        b = flat[: full * block * k // 2].view(full, k, block // 2)  # [NB, K, B/2]
        lo, hi = b & 15, b >> 4
        rows = torch.cat([lo, hi], dim=-1) if halves else torch.stack([lo, hi], dim=-1).view(full, k, block)
        parts.append(rows.transpose(1, 2).reshape(full * block, k))  # [NB * B, K]
    if n > full * block:
        parts.append(_pair_block(flat[full * block * k // 2:], k, n - full * block))
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The codes q uint8 [N, K] of a ``pack_int4`` weight (this machine's layout)."""
    layout = _layout()
    if layout is None:
        raise RuntimeError("unknown int4 pack layout on this CPU build")
    return _unpack(packed, n, k, *layout)


def gather_int4_rows(packed: torch.Tensor, n: int, k: int, rows: torch.Tensor) -> torch.Tensor:
    """The codes of rows ``rows`` [T] (int64) of a packed [N, K] weight: uint8 [T, K], nothing else unpacked."""
    layout = _layout()
    if layout is None:
        raise RuntimeError("unknown int4 pack layout on this CPU build")
    block, halves = layout
    start = rows - rows % block  # first row of each row's block
    size = torch.clamp(n - start, max=block)  # rows in that block
    within = rows - start
    full = (size == block) & halves
    half = block // 2
    col = torch.where(full, within % half, within // 2)  # byte column inside the block
    shift = torch.where(full, within // half, within % 2) * 4
    stride = size // 2  # bytes per input position inside the block
    index = (start * (k // 2) + col)[:, None] + torch.arange(k)[None, :] * stride[:, None]  # [T, K]
    return (packed.reshape(-1)[index] >> shift[:, None].to(torch.uint8)) & 15


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """q uint8 [T, K] codes and their scales_and_zeros columns sz [G, T, 2] -> float32 [T, K]."""
    t, k = q.shape
    scale = sz[..., 0].t().float().contiguous()[:, :, None]  # [T, G, 1]
    offset = sz[..., 1].t().float().contiguous()[:, :, None] - 8.0 * scale  # zero - 8 scale: w = q*scale + offset
    return torch.addcmul(offset, q.reshape(t, k // group, group).float(), scale).view(t, k)


def dequantize_packed_t(packed: torch.Tensor, sz: torch.Tensor, n: int, k: int, group: int) -> torch.Tensor:
    """The whole packed [N, K] weight, transposed: float32 [K, N] (contiguous), read straight from the
    pack layout (whose blocks hold [K, block] slices of W^T), for one fp32 GEMM ``x @ W^T``."""
    layout = _layout()
    if layout is None:
        raise RuntimeError("unknown int4 pack layout on this CPU build")
    block, halves = layout
    flat = packed.reshape(-1)
    out = torch.empty(k, n)  # W^T
    full = n // block
    if full:
        b = flat[: full * block * k // 2].view(full, k, block // 2).transpose(0, 1)  # [K, NB, B/2]
        dst = out[:, : full * block].view(k, full, block)
        if halves:  # byte j holds rows j (low nibble) and j + B/2 (high)
            dst[:, :, : block // 2].copy_(b & 15)
            dst[:, :, block // 2:].copy_(b >> 4)
        else:  # byte j holds rows 2j and 2j + 1
            pairs = dst.view(k, full, block // 2, 2)
            pairs[..., 0].copy_(b & 15)
            pairs[..., 1].copy_(b >> 4)
    if n > full * block:
        rest = n - full * block
        b = flat[full * block * k // 2:].view(k, rest // 2)
        pairs = out[:, full * block:].view(k, rest // 2, 2)
        pairs[..., 0].copy_(b & 15)
        pairs[..., 1].copy_(b >> 4)
    scale = sz[..., 0].float()[:, None, :]  # [G, 1, N]
    offset = sz[..., 1].float()[:, None, :] - 8.0 * scale
    out.view(k // group, group, n).mul_(scale).add_(offset)
    return out
