"""torch's CUDA int4 weight layout (tinygemm: ``aten._convert_weight_to_int4pack`` / ``aten._weight_int4pack_mm``)
as plain torch functions that run on any device, the CPU included (so the layout is tested without a GPU).

Contract: pure torch over plain tensors, no modules. Conventions, read from aten/src/ATen/native/cuda/int4mm.cu:
- Values: ``w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``, g = k // group: the kernel turns a nibble q
  into the bf16 q - 8 and takes one bf16 fma with its group's (scale, zero); ``scales_and_zeros`` is bf16
  [K / group, N, 2], exactly as for the CPU kernel (``quant_math.pack_int4``), so quant_math's codes, scales and
  zeros serve both.
- The packer's input is uint8 [N, K / 2] whose byte j of row n is ``q[n, 2j] << 4 | q[n, 2j + 1]`` (the even k in
  the high nibble): ``pair_nibbles``.
- Its output, the kernel's B operand, is int32 [N / 8, K / (I * 16), 32, I / 2] for I inner k-tiles (2, 4 or 8;
  ``inner_k_tiles``): n-tile nt (8 rows), k-super-tile ko (I k-tiles of 16), warp lane t, pair j of k-tiles.
  ``pack`` builds it as the packer kernel does (four bytes per lane: k bytes kb + t%4, +4, +8, +12 from
  kb = (ko * I + 2j) * 8; the high nibbles in bits 0..15, the low ones in bits 16..31). ``unpack`` / ``rows``
  read it as the matmul kernel does, an independent derivation: the i4->bf16 conversion gives bf16 pairs of
  nibbles (0, 4), (1, 5), (2, 6), (3, 7), the first two the MMA's B registers for k-tile 2j, the last two for
  k-tile 2j + 1; an m16n8k16 B fragment puts register r's halves at k rows 2(t%4) + {0, 1} + 8r of column t/4.
  So nibble s = 4e + 2h + f of word [nt, ko, t, j] is ``q[8 nt + t // 4, 16 (ko I + 2j + h) + 8f + 2 (t % 4) + e]``.
  tests/models/test_tinygemm.py checks ``unpack(pack(q)) == q``; tests/gpu checks ``pack`` against the aten
  packer (``layout_ok`` checks it once per device at load).
- N % 8 == 0 and K % (I * 16) == 0 (``quant_support.int4_shape_fits`` guarantees both for I = 2).
Knows nothing of modules, blocks or checkpoints.
"""

from __future__ import annotations

import functools

import torch

_ATEN_PACK = torch.ops.aten._convert_weight_to_int4pack


def inner_k_tiles(k: int) -> int:
    """The inner k-tiles for K inputs: 8 (16-byte loads, gpt-fast's choice) where K allows, else 4, else 2."""
    for inner in (8, 4, 2):
        if k % (inner * 16) == 0:
            return inner
    raise ValueError(f"K = {k} is not a multiple of 32")


def pair_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (0..15) -> uint8 [N, K / 2], byte j = q[:, 2j] << 4 | q[:, 2j + 1] (the packer's input)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4 | q[:, 1::2]).contiguous()


def pack(pairs: torch.Tensor, inner: int) -> torch.Tensor:
    """uint8 [N, K / 2] (``pair_nibbles``) -> int32 [N / 8, K / (inner * 16), 32, inner / 2], as the packer writes."""
    n, half = pairs.shape
    nt, ko, pairs_j = n // 8, 2 * half // (inner * 16), inner // 2
    dev = pairs.device
    t, i = torch.arange(32, device=dev), torch.arange(4, device=dev)
    kbase = (torch.arange(ko, device=dev)[:, None] * inner + 2 * torch.arange(pairs_j, device=dev)[None, :]) * 8
    col = (kbase[:, None, :, None] + ((i // 2) * 8 + (i % 2) * 4)[None, None, None, :]
           + (t % 4)[None, :, None, None])  # [KO, 32, J, 4] byte columns
    row = torch.arange(nt, device=dev)[:, None] * 8 + (t // 4)[None, :]  # [NT, 32]
    v = pairs[row[:, None, :, None, None], col[None]].to(torch.int64)  # [NT, KO, 32, J, 4]
    shift = 4 * i
    word = ((v >> 4) << shift).sum(-1) + ((v & 15) << (shift + 16)).sum(-1)  # disjoint bit fields: sum == or
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # [NT, KO, 32, J]


def _nibbles(words: torch.Tensor) -> torch.Tensor:  # int32 [...] -> uint8 [..., 8], nibble s at index s
    shift = 4 * torch.arange(8, device=words.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shift) & 15).to(torch.uint8)


def unpack(words: torch.Tensor) -> torch.Tensor:
    """The codes q uint8 [N, K] of a packed int32 [N / 8, K / (I * 16), 32, I / 2] (a slice of n-tiles reads
    just those rows), as the matmul kernel reads them."""
    nt, ko, _, pairs_j = words.shape
    k = ko * pairs_j * 2 * 16
    nib = _nibbles(words).view(nt, ko, 8, 4, pairs_j, 2, 2, 2)  # [nt, ko, g, r, j, e, h, f]
    return nib.permute(0, 2, 1, 4, 6, 7, 3, 5).reshape(nt * 8, k)  # n = (nt, g), k = (ko, j, h, f, r, e)


def rows(words: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The codes of rows ``ids`` [T] (int64) of a packed weight: uint8 [T, K], nothing else unpacked."""
    nt, ko, _, pairs_j = words.shape
    lanes = words.view(nt, ko, 8, 4, pairs_j)[ids // 8, :, ids % 8]  # [T, KO, 4, J]: the row's 4 lanes
    nib = _nibbles(lanes).view(ids.shape[0], ko, 4, pairs_j, 2, 2, 2)  # [T, ko, r, j, e, h, f]
    return nib.permute(0, 1, 3, 5, 6, 2, 4).reshape(ids.shape[0], ko * pairs_j * 32)


def dequantize(codes: torch.Tensor, sz: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """codes uint8 [T, K] and their scales_and_zeros columns sz [K / group, T, 2] -> ``dtype`` [T, K]:
    (q - 8) * scale + zero, one rounding (``addcmul`` computes in fp32 on the GPU, as the kernel's fma)."""
    t, k = codes.shape
    scale = sz[..., 0].t().to(dtype)[:, :, None]  # [T, G, 1]
    zero = sz[..., 1].t().to(dtype)[:, :, None]
    q = codes.view(t, k // group, group).to(dtype) - 8  # exact in bf16 / fp16
    return torch.addcmul(zero, q, scale).reshape(t, k)


def pack_on_device(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] on a CUDA device -> the kernel's packed int32 weight, by torch's own packer."""
    return _ATEN_PACK(pair_nibbles(q), inner_k_tiles(q.shape[1]))


@functools.cache
def _layout_ok(device: str) -> bool:
    q = torch.randint(0, 16, (16, 256), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pairs = pair_nibbles(q)
    try:
        return all(torch.equal(_ATEN_PACK(pairs.to(device), inner).cpu(), pack(pairs, inner)) for inner in (2, 4, 8))
    except RuntimeError:  # no packer for this device in this build
        return False


def layout_ok(device: torch.device) -> bool:
    """Whether torch's packer on ``device`` (CUDA) writes the layout this module reads (probed once per device)."""
    return _layout_ok(str(device))
