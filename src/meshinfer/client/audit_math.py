"""The arithmetic of audits (design D2): per-position statistics, tolerances, window verdicts, detection odds.

Contract: pure torch (no network, no swarm state). A hop's CLAIMED outputs ``c`` [P, H] (what the audited server
sent) are compared with RECOMPUTED outputs ``r`` [P, H] (a shadow session on an independent server), in fp32:

    rel_err[p] = ||c_p - r_p||_2 / max(||r_p||_2, eps)
    scale[p]   = <c_p, r_p> / max(<r_p, r_p>, eps)

A window FAILS when any ``rel_err > tol.rel_err`` or ``|mean(scale) - 1| > tol.scale`` over the window (the
SIGNED mean): a systematic scale hides in per-position noise but not in the mean of the projection ratio, where
honest rounding noise averages out (in fp32 pairs a 1% scale is 100x the bound; in 16-bit pairs of a real model
the honest window mean reaches 0.5-1%, so there only a larger scale shows). ``judge`` gives the verdict and the first
position to distrust; ``arbitrate`` names the liar from a third opinion (design D3); ``detection_probability`` is the
odds of the scheme catching a liar. Tolerances are calibrated from the honest-noise studies
(scripts/trust/honest_noise.py); ``tolerance_for`` is the one place that maps (dtype, dtype, quant) to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

import torch

from meshinfer.errors import UsageError

EPS: Final = 1e-12
"""Floor of the denominators (an all-zero recomputed row compares by its absolute error)."""


@dataclass(frozen=True)
class Tolerance:
    """How far an honest claim may be from an honest recomputation: per position and for a window's scale."""

    rel_err: float
    """Largest honest rel_err of one position."""
    scale: float
    """Largest honest |mean(scale) - 1| over a window (the SIGNED mean: honest rounding noise averages out over the
    window's positions, a systematic scale does not)."""


# Calibrated on two studies (scripts/trust/honest_noise.py; CPU): honest_noise_cpu.json (36,096 positions: 6
# random-weight models, fp32 with 1 and 2 threads, bf16, int8/int4, single and 4 batched sessions, each against a
# shadow prefilling windows of 16) and honest_noise_smollm2.json (13,824 positions of SmolLM2-135M-Instruct, a
# REAL trained model, 29 blocks in one span, H 576). The real model's honest noise is several times the random
# models' (outlier features: a few large residual dimensions make bf16 rounding correlated across positions), so
# every 16-bit and quantized bound below comes from it. Honest maxima (rel_err / |signed window mean of scale-1|,
# the larger of the two studies) are quoted per constant; bounds are 2.2-3x above them. Prefill against prefill
# was bit-exact within one dtype: all same-dtype noise is decode vs prefill.
FP32: Final = Tolerance(rel_err=1e-3, scale=1e-4)
"""Both sides fp32, unquantized (honest: rel_err <= 5.3e-6, window scale <= 3.8e-7)."""
HALF_SAME: Final = Tolerance(rel_err=0.1, scale=0.012)
"""Both sides the same 16-bit dtype, any quant mode (honest: rel_err <= 0.036, window scale <= 0.0052, SmolLM2
int4 bf16/bf16). A 1% scale lie (window scale 0.010) is NOT detected here."""
HALF_MIXED: Final = Tolerance(rel_err=0.45, scale=0.025)
"""A 16-bit side against fp32, unquantized (honest: rel_err <= 0.216, window scale <= 0.0105, SmolLM2: weights
rounded to bf16 compute a slightly different function, most at the prompt's first positions)."""
QUANT_FP32: Final = Tolerance(rel_err=0.06, scale=0.006)
"""int8/int4 routes, both fp32 (honest: rel_err <= 0.022, window scale <= 0.0025, SmolLM2: the low-bit GEMV of a
decode step rounds activations to bf16, the prefill's dequantized GEMM does not)."""
INT8_MIXED: Final = Tolerance(rel_err=0.45, scale=0.045)
"""int8, a bf16 side against an fp32 one (honest: rel_err <= 0.186, window scale <= 0.0197, SmolLM2)."""
INT4_MIXED: Final = Tolerance(rel_err=0.6, scale=0.06)
"""int4, a bf16 side against an fp32 one (honest: rel_err <= 0.34, window scale <= 0.030, random weights: weights
quantized from bf16 and from fp32 differ by ~3%, so the two compute different functions; such audits catch only
gross lies, and shadows of the audited hop's own dtype are preferred)."""

