"""ggml tensor formats: a GGUF tensor's raw bytes as a torch tensor, dequantized or decomposed, with no files.

Contract: a ``GgmlTensor`` is one tensor exactly as a GGUF file stores it: its ggml type name ("Q4_1"), its
logical shape in torch order (``[out, in]`` for a weight) and its bytes as uint8 ``[rows, row_bytes]``
(``[row_bytes]`` for a 1-D tensor), float types included. A row of ``cols`` values is ``cols / block_size``
blocks of ``type_size`` bytes (``gguf.constants.GGML_QUANT_SIZES``), so rows can be gathered (``take_rows``)
and stacked (``cat_rows``) on the raw bytes without touching a block. ``dequantize`` decodes F32, F16, BF16,
Q8_0, Q4_0 and Q4_1 with vectorised torch code that computes exactly what ggml computes (fp16 block scales
widened to float32, then ``d * q`` or ``d * q + m``: bit-equal to ``gguf.quants.dequantize``); every other
type the ``gguf`` package can decode (the K-quants, Q5_0/Q5_1, the IQ types...) goes through
``gguf.quants.dequantize``; a type neither knows is an ``UnsupportedModelError`` naming it.
``q4_decompose``/``q8_decompose`` expose the integers and per-32-value scales of Q4_0/Q4_1/Q8_0 so quantized
kernels can use them without a float detour. ``permute_rows``/``unpermute_rows`` are the row orders of
llama.cpp's q/k permutation (``convert_hf_to_gguf.py``) and of its inverse. Type facts (block layouts,
containers, which types decode) live in the torch-free ``models.ggml_types`` and are re-exported here. Pure
torch + numpy: no files, no GGUF parsing, no network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from meshinfer.models.ggml_types import (
    NATIVE_TYPES,
    byte_shape,
    check_supported_type,
    container,
    is_supported_type,
    quant_type,
    row_bytes,
    type_sizes,
)

__all__ = [
    "FLOAT_TYPES", "NATIVE_TYPES", "GgmlTensor", "byte_shape", "cat_rows", "check_supported_type", "container",
    "is_supported_type", "permute_rows", "q4_decompose", "q8_decompose", "row_bytes", "type_sizes",
    "unpermute_rows",
]

FLOAT_TYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
"""ggml float types and the torch dtype of their values (their safetensors containers keep this dtype)."""
_QK = 32  # values per block of Q4_0, Q4_1 and Q8_0


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte ``start`` of every block, widened to float32: [n_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """ggml's 4-bit layout: byte j holds value j (low nibble) and value j + 16 (high nibble). -> [n, 32] uint8."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


