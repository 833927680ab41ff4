"""Elementary tensor ops shared by blocks and the head: RMSNorm, a decode-friendly linear and ``Linear``.

Contract: pure torch, stateless apart from one switch. ``Linear`` is the one matrix product a block or the
head holds per weight (``y = x @ W^T + b``, shapes in comments); it is the seam quantization plugs into:
``models.quant`` replaces a ``Linear`` with a module of the same call signature holding int8/int4 weights,
so block code never knows how its weights are stored. ``linear`` equals ``F.linear`` up to float
rounding; on CPU, for the few-row inputs of decode steps, it calls oneDNN's inner product (the kernel
torch's own compiler uses), which streams the weight with every core, whereas ``F.linear`` of one row
goes to MKL's matrix-vector product, which reaches well under half the memory bandwidth. Only
float32 takes that path (bf16 ``F.linear`` is already fast, fp16 has no oneDNN CPU kernel); large
row counts (prefill) and other devices use ``F.linear``. ``set_fast_linear(False)``
turns the oneDNN path off (for comparisons).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_MAX_ROWS = 8
"""Inputs with at most this many rows (batch x tokens) take the oneDNN path."""

_ONEDNN_DTYPES = (torch.float32,)  # bf16 F.linear already reaches oneDNN; fp16 has no CPU kernel
_state = {"fast": torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")}


def set_fast_linear(enabled: bool) -> bool:
    """Enable or disable the oneDNN decode path; returns the previous setting."""
    previous = _state["fast"]
    _state["fast"] = bool(enabled) and torch.backends.mkldnn.is_available()
    return previous


def fast_linear_enabled() -> bool:
    return _state["fast"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T (+ bias [out]) -> [..., out]."""
    if (
        _state["fast"]
        and x.device.type == "cpu"
        and x.dtype in _ONEDNN_DTYPES
        and x.numel() <= ONEDNN_MAX_ROWS * x.shape[-1]
        and not torch.is_grad_enabled()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 and cast back (as transformers does)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Linear(nn.Module):
    """A dense projection: ``weight`` [out, in] and an optional ``bias`` [out], never trained."""

    def __init__(self, out_features: int, in_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """A token embedding table ``weight`` [vocab, hidden]: ids [...] -> rows [..., hidden]."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] int -> [..., hidden]
        return F.embedding(ids, self.weight)
