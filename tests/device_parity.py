"""How close a model run on another device or dtype must come to the CPU fp32 reference (issue 18), for tests.

``parity(ref, other, prompt, n)`` runs the reference's greedy continuation, then both models teacher-forced over
prompt + that continuation (one prefill each), and ``other`` free-running (its own greedy decode, KV cache and
all). It reports per generated position the largest logit difference relative to the reference logits' standard
deviation over the vocabulary (``rel``) and the reference's top-1/top-2 margin in the same unit (``margin``).
``check(p, tol)`` asserts ``max(rel) < tol`` and that ``other``'s greedy tokens equal the reference's up to the
first position whose margin is at most ``2 * tol`` (only there can a difference below ``tol`` flip the argmax;
after a flip the continuations legitimately part).

Tolerances (relative to the logit std, which is ~2 on the tiny random checkpoints):

- ``FP32_TOL`` = 1e-3 for fp32 on another device: only the reduction order differs (TF32 is off for matmuls by
  default in torch), giving ~1e-6 relative errors; 1e-3 leaves three orders of magnitude of slack yet catches
  any real bug (a wrong cast, a lost bias, a stale cache), which moves logits by a sizeable fraction of a std.
- bf16: tiny random checkpoints are a harsh case: their hidden states grow block after block, and transformers'
  OWN bf16 run of the tiny llama differs from its fp32 run by 0.38 std (1.4 % relative hidden-state error after
  one block, 4 % after four); our engine's CPU bf16 differs by 0.43-0.59 std on llama/qwen2/mistral. A fixed
  2e-2 would fail any correct bf16 implementation here. So a device's bf16 run must stay within
  ``BF16_SLACK`` x (our CPU bf16 error on the same tokens) + ``BF16_FLOOR`` -- the device adds no error beyond
  what the dtype costs on the CPU -- and below ``BF16_CAP`` in any case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meshinfer.models.engine import LocalModel

FP32_TOL = 1e-3
"""max |logit diff| / logit std allowed for fp32 on another device than the CPU."""
BF16_SLACK = 1.5
BF16_FLOOR = 0.02
"""A device's bf16 error may be at most ``BF16_SLACK`` x the CPU bf16 error + ``BF16_FLOOR`` (in std units)."""
BF16_CAP = 0.75
"""... and never above this (the CPU bf16 error is 0.43-0.59 std on the tiny random checkpoints)."""


@dataclass(frozen=True)
class Parity:
    want: list[int]
    """The reference's greedy tokens."""
    got: list[int]
    """The other model's own greedy tokens (free-running on its device)."""
    rel: torch.Tensor
    """[n] max |logit diff| / reference logit std, per generated position (teacher-forced)."""
    margin: torch.Tensor
    """[n] the reference's top-1 minus top-2 logit / its std, per generated position."""

    @property
    def worst(self) -> float:
        return float(self.rel.max())

    def agreed(self) -> int:
        """How many leading tokens the two greedy continuations share."""
        return next((i for i, (a, b) in enumerate(zip(self.want, self.got, strict=True)) if a != b), len(self.want))

    def must_agree(self, tol: float) -> int:
        """Leading tokens that cannot flip under errors below ``tol``: up to the first margin <= 2 * tol."""
        close = (self.margin <= 2 * tol).nonzero()
        return int(close[0, 0]) if close.numel() else len(self.want)


def parity(ref: LocalModel, other: LocalModel, prompt: Sequence[int], n: int) -> Parity:
    """Compare ``other`` with ``ref`` over ``n`` greedy tokens after ``prompt`` (see the module docstring)."""
    want = ref.generate(prompt, n, stop_token_ids=())
    got = other.generate(prompt, n, stop_token_ids=())
    seq = [*prompt, *want[:-1]]
    a = ref.prefill_logits(seq)[len(prompt) - 1:].float().cpu()  # [n, V]
    b = other.prefill_logits(seq)[len(prompt) - 1:].float().cpu()  # [n, V]
    std = a.std(dim=-1)  # [n]
    top2 = a.topk(2, dim=-1).values  # [n, 2]
    return Parity(want, got, (a - b).abs().amax(dim=-1) / std, (top2[:, 0] - top2[:, 1]) / std)


def check(p: Parity, tol: float) -> None:
    """Logits within ``tol``; greedy tokens equal wherever a difference below ``tol`` cannot flip them."""
    assert p.worst < tol, f"max |logit diff| = {p.worst:.3g} std, tolerance {tol:g}"
    need = p.must_agree(tol)
    assert p.agreed() >= need, (f"greedy tokens part at {p.agreed()} but must agree on {need}: "
                                f"{p.got} vs {p.want}")
