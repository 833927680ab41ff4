"""What a decoding constraint is: the per-generation object that says which tokens may come next.

Contract: ``TokenConstraint`` (a ``typing.Protocol``) is stateful and belongs to ONE generation. The sampler
(``models.sampling.Sampler``) asks ``allowed(generated)`` before choosing every token, where ``generated`` is
every token this generation has produced so far (the prompt excluded). ``generated`` usually extends the list of
the previous call by one token, but it may also be shorter or differ in its tail (a speculative step's rejected
drafts, an audit rollback, a failover replay): the constraint must then follow (roll back and re-advance), never
assume. It only ever sees tokens it allowed. The answer is a bool tensor [n] on the CPU (True: allowed) over ids
``0..n-1`` (``n`` may be below or above the logits' width: ids past ``n`` are forbidden, mask entries past the
logits' width are ignored), or None when every token is allowed at this point. An answer that allows nothing is
the constraint's bug; the sampler raises ``ConfigError`` rather than choose a forbidden token.

``ConstraintFactory`` builds a fresh constraint for each generation (``GenerationParams.constraint``): a factory
is immutable and shared (e.g. one compiled grammar), its products are not. This module knows no grammar engine
(``models.grammar`` adapts one), no network and no HTTP; torch only for the type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["ConstraintFactory", "TokenConstraint"]


class TokenConstraint(Protocol):
    """Which tokens may follow the tokens generated so far (see the module docstring)."""

    def allowed(self, generated: Sequence[int]) -> torch.Tensor | None:
        """A bool mask [n] of the tokens allowed after ``generated`` (None: any token)."""
        ...


ConstraintFactory = Callable[[], TokenConstraint]
"""Makes one ``TokenConstraint`` per generation."""
