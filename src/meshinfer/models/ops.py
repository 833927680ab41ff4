"""Elementary tensor ops shared by blocks and the head: RMSNorm, a decode-friendly linear and ``Linear``.

Contract: pure torch, stateless apart from one switch. ``Linear`` is the one matrix product a block or the
head holds per weight (``y = x @ W^T + b``, shapes in comments); it is the seam quantization plugs into:
``models.quant`` replaces a ``Linear`` with a module of the same call signature holding int8/int4 weights,
so block code never knows how its weights are stored. ``linear`` equals ``F.linear`` up to float
rounding; on CPU, for the few-row inputs of decode steps, it may call oneDNN's inner product (the kernel
torch's own compiler uses) instead of ``F.linear`` (MKL's matrix-vector product). Which of the two streams
weights faster depends on the processor: oneDNN's was twice MKL's on one machine of ours and a quarter
slower on another. So ``autotune_linear(weights)`` times both, once per process, on the model's own weights
as a decode step reads them (every weight once, out of cache), interleaved, and takes oneDNN only when it is
clearly faster (``ONEDNN_MARGIN``): the two round differently, and processes of one machine (a local engine and
the servers it is compared with) should not choose differently because of timing noise. A model whose weights
are fewer than ``AUTOTUNE_MIN_BYTES`` is not timed at all and keeps ``F.linear``: its weights sit in cache, the
timing measures call overhead and noise (on a 2-core machine a 4-block test model chose oneDNN in one server
process out of three, so its outputs differed from every other process's in the last bits), and a model that
small is fast either way. Until then, and where no oneDNN kernel exists, ``F.linear`` is used. Only float32
takes the oneDNN path (bf16 ``F.linear`` already reaches oneDNN, fp16 has no oneDNN CPU kernel); large row
counts (prefill) and other devices use ``F.linear``. ``set_fast_linear`` forces a choice (for comparisons; it
also ends autotuning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_MAX_ROWS = 8
"""Inputs with at most this many rows (batch x tokens) take the oneDNN path."""

_ONEDNN_DTYPES = (torch.float32,)  # bf16 F.linear already reaches oneDNN; fp16 has no CPU kernel
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_state = {"fast": False, "tuned": not _ONEDNN}
ONEDNN_MARGIN = 1.3
"""oneDNN is chosen only when MKL takes at least this many times as long (a clear, repeatable difference)."""
AUTOTUNE_BYTES = 96 * 1024 * 1024
"""Weights timed per kernel and round by ``autotune_linear`` (about twice a server CPU's last-level cache)."""
AUTOTUNE_MIN_BYTES = 16 * 1024 * 1024
"""Below this many bytes of fp32 weights ``autotune_linear`` keeps ``F.linear`` untimed (cache-resident weights:
the timing would be noise, and processes of one machine must choose alike)."""


def set_fast_linear(enabled: bool) -> bool:
    """Force the oneDNN decode path on or off (no autotuning afterwards); returns the previous setting."""
    previous = _state["fast"]
    _state["fast"] = bool(enabled) and _ONEDNN
    _state["tuned"] = True
    return previous


def autotune_linear(weights: list[torch.Tensor], rounds: int = 3) -> bool:
    """Choose, once per process, the faster fp32 decode kernel on ``weights`` (a model's [out, in] matrices in
    the order a step reads them; the first ``AUTOTUNE_BYTES`` are used). Returns whether oneDNN was chosen."""
    import time

    if _state["tuned"]:
        return _state["fast"]
    sample, total = [], 0
    for w in weights:
        if w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2:
            continue
        sample.append(w)
        total += w.numel() * 4
        if total >= AUTOTUNE_BYTES:
            break
    if total < AUTOTUNE_MIN_BYTES:  # too small to time meaningfully; a larger model later may still be timed
        return _state["fast"]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in sample}
    kernels = {
        False: lambda x, w: F.linear(x, w),
        True: lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
    }
    best = {False: float("inf"), True: float("inf")}
    with torch.inference_mode():
        for _ in range(rounds):
            for onednn, kernel in kernels.items():
                start = time.perf_counter()
                for w in sample:
                    kernel(xs[w.shape[1]], w)
                best[onednn] = min(best[onednn], time.perf_counter() - start)
    _state["fast"], _state["tuned"] = best[True] * ONEDNN_MARGIN < best[False], True
    return _state["fast"]


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


def layer_weights(module: nn.Module) -> list[torch.Tensor]:
    """The dense ``Linear`` weights of ``module`` in the order a step reads them (for ``autotune_linear``)."""
    return [m.weight for m in module.modules() if isinstance(m, Linear)]
