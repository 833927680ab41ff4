"""The CUDA paths against the CPU reference: a bf16 span on the GPU against fp32 on the CPU, a swarm of GPU servers
against the local GPU engine, CUDA-graphed decode steps against eager ones. Skipped without CUDA (``-m gpu``).

bf16 tolerance, defined here and calibrated on the CPU (bf16 vs fp32 of the same tiny checkpoints, 4 families x
12 prompts x 16 teacher-forced steps): the relative error of a step's logits, ||bf16 - fp32|| / ||fp32 - mean||,
was 2-11% (max 0.107), so ``REL_TOL`` = 0.15. The greedy token must agree at every step the bf16 error cannot decide:
where fp32's top-2 margin exceeds ``MARGIN_FACTOR`` x that step's max |bf16 - fp32| (teacher forcing, so each step
is judged on the reference's own history). And a free greedy generation of 16 tokens must be identical on the
tiny qwen2 with ``PROMPT``, the pair whose smallest fp32 top-2 margin was the largest relative to the CPU bf16 error
(1.46x) among the 48 tried.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from meshinfer.models.compiled import capacity
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = [149, 11, 112, 126, 150, 6, 55, 121]
STEPS = 16
REL_TOL = 0.15
MARGIN_FACTOR = 2.0


def _teacher_forced(ref: LocalModel, other: LocalModel, prompt: list[int], tokens: list[int]
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(reference logits, other logits) [V] float32 on the CPU, per step, both fed the reference's tokens."""
    out = []
    with torch.inference_mode():
        a = ref.span.new_cache(capacity(len(prompt) + len(tokens), ref.spec.max_position_embeddings))
        b = other.span.new_cache(capacity(len(prompt) + len(tokens), other.spec.max_position_embeddings))
        for chunk in [prompt] + [[t] for t in tokens[:-1]]:
            x = ref._step(torch.tensor([chunk]), a).float().cpu()
            y = other._step(torch.tensor([chunk]), b).float().cpu()
            out.append((x, y))
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_cuda_bf16_span_matches_cpu_fp32(family: str) -> None:
    path = tiny_checkpoint(family)
    ref = LocalModel.from_pretrained(path)
    gpu = LocalModel.from_pretrained(path, dtype="bfloat16", device="cuda")
    assert gpu.span.device.type == "cuda" and gpu.span.dtype == torch.bfloat16
    tokens = ref.generate(PROMPT, STEPS, stop_token_ids=())
    for step, (x, y) in enumerate(_teacher_forced(ref, gpu, PROMPT, tokens)):
        rel = float((y - x).norm() / (x - x.mean()).norm())
        assert rel < REL_TOL, f"step {step}: relative logits error {rel:.3f}"
        top = x.topk(2).values
        if float(top[0] - top[1]) > MARGIN_FACTOR * float((y - x).abs().max()):
            assert int(y.argmax()) == int(x.argmax()), f"step {step}: a decisive greedy token differs"


def test_cuda_bf16_greedy_tokens_equal_cpu_fp32() -> None:
    path = tiny_checkpoint("qwen2")
    ref = LocalModel.from_pretrained(path).generate(PROMPT, STEPS, stop_token_ids=())
    got = LocalModel.from_pretrained(path, dtype="bfloat16", device="cuda").generate(PROMPT, STEPS, stop_token_ids=())
    assert len(ref) == STEPS and got == ref


@pytest.fixture(scope="module")
def windowed(sliding_window_checkpoint: Callable[[int], Path]) -> Path:
    """The tiny mistral with a sliding window of 16 tokens (generations cross it)."""
    return sliding_window_checkpoint(16)


GRAPHED = [(family, dtype, False) for family in ("qwen3", "qwen2", "mistral-window")
           for dtype in ("float32", "bfloat16")] + [("qwen3", "float32", True), ("mistral-window", "bfloat16", True),
                                                    ("qwen2", "bfloat16", "tune")]


