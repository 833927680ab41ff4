"""client.audit_math: the D2 statistics, tolerances, verdicts, arbitration and detection odds."""

from __future__ import annotations

import math

import pytest
import torch

from meshinfer.client.audit_math import (
    FP32,
    HALF_MIXED,
    HALF_SAME,
    INT4_MIXED,
    INT8_MIXED,
    QUANT_FP32,
    arbitrate,
    detection_probability,
    judge,
    position_stats,
    tokens_to_detect,
    tolerance_for,
)
from meshinfer.errors import UsageError


def _rows(p: int = 16, h: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(p, h, generator=torch.Generator().manual_seed(seed))


def test_stats_match_the_definition() -> None:
    r = _rows()
    c = r * 1.5 + 0.01 * _rows(seed=1)
    rel, scale = position_stats(c, r)
    for p in range(r.shape[0]):
        want_rel = torch.linalg.vector_norm(c[p] - r[p]) / torch.linalg.vector_norm(r[p])
        want_scale = torch.dot(c[p], r[p]) / torch.dot(r[p], r[p])
        assert rel[p].item() == pytest.approx(want_rel.item(), rel=1e-5)
        assert scale[p].item() == pytest.approx(want_scale.item(), rel=1e-5)


def test_stats_are_fp32_for_half_inputs() -> None:
    r = _rows().bfloat16()
    rel, scale = position_stats(r, r)
    assert rel.dtype == torch.float32 and torch.all(rel == 0) and torch.all(scale == 1)


def test_zero_rows_and_shape_mismatch() -> None:
    r = torch.zeros(2, 8)
    c = torch.zeros(2, 8)
    c[1, 0] = 1.0
    rel, scale = position_stats(c, r)
    assert scale[0].item() == 1.0 and math.isinf(scale[1].item()) and rel[1].item() > 1
    with pytest.raises(UsageError):
        position_stats(torch.zeros(2, 8), torch.zeros(3, 8))


def test_tolerances_by_dtype_and_quant() -> None:
    assert tolerance_for(torch.float32, torch.float32) == FP32
    assert tolerance_for("float32", "float32", "int8") == QUANT_FP32
    assert tolerance_for(torch.bfloat16, torch.bfloat16) == HALF_SAME
    assert tolerance_for(torch.bfloat16, torch.float32) == HALF_MIXED == tolerance_for("float32", "bfloat16")
    assert tolerance_for("bfloat16", "bfloat16", "int4") == HALF_SAME
    narrow = tolerance_for("bfloat16", "bfloat16", hidden_size=16)
    assert narrow.rel_err == HALF_SAME.rel_err and narrow.scale == pytest.approx(0.02)  # the floor, 0.08/4
    assert tolerance_for("bfloat16", "float32", hidden_size=64) == HALF_MIXED  # the floor (0.01) is below it
    assert tolerance_for("bfloat16", "float32", "int8") == INT8_MIXED
    assert tolerance_for("float32", "bfloat16", "int4") == INT4_MIXED
    assert tolerance_for("bfloat16", "float32", hidden_size=4096) == HALF_MIXED
    assert tolerance_for("float32", "float32", hidden_size=64) == FP32


def test_honest_window_passes() -> None:
    r = _rows()
    c = r + 1e-6 * _rows(seed=2)
    v = judge(c, r, FP32)
    assert v.ok and v.first_bad is None and v.positions == 16


def test_first_bad_position_is_the_first_over_the_bound() -> None:
    r = _rows()
    c = r.clone()
    c[5] += 0.5 * _rows(1, 64, seed=3)[0]
    c[9] *= 3
    v = judge(c, r, FP32)
    assert not v.ok and v.first_bad == 5


def test_a_systematic_scale_fails_by_the_window_mean_only() -> None:
    """A scale hides in the per-position bound but not in the mean projection ratio: 1% in an fp32 pair (honest
    rel_err ~1e-5), 3% in a 16-bit pair (whose honest window mean reaches 0.5% on a real model: 1% is not caught)."""
    r = _rows(h=1024)
    tiny = 1e-5 * _rows(16, 1024, seed=4) * r.norm(dim=-1, keepdim=True) / 32
    assert judge(r + tiny, r, FP32).ok
    v = judge((r + tiny) * 1.01, r, FP32)
    assert not v.ok and v.first_bad == 0 and v.mean_scale_dev == pytest.approx(0.01, abs=1e-4)
    noise = 0.02 * _rows(16, 1024, seed=4) * r.norm(dim=-1, keepdim=True) / 32  # honest-like rel_err ~0.02
    assert judge(r + noise, r, HALF_SAME).ok
    assert judge((r + noise) * 1.01, r, HALF_SAME).ok  # below the 16-bit bound: a stated limit
    v = judge((r + noise) * 1.03, r, HALF_SAME)
    assert not v.ok and v.first_bad == 0 and v.max_rel_err < HALF_SAME.rel_err
    assert v.mean_scale_dev == pytest.approx(0.03, abs=1e-3)


def test_nan_claims_fail() -> None:
    r = _rows()
    c = r.clone()
    c[3, 0] = float("nan")
    v = judge(c, r, HALF_SAME)
    assert not v.ok and v.first_bad == 3


def test_arbitrate_names_the_side_the_referee_disagrees_with() -> None:
    honest = _rows()
    lie = honest.clone()
    lie[7:] += 1.0
    assert arbitrate(lie, honest, honest, FP32, FP32) == ("audited", 7)
    assert arbitrate(honest, lie, honest, FP32, FP32) == ("verifier", 7)
    assert arbitrate(honest, honest, honest, FP32, FP32) == ("neither", None)
    assert arbitrate(lie, lie * 2, honest, FP32, FP32)[0] == "both"


def test_detection_probability_formula() -> None:
    # every position corrupted and detectable, every hop shadowed: caught at the first check
    assert detection_probability(15, corrupt_fraction=1, detectability=1, audit_fraction=1, audit_every=16) == 0
    assert detection_probability(16, corrupt_fraction=1, detectability=1, audit_fraction=1, audit_every=16) == 1
    # half the hops shadowed: at most one half
    assert detection_probability(1000, corrupt_fraction=1, detectability=1, audit_fraction=0.5,
                                 audit_every=16) == 0.5
    p = detection_probability(64, corrupt_fraction=0.01, detectability=0.5, audit_fraction=1, audit_every=16)
    assert p == pytest.approx(1 - (1 - 0.005) ** 64)
    with pytest.raises(UsageError):
        detection_probability(1, corrupt_fraction=2, detectability=1, audit_fraction=1, audit_every=16)


def test_tokens_to_detect_inverts_the_formula() -> None:
    n = tokens_to_detect(0.99, corrupt_fraction=0.01, detectability=1, audit_every=16)
    assert n is not None and n % 16 == 0
    assert detection_probability(n, corrupt_fraction=0.01, detectability=1, audit_fraction=1,
                                 audit_every=16) >= 0.99
    assert detection_probability(n - 16, corrupt_fraction=0.01, detectability=1, audit_fraction=1,
                                 audit_every=16) < 0.99
    assert tokens_to_detect(0.9, corrupt_fraction=0, detectability=1, audit_every=16) is None


# ---- the pure pieces of the audited generation loop and the session's rewind ----------------------------------

def test_keep_after_rollback() -> None:
    from meshinfer.client.audited import keep_after_rollback

    assert keep_after_rollback(prompt=8, bad=3, released=0) == 8  # a lie inside the prompt: re-run from 3
    assert keep_after_rollback(prompt=8, bad=7, released=0) == 8  # the first token came from position 7
    assert keep_after_rollback(prompt=8, bad=12, released=0) == 13  # tokens from logits >= 12 dropped
    assert keep_after_rollback(prompt=8, bad=12, released=6) == 14  # released tokens are never taken back


def test_truncated_parts() -> None:
    from meshinfer.client.audit import truncate_parts as _truncated

    parts = [torch.zeros(8, 4), torch.ones(1, 4), 2 * torch.ones(1, 4)]
    assert [p.shape[0] for p in _truncated(parts, 9)] == [8, 1]
    assert [p.shape[0] for p in _truncated(parts, 5)] == [5]
    assert _truncated(parts, 0) == []
    assert torch.equal(torch.cat(_truncated(parts, 10)), torch.cat(parts))


def test_check_due_and_settled_tokens() -> None:
    from meshinfer.client.audit import check_due
    from meshinfer.client.audited import settled_tokens

    assert check_due(8, 0, 16)  # the prompt: at once
    assert not check_due(0, 0, 16)
    assert not check_due(23, 8, 16) and check_due(24, 8, 16)
    assert not check_due(24, 24, 16)
    assert settled_tokens(0, 8, 3) == 0
    assert settled_tokens(8, 8, 3) == 1  # the prompt verified: the first token (from position 7) is settled
    assert settled_tokens(9, 8, 3) == 2
    assert settled_tokens(100, 8, 3) == 3


def test_counters_summary() -> None:
    from meshinfer.client.audit import AuditCounters

    c = AuditCounters()
    c.peer("b").passed += 2
    c.peer("a").unaudited += 1
    c.detections = 1
    d = c.as_dict()
    assert d["detections"] == 1 and list(d["peers"]) == ["a", "b"]  # type: ignore[call-overload]
    assert d["peers"]["b"] == {"passed": 2, "failed": 0, "unaudited": 0, "positions": 0,
                              "uncommitted": 0}  # type: ignore[index]
