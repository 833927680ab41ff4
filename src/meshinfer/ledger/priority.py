"""The order a contended server serves steps in, by the credit of the peers that sent them (issue 23). Pure.

Contract: ``virtual_arrival(arrival, credit, policy)`` is the time a step counts as having arrived: its real
arrival moved earlier by ``advance_s(credit, policy)``, which grows with the peer's credit (block-tokens served
minus used) from 0 for a peer with no credit to ``policy.max_advance_s`` at ``policy.saturation`` block-tokens
(logarithmically: the first contributions matter most). A server that cannot take every queued step at once
takes them in ``virtual_arrival`` order. Nobody starves: a step that has waited longer than
``max_advance_s`` goes before any step that arrives after it, whatever the credits; a contributor's advantage is
bounded by ``max_advance_s`` per step. A peer with negative credit is never pushed back further than one with
none (a newcomer and a freeloader are treated alike: telling them apart would need an identity that costs
something to make; see docs/architecture.md section 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PriorityPolicy:
    max_advance_s: float = 2.0
    """Most seconds a contributor's step is moved ahead of its real arrival (the bound on any one's advantage)."""
    saturation: int = 1_000_000
    """Credit in block-tokens at which the advance reaches its maximum (e.g. ~1,000 tokens through 1,000 blocks)."""
    unit: int = 1_000
    """Credit in block-tokens below which the advance is still small (the log's knee)."""

    def __post_init__(self) -> None:
        if self.max_advance_s < 0 or self.saturation <= 0 or self.unit <= 0:
            raise ValueError("PriorityPolicy: max_advance_s >= 0, saturation > 0 and unit > 0")


def advance_s(credit: int, policy: PriorityPolicy) -> float:
    """Seconds a step of a peer with ``credit`` is moved ahead: 0 .. ``policy.max_advance_s``."""
    if credit <= 0 or policy.max_advance_s == 0:
        return 0.0
    share = math.log1p(credit / policy.unit) / math.log1p(policy.saturation / policy.unit)
    return policy.max_advance_s * min(1.0, share)


def virtual_arrival(arrival: float, credit: int, policy: PriorityPolicy) -> float:
    return arrival - advance_s(credit, policy)