HALF_SCALE_NOISE: Final = 0.08
"""With a 16-bit side, the window scale tolerance is at least HALF_SCALE_NOISE / sqrt(hidden_size): the honest
projection-ratio noise shrinks like rel_err / sqrt(H), so narrow models need more (tiny llama, H = 64: an honest
bf16/fp32 window's signed mean reached 0.0040 in CI; this gives 0.01 there). On the real SmolLM2 the noise did
not shrink with width as this assumes (outlier features), so the bounds above are the real model's and this floor
only matters below H ~ 50."""

_HALF: Final = frozenset({"bfloat16", "float16", "bf16", "fp16", "half"})


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return dtype.strip().lower()


def tolerance_for(dtype_a: torch.dtype | str, dtype_b: torch.dtype | str, quant: str = "none",
                  hidden_size: int | None = None) -> Tolerance:
    """The calibrated tolerance between servers computing in ``dtype_a`` and ``dtype_b`` on a ``quant`` route.

    Symmetric in the two dtypes. Any 16-bit dtype involved: the half tolerances (looser when the two differ; the
    scale bound at least ``HALF_SCALE_NOISE / sqrt(hidden_size)`` when it is given); both fp32: ``FP32``
    (``QUANT_FP32`` on an int8/int4 route; a route never mixes quant modes).
    """
    a, b = _dtype_name(dtype_a), _dtype_name(dtype_b)
    if a in _HALF or b in _HALF:
        if a == b:
            tol = HALF_SAME
        else:
            tol = {"int8": INT8_MIXED, "int4": INT4_MIXED}.get(quant, HALF_MIXED)
        if hidden_size is not None and hidden_size > 0:
            tol = Tolerance(tol.rel_err, max(tol.scale, HALF_SCALE_NOISE / math.sqrt(hidden_size)))
        return tol
    return FP32 if quant == "none" else QUANT_FP32


def position_stats(claimed: torch.Tensor, recomputed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rel_err [P], scale [P]) of ``claimed`` vs ``recomputed`` [P, H] (or [H]), computed in fp32."""
    if claimed.shape != recomputed.shape:
        raise UsageError(f"claimed {tuple(claimed.shape)} and recomputed {tuple(recomputed.shape)} differ in shape")
    if claimed.dim() == 0:
        raise UsageError("claimed and recomputed outputs need a hidden dimension")
    c = claimed.detach().float().reshape(-1, claimed.shape[-1])
    r = recomputed.detach().float().reshape(c.shape)
    rel = (c - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(EPS)  # [P]
    scale = (c * r).sum(-1) / (r * r).sum(-1).clamp_min(EPS)  # [P]
    # a zero recomputed row: the ratio is undefined; count it as exact only when the claim is zero too
    zero = (r * r).sum(-1) <= EPS
    scale = torch.where(zero, torch.where(rel <= EPS, 1.0, math.inf), scale)
    return rel, scale


@dataclass(frozen=True)
class Verdict:
    """The judgement of one window of positions [start, start + P)."""

    ok: bool
    first_bad: int | None
    """Offset in the window of the first position to distrust (None when ok): the first position over the
    per-position bound; 0 when only the window's mean scale fails (every position is then suspect)."""
    max_rel_err: float
    mean_scale_dev: float
    """|mean(scale - 1)| over the window (the signed mean's absolute value)."""
    positions: int


