"""The fuzzing budget shared by every hypothesis test (wire messages, tensors, frames, records, HTTP bodies).

``@budget(n)`` gives a test ``n`` examples in an ordinary run (the bounded CI budget) and ``n * scale`` with
``pytest --fuzz-scale=<scale>`` (the longer run, e.g. ``--fuzz-scale=50``). The scale is set once by
``tests/conftest.py`` before collection; it is never read from the environment at import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

F = TypeVar("F", bound=Callable[..., Any])

SCALE: float = 1.0
"""Multiplier on every budget, set from ``--fuzz-scale`` by ``pytest_configure``."""


def examples(n: int) -> int:
    """The number of examples a test with base budget ``n`` runs now."""
    return max(1, int(n * SCALE))


def budget(n: int) -> Callable[[F], F]:
    """Hypothesis settings for a fuzz test with base budget ``n``: no deadline (shared, noisy machines) and no
    too-slow health checks (real decoders on real bytes)."""

    def wrap(fn: F) -> F:
        return settings(
            max_examples=examples(n),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(fn)

    return wrap
