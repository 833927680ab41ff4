"""Elementary tensor ops shared by blocks and the head: RMSNorm and a decode-friendly linear.

Contract: pure torch, stateless apart from one switch. ``linear`` equals ``F.linear`` up to float
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