@dataclass(frozen=True)
class GgmlTensor:
    """One tensor in its GGUF encoding: type, logical shape (torch order) and raw bytes."""

    ggml_type: str
    shape: tuple[int, ...]
    data: torch.Tensor

    def __post_init__(self) -> None:
        expected = byte_shape(self.ggml_type, self.shape)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != expected:
            raise ValueError(f"{self.ggml_type} tensor of shape {list(self.shape)} needs uint8 bytes "
                             f"{list(expected)}, got {self.data.dtype} {list(self.data.shape)}")

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) == 2 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    def _blocks(self) -> torch.Tensor:
        _, size = type_sizes(self.ggml_type)
        return self.data.contiguous().reshape(-1, size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values as a ``dtype`` tensor of ``shape`` (computed in float32, then cast)."""
        t = self.ggml_type
        if t in FLOAT_TYPES:
            out = self.data.contiguous().view(FLOAT_TYPES[t]).reshape(self.shape)
            return out.to(dtype) if out.dtype != dtype else out.clone()
        if t == "Q8_0":
            b = self._blocks()  # [n, 34]: fp16 d, 32 x int8
            out = _half(b, 0) * b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
        elif t == "Q4_0":
            b = self._blocks()  # [n, 18]: fp16 d, 16 bytes of nibbles
            out = _half(b, 0) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).to(torch.float32)
        elif t == "Q4_1":
            b = self._blocks()  # [n, 20]: fp16 d, fp16 m, 16 bytes of nibbles
            out = _half(b, 0) * _nibbles(b[:, 4:]).to(torch.float32) + _half(b, 2)
        else:
            check_supported_type(t, "a tensor")
            from gguf.quants import dequantize

            values = dequantize(self.data.contiguous().numpy(), quant_type(t))
            out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        return out.reshape(self.shape).to(dtype)

    def take_rows(self, index: torch.Tensor | Sequence[int]) -> GgmlTensor:
        """The rows ``index`` (elements, for a 1-D float tensor), gathered on the raw bytes."""
        idx = torch.as_tensor(index, dtype=torch.long)
        if len(self.shape) == 2:
            return GgmlTensor(self.ggml_type, (int(idx.numel()), self.cols), self.data[idx].contiguous())
        if self.ggml_type not in FLOAT_TYPES:
            raise ValueError(f"cannot gather elements of a 1-D {self.ggml_type} tensor (values share blocks)")
        width = FLOAT_TYPES[self.ggml_type].itemsize
        data = self.data.reshape(-1, width)[idx].reshape(-1).contiguous()
        return GgmlTensor(self.ggml_type, (int(idx.numel()),), data)


def cat_rows(tensors: Sequence[GgmlTensor]) -> GgmlTensor:
    """2-D tensors of one type and column count stacked row-wise (fused q|k|v, gate|up), on the raw bytes."""
    if not tensors:
        raise ValueError("cat_rows needs at least one tensor")
    first = tensors[0]
    for t in tensors:
        if t.ggml_type != first.ggml_type or len(t.shape) != 2 or t.cols != first.cols:
            raise ValueError(f"cat_rows needs 2-D tensors of one type and width; got {t.ggml_type} {list(t.shape)} "
                             f"after {first.ggml_type} {list(first.shape)}")
    data = torch.cat([t.data for t in tensors], dim=0)
    return GgmlTensor(first.ggml_type, (sum(t.rows for t in tensors), first.cols), data)


def _check_2d(t: GgmlTensor, types: tuple[str, ...]) -> torch.Tensor:
    if t.ggml_type not in types or len(t.shape) != 2:
        raise ValueError(f"expected a 2-D {' or '.join(types)} tensor, got {t.ggml_type} {list(t.shape)}")
    return t._blocks()


def q4_decompose(t: GgmlTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0/Q4_1 tensor as (q uint8 [rows, cols] in 0..15, scale float32 [rows, cols/32], low float32
    [rows, cols/32]) with value = scale * q + low, exactly as ggml computes it (Q4_0: low = -8 * scale,
    Q4_1: low = m; both products and sums are exact or rounded as ggml rounds them)."""
    b = _check_2d(t, ("Q4_0", "Q4_1"))
    groups = t.cols // _QK
    scale = _half(b, 0).reshape(t.rows, groups)
    if t.ggml_type == "Q4_0":
        q, low = _nibbles(b[:, 2:]), -8.0 * scale
    else:
        q, low = _nibbles(b[:, 4:]), _half(b, 2).reshape(t.rows, groups)
    return q.reshape(t.rows, t.cols), scale, low


def q8_decompose(t: GgmlTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor as (q int8 [rows, cols], scale float32 [rows, cols/32]) with value = scale * q."""
    b = _check_2d(t, ("Q8_0",))
    q = b[:, 2:].contiguous().view(torch.int8).reshape(t.rows, t.cols)
    return q, _half(b, 0).reshape(t.rows, t.cols // _QK)


def _head_order(rows: int, n_head: int) -> tuple[int, int]:
    if n_head <= 0 or rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")
    return n_head, rows // n_head // 2


def permute_rows(rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k permutation: ``permuted = w[index]`` with ``index`` this LongTensor
    (``w.reshape(n_head, 2, half, ...).swapaxes(1, 2)`` in ``convert_hf_to_gguf.py``)."""
    heads, half = _head_order(rows, n_head)
    return torch.arange(rows).reshape(heads, 2, half).transpose(1, 2).reshape(-1)


def unpermute_rows(rows: int, n_head: int) -> torch.Tensor:
    """Row order undoing llama.cpp's q/k permutation: ``hf = gguf_rows[index]`` (n_head: the tensor's own
    head count, i.e. num_key_value_heads for k)."""
    heads, half = _head_order(rows, n_head)
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(-1)
