"""How much of a contended server a peer's credit buys (issue 23). Pure.

Contract: ``weight(credit, policy)`` is the number of decode slots a peer gets per round of a contended
server's round-robin (``server.scheduler``): 1 for a peer with no credit or a negative one, growing with its
credit (block-tokens served minus used) logarithmically to ``policy.max_weight`` at ``policy.saturation``
block-tokens (the first contributions matter most). Nobody starves: the round-robin still visits every peer
with a ready step, least recently served first, and gives each at least one slot per round; a contributor's
advantage is bounded by ``max_weight`` times a newcomer's share. A peer with negative credit is treated like one
with none (a newcomer and a freeloader look alike: telling them apart would need identities that cost something
to make; see docs/architecture.md section 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PriorityPolicy:
    max_weight: int = 4
    """Most decode slots per round a contributor gets for each one a peer without credit gets."""
    saturation: int = 1_000_000
    """Credit in block-tokens at which the weight reaches ``max_weight`` (e.g. 1,000 tokens through 1,000 blocks)."""
    unit: int = 1_000
    """Credit in block-tokens below which the weight stays near 1 (the log's knee)."""

    def __post_init__(self) -> None:
        if self.max_weight < 1 or self.saturation <= 0 or self.unit <= 0:
            raise ValueError("PriorityPolicy: max_weight >= 1, saturation > 0 and unit > 0")


def share(credit: int, policy: PriorityPolicy) -> float:
    """0 .. 1: how far ``credit`` is along the way to ``policy.saturation`` (logarithmically)."""
    if credit <= 0:
        return 0.0
    return min(1.0, math.log1p(credit / policy.unit) / math.log1p(policy.saturation / policy.unit))


def weight(credit: int, policy: PriorityPolicy) -> int:
    """Decode slots per round-robin round: 1 .. ``policy.max_weight``."""
    return 1 + round(share(credit, policy) * (policy.max_weight - 1))