@pytest.mark.parametrize(("family", "dtype", "fuse"), GRAPHED)
def test_graphed_decode_equals_eager_on_cuda(family: str, dtype: str, fuse: bool | str, windowed: Path) -> None:
    from meshinfer.models.cuda_graphs import GraphedDecode

    path = windowed if family == "mistral-window" else tiny_checkpoint(family)
    eager = LocalModel.from_pretrained(path, dtype=dtype, device="cuda")
    graphed = LocalModel.from_pretrained(path, dtype=dtype, device="cuda", compile=not fuse)  # compile: graphed
    if fuse:
        graphed.span.compile_decode(fuse=True, tune=fuse == "tune")
    assert isinstance(graphed.span.compiled, GraphedDecode)
    n = 40  # crosses the window of 16
    want = eager.generate(PROMPT, n, stop_token_ids=())
    got = graphed.generate(PROMPT, n, stop_token_ids=())
    assert not graphed.span.compiled.failed and graphed.span.compiled.captures == 1
    assert graphed.span.compiled.compiled_blocks == bool(fuse)
    if dtype == "float32":  # the two differ only in attention's reduction over masked slots: same tokens
        assert got == want
        for step, (x, y) in enumerate(_teacher_forced(eager, graphed, PROMPT, want)):
            torch.testing.assert_close(y, x, atol=1e-4 * float(x.abs().max()), rtol=1e-4, msg=f"step {step}")
    else:  # bf16: judged against the truth (fp32), as close as the eager bf16 steps (the fused ones round elsewhere)
        ref = LocalModel.from_pretrained(path, dtype="float32", device="cuda")
        truth = ref.generate(PROMPT, n, stop_token_ids=())
        pairs = zip(_teacher_forced(ref, eager, PROMPT, truth), _teacher_forced(ref, graphed, PROMPT, truth),
                    strict=True)
        for step, ((r, x), (_, y)) in enumerate(pairs):
            err_eager, err_graphed = (float((m - r).norm() / (r - r.mean()).norm()) for m in (x, y))
            assert err_graphed < REL_TOL and err_graphed <= 2 * err_eager + 0.02, (step, err_graphed, err_eager)
            top = r.topk(2).values
            if float(top[0] - top[1]) > MARGIN_FACTOR * float((y - r).abs().max()):
                assert int(y.argmax()) == int(r.argmax()), f"step {step}: a decisive greedy token differs"
    assert graphed.span.compiled.captures == 2  # one graph per cache: the second cache captured its own
    gc.collect()
    assert len(graphed.span.compiled._graphs) == 0  # graphs go with their caches


def test_graphed_int4_decode_on_cuda() -> None:
    """int4 blocks (models.quant on the device) through graphed steps: the eager int4 step's tokens."""
    from meshinfer.errors import ConfigError

    path = tiny_checkpoint("qwen2")
    try:
        eager = LocalModel.from_pretrained(path, dtype="bfloat16", device="cuda", quant="int4")
    except ConfigError as err:
        pytest.skip(f"int4 weights do not run on CUDA in this build: {err}")
    graphed = LocalModel.from_pretrained(path, dtype="bfloat16", device="cuda", quant="int4", compile=True)
    want = eager.generate(PROMPT, STEPS, stop_token_ids=())
    for x, y in _teacher_forced(eager, graphed, PROMPT, want):
        torch.testing.assert_close(y, x, atol=2e-2 * float(x.abs().max()), rtol=2e-2)
    assert graphed.span.compiled is not None and not graphed.span.compiled.failed


@pytest.mark.slow
@pytest.mark.parametrize("compile_flag", [[], ["--compile"]], ids=["eager", "graphed"])
def test_swarm_of_two_cuda_servers_equals_local_cuda_bf16(compile_flag: list[str]) -> None:
    from meshinfer.client.model import DistributedModel
    from meshinfer.testing.swarm import LocalSwarm

    path = tiny_checkpoint("llama")
    # graphed servers against a graphed local model: same kernels, so the same rounding (masked attention over the
    # whole capacity differs from eager's slice of filled slots in the last bits)
    local = LocalModel.from_pretrained(path, dtype="bfloat16", device="cuda", compile=bool(compile_flag))
    want = local.generate(PROMPT, STEPS, stop_token_ids=())
    with LocalSwarm(path, [(0, 2), (2, 4)], dtype="bf16", server_args=["--device", "cuda", *compile_flag]) as swarm, \
            DistributedModel.from_pretrained(path, swarm.initial_peers, dtype="bfloat16", device="cuda") as client:
        assert client.generate(PROMPT, STEPS, stop_token_ids=()) == want