def judge(claimed: torch.Tensor, recomputed: torch.Tensor, tol: Tolerance) -> Verdict:
    """The D2 verdict of a window: claimed vs recomputed outputs [P, H] under ``tol``."""
    rel, scale = position_stats(claimed, recomputed)
    if rel.numel() == 0:
        return Verdict(True, None, 0.0, 0.0, 0)
    dev = scale - 1
    mean_dev = abs(float(dev.mean())) if bool(torch.isfinite(dev).all()) else math.inf  # signed mean, then abs
    over = (rel > tol.rel_err) | ~torch.isfinite(rel)  # nan/inf claims fail
    max_rel = float(rel.max()) if bool(torch.isfinite(rel).all()) else math.inf
    if bool(over.any()):
        return Verdict(False, int(over.nonzero()[0, 0]), max_rel, mean_dev, int(rel.numel()))
    if not mean_dev <= tol.scale:
        return Verdict(False, 0, max_rel, mean_dev, int(rel.numel()))
    return Verdict(True, None, max_rel, mean_dev, int(rel.numel()))


Culprit = Literal["audited", "verifier", "both", "neither"]


def arbitrate(claimed: torch.Tensor, shadow: torch.Tensor, referee: torch.Tensor,
              tol_claimed: Tolerance, tol_shadow: Tolerance) -> tuple[Culprit, int | None]:
    """Who lied, by a third opinion (design D3): (culprit, first offset where the culprit's outputs are wrong).

    ``claimed`` (the audited hop), ``shadow`` (the first verifier) and ``referee`` (a third server) are outputs
    [P, H] of the same positions; each side is judged against the referee with the tolerance of its dtype pair
    with the referee's. ``neither``: both agree with the referee (the failed window was noise beyond the
    calibration; nobody is banned). ``both``: neither agrees (the referee cannot settle it; the offset is the
    audited side's).
    """
    vc = judge(claimed, referee, tol_claimed)
    vs = judge(shadow, referee, tol_shadow)
    if vc.ok and vs.ok:
        return "neither", None
    if not vc.ok and vs.ok:
        return "audited", vc.first_bad
    if vc.ok:
        return "verifier", vs.first_bad
    return "both", vc.first_bad


def detection_probability(n_tokens: int, *, corrupt_fraction: float, detectability: float,
                          audit_fraction: float, audit_every: int) -> float:
    """P(a liar is caught within ``n_tokens`` generated tokens of one session).

    The liar corrupts each step (position) independently with probability ``corrupt_fraction`` (f); a corrupted
    position fails its window with probability ``detectability`` (d: 1 for any lie beyond the tolerance). The
    hop is shadowed with probability ``audit_fraction`` (a); a shadowed hop is checked every ``audit_every`` (E)
    tokens and each check verifies every position since the last, so after n tokens floor(n / E) * E positions
    were judged:

        P = a * (1 - (1 - f * d) ** (floor(n / E) * E))

    Over s independent sessions through the liar, the odds of at least one catch are 1 - (1 - P) ** s.
    """
    for name, value in (("corrupt_fraction", corrupt_fraction), ("detectability", detectability),
                        ("audit_fraction", audit_fraction)):
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{name} must be in [0, 1], got {value}")
    if audit_every < 1 or n_tokens < 0:
        raise UsageError(f"audit_every must be >= 1 and n_tokens >= 0, got {audit_every} and {n_tokens}")
    judged = (n_tokens // audit_every) * audit_every
    return audit_fraction * (1.0 - (1.0 - corrupt_fraction * detectability) ** judged)


def tokens_to_detect(probability: float, *, corrupt_fraction: float, detectability: float,
                     audit_every: int) -> int | None:
    """Fewest tokens after which a SHADOWED hop's liar is caught with at least ``probability`` (None: never)."""
    if not 0.0 < probability < 1.0:
        raise UsageError(f"probability must be in (0, 1), got {probability}")
    p = corrupt_fraction * detectability
    if p <= 0.0:
        return None
    if p >= 1.0:
        return audit_every
    positions = math.ceil(math.log1p(-probability) / math.log1p(-p))
    return math.ceil(positions / audit_every) * audit_every
