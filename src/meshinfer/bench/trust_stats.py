"""Binomial confidence intervals for ``meshinfer bench trust``'s detection rates (pure: no torch, no network).

Contract: ``wilson(k, n, z)`` is the Wilson score interval of a proportion of ``k`` successes in ``n`` trials
(95% two-sided for the default z); ``rate_summary`` packs an observed rate with its interval and, given one,
whether a predicted rate lies inside it and whether a target lies at or below the interval's lower bound.
"""

from __future__ import annotations

import math
from typing import Any

Z95 = 1.959963984540054
"""Two-sided 95% normal quantile."""


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (low, high) of the proportion ``k / n``; (0, 1) when ``n`` is 0."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_summary(k: int, n: int, *, predicted: float | None = None, target: float | None = None) -> dict[str, Any]:
    """The observed rate ``k / n``, its 95% Wilson interval, and how a predicted rate and a target compare."""
    low, high = wilson(k, n)
    out: dict[str, Any] = {"observed": k / n if n else None, "successes": k, "trials": n,
                           "ci95_low": low, "ci95_high": high}
    if predicted is not None:
        out["predicted"] = predicted
        out["predicted_in_ci95"] = low <= predicted <= high
    if target is not None:
        out["target"] = target
        out["target_met_at_ci95_low"] = low >= target
        out["target_met_observed"] = n > 0 and k / n >= target
    return out
