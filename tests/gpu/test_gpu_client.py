"""Clients on a CUDA GPU (issue 18): ``LocalModel`` and the swarm client's head on ``cuda`` against the CPU fp32
reference, the sampler on CUDA logits, and ``meshinfer generate --device cuda``. Skipped without CUDA.

Tolerances and why: tests/device_parity.py (fp32 on the GPU: 1e-3 logit std; bf16: no worse than 1.5 x our CPU
bf16 error + 0.02, and below 0.75 std, since tiny random checkpoints amplify bf16 rounding: transformers' own bf16
run differs from fp32 by 0.38 std there). Greedy tokens must agree up to the first position where an error under
the tolerance could flip the argmax.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from device_parity import BF16_CAP, BF16_FLOOR, BF16_SLACK, FP32_TOL, check, parity
from meshinfer.config import SamplingConfig
from meshinfer.models.engine import LocalModel
from meshinfer.models.sampling import Sampler
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import meshinfer_argv

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")]

PROMPT = [1, 45, 300, 77, 12, 401, 99, 250, 18, 333, 64, 7, 5, 6, 200, 201]
N = 16
FAMILIES = ["llama", "qwen2", "mistral", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[Path, LocalModel]:
    path = tiny_checkpoint(request.param)
    return path, LocalModel.from_pretrained(path)  # the reference: the CPU, fp32


def test_cuda_fp32_matches_the_cpu(family: tuple[Path, LocalModel]) -> None:
    path, ref = family
    gpu = LocalModel.from_pretrained(path, dtype="fp32", device="cuda")
    assert gpu.device == torch.device("cuda", 0) and gpu.prefill_logits(PROMPT).device.type == "cuda"
    p = parity(ref, gpu, PROMPT, N)
    check(p, FP32_TOL)
    sampling = SamplingConfig(temperature=0.0, repetition_penalty=1.3)  # the penalty runs on the device
    want = ref.generate(PROMPT, N, sampling, stop_token_ids=())
    got = gpu.generate(PROMPT, N, sampling, stop_token_ids=())
    assert got[:p.must_agree(FP32_TOL)] == want[:p.must_agree(FP32_TOL)]


def test_cuda_auto_is_bf16_within_the_bf16_tolerance(family: tuple[Path, LocalModel]) -> None:
    path, ref = family
    gpu = LocalModel.from_pretrained(path, dtype="auto", device="auto")
    assert (gpu.device.type, gpu.dtype) == ("cuda", torch.bfloat16)
    cpu_bf16 = parity(ref, LocalModel.from_pretrained(path, dtype="bf16"), PROMPT, N)
    p = parity(ref, gpu, PROMPT, N)
    tol = min(BF16_CAP, BF16_SLACK * cpu_bf16.worst + BF16_FLOOR)
    check(p, tol)


def test_sampler_on_cuda_logits_chooses_what_the_cpu_chooses() -> None:
    """Same logits, wherever they are: greedy (argmax on the device) and seeded sampling (drawn on the CPU with a
    CPU generator) give the same tokens."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(512, generator=g) * 3 for _ in range(32)]  # [V] each
    for config in (SamplingConfig(temperature=0.0, repetition_penalty=1.2),
                   SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=7)):
        cpu, gpu = Sampler(config), Sampler(config)
        history: list[int] = [3, 17, 200]
        for row in rows:
            token = cpu.next_token(row, history)
            assert gpu.next_token(row.cuda(), history) == token
            history.append(token)


@pytest.fixture(scope="module")
def swarm() -> Iterator[tuple[Path, list[str]]]:
    from meshinfer.testing.swarm import LocalSwarm

    path = tiny_checkpoint("llama")
    local = LocalSwarm(path, [(0, 2), (2, 4)], startup_timeout=120).start()  # servers on the CPU
    try:
        yield path, local.initial_peers
    finally:
        local.stop()


@pytest.mark.slow
def test_swarm_client_head_on_cuda(swarm: tuple[Path, list[str]]) -> None:
    from meshinfer.client.model import DistributedModel

    path, peers = swarm
    ref = LocalModel.from_pretrained(path)
    exact = parity(ref, LocalModel.from_pretrained(path, device="cuda"), PROMPT, N)  # where fp32 tokens may part
    want = ref.generate(PROMPT, N, stop_token_ids=())
    need = exact.must_agree(FP32_TOL)
    with DistributedModel.from_pretrained(path, peers, dtype="float32", device="cuda") as client:
        assert (client.device.type, client.wire_dtype) == ("cuda", "float32")
        assert client.generate(PROMPT, N, stop_token_ids=())[:need] == want[:need]
        got: dict[int, list[int]] = {}

        def work(i: int) -> None:  # concurrent generations: their head rows batched, copied to the GPU at once
            got[i] = client.generate(PROMPT, N, stop_token_ids=())

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(got[i][:need] == want[:need] for i in range(3)), got
        # prompt scoring: the swarm's CPU hidden states through the head on the GPU, scores on the CPU
        scored = asyncio.run_coroutine_threadsafe(client.ascore_prompt(PROMPT, 2), client.loop).result(120)
        want_scores = ref.score_prompt(PROMPT, 2)
        assert [s.token for s in scored] == PROMPT[1:]
        diffs = [abs((s.logprob or 0.0) - (w.logprob or 0.0)) for s, w in zip(scored, want_scores, strict=True)]
        assert max(diffs) < 1e-3, diffs
    with DistributedModel.from_pretrained(path, peers, dtype="auto") as client:  # device auto: the GPU, bf16 head
        assert (client.device.type, client.dtype, client.wire_dtype) == ("cuda", torch.bfloat16, "float32")
        assert len(client.generate(PROMPT, N, stop_token_ids=())) == N


@pytest.mark.slow
def test_cli_generate_on_cuda() -> None:
    proc = subprocess.run(meshinfer_argv("generate", "--model", str(tiny_checkpoint("llama")), "--prompt", "hi",
                                         "--max-new-tokens", "8", "--device", "cuda", "--json"),
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["dtype"] == "bfloat16" and len(doc["generated_token_ids"]) == 8
