"""The audit tolerances against a REAL trained model (SmolLM2-135M-Instruct, from the catalogue's GGUF): honest
servers of different dtypes and paths pass, and the dishonest modes' lies fail.

In process (no servers): blocks 1:30 as one span, as a hop would hold them. The SHADOW is what an auditor's shadow
session computes: fp32 or bf16 prefill chunks of 16 positions; the CLAIMS are what an honest server sends: one-token
decode steps after a 16-token prompt, in fp32 and bf16. Every window of 16 is judged with ``tolerance_for`` the
pair, exactly as ``client.audit`` does. The inputs are the real residual stream of English text and of random
token ids (block 0 in fp32 on the model's own token embeddings). This guards the calibration of
``client.audit_math`` (honest_noise_smollm2.json): random-weight models understate honest 16-bit noise
several-fold (the tolerances before it failed the random-ids case: window scale 0.0105 against 0.004).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meshinfer.client.audit_math import judge, tolerance_for
from meshinfer.models.checkpoint import Checkpoint, load_tokenizer
from meshinfer.types import BlockRange

pytestmark = pytest.mark.slow

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined a "
        "screw press with movable metal type and an oil-based ink. Within decades, presses spread across Europe, "
        "books became cheaper, and literacy rose among merchants and craftsmen. Scholars argue about how much the "
        "press changed religion and science, but few doubt that it sped the flow of ideas between cities.")
WINDOW = 16


@pytest.fixture(scope="module", params=["text", "random-ids"])
def runs(request: pytest.FixtureRequest, smollm2_gguf: Path) -> dict[str, torch.Tensor]:
    """Outputs [P, H] of blocks 1:30 over the text (or 64 random token ids: the study's inputs, where the honest
    bf16/fp32 gap was largest): ``{dtype}-prefill`` (shadow) and ``{dtype}-decode`` (claims)."""
    ckpt = Checkpoint(smollm2_gguf)
    if request.param == "text":
        ids = torch.tensor([load_tokenizer(ckpt.path).encode(TEXT)[:64]])  # [1, P]
    else:
        ids = torch.randint(0, ckpt.spec.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    head, block0 = ckpt.load_head(torch.float32), ckpt.load_span(BlockRange(0, 1))
    length = ids.shape[1]
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        x = block0(head.embed(ids), block0.new_cache(length))  # [1, P, H]
        for dtype in ("float32", "bfloat16"):
            span = ckpt.load_span(BlockRange(1, ckpt.spec.num_blocks), dtype)
            xd = x.to(span_dtype := getattr(torch, dtype))
            cache = span.new_cache(length)
            out[f"{dtype}-prefill"] = torch.cat([span(xd[:, a:a + WINDOW], cache)[0] for a in range(0, length, WINDOW)])
            cache = span.new_cache(length)
            steps = [span(xd[:, :WINDOW], cache)[0]] + [span(xd[:, p:p + 1], cache)[0] for p in range(WINDOW, length)]
            out[f"{dtype}-decode"] = torch.cat(steps).float()
            out[f"{dtype}-prefill"] = out[f"{dtype}-prefill"].float()
            assert out[f"{dtype}-decode"].dtype == torch.float32 and span_dtype is not None
    return out


def windows(claimed: torch.Tensor, shadow: torch.Tensor, dtype_c: str, dtype_s: str) -> list[bool]:
    tol = tolerance_for(dtype_c, dtype_s, "none", claimed.shape[-1])
    return [judge(claimed[a:a + WINDOW], shadow[a:a + WINDOW], tol).ok for a in range(0, claimed.shape[0], WINDOW)]


@pytest.mark.parametrize("claim", ["float32-decode", "bfloat16-decode", "bfloat16-prefill", "float32-prefill"])
@pytest.mark.parametrize("shadow", ["float32-prefill", "bfloat16-prefill"])
def test_honest_servers_pass_on_a_real_model(runs: dict[str, torch.Tensor], claim: str, shadow: str) -> None:
    ok = windows(runs[claim], runs[shadow], claim.split("-")[0], shadow.split("-")[0])
    assert all(ok), ok


@pytest.mark.parametrize("shadow", ["float32-prefill", "bfloat16-prefill"])
def test_lies_fail_on_a_real_model(runs: dict[str, torch.Tensor], shadow: str) -> None:
    claim = runs["float32-decode"]
    dtype_s = shadow.split("-")[0]
    gen = torch.Generator().manual_seed(0)
    rms = claim.pow(2).mean(-1, keepdim=True).sqrt()
    wrong = torch.randn(claim.shape, generator=gen) * rms  # mode "wrong": noise of the right rms
    assert not any(windows(wrong, runs[shadow], "float32", dtype_s))
    scaled = claim * 1.05  # a 5% scale: beyond every unquantized bound
    assert not any(windows(scaled, runs[shadow], "float32", dtype_s))
    if dtype_s == "float32":  # a 1% scale: caught only by an fp32 pair
        assert not any(windows(claim * 1.01, runs[shadow], "float32", dtype_s))
