"""``LocalModel`` on a ``--device``: ``auto``/``cpu``/``torch.device`` give the same tokens here (the CPU), ``auto``
dtype is fp32 on the CPU, absent and malformed devices are one-line ConfigErrors, and greedy sampling keeps the
logits' device while sampled decoding draws on the CPU (the CPU-only parts of issue 18's device paths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from device_parity import BF16_CAP, FP32_TOL, check, parity
from meshinfer.config import SamplingConfig
from meshinfer.errors import ConfigError
from meshinfer.models.engine import LocalModel
from meshinfer.models.sampling import Sampler

PROMPT = [1, 45, 300, 77, 12, 401, 99, 250, 18, 333, 64, 7, 5, 6, 200, 201]
SAMPLED = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=7)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


@pytest.fixture(scope="module")
def llama_path(tiny_checkpoints: dict[tuple[str, str], Path]) -> Path:
    return tiny_checkpoints[("llama", "default")]


@pytest.fixture(scope="module")
def default(llama_path: Path) -> LocalModel:
    """The model as ``from_pretrained`` always opened it (the CPU, fp32)."""
    return LocalModel.from_pretrained(llama_path)


@pytest.mark.parametrize("device", ["cpu", "auto", " CPU ", torch.device("cpu")])
def test_cpu_and_auto_give_the_default_models_tokens(llama_path: Path, default: LocalModel,
                                                     device: str | torch.device) -> None:
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto is a GPU here")
    model = LocalModel.from_pretrained(llama_path, dtype="auto", device=device)
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float32)
    assert model.generate(PROMPT, 12, stop_token_ids=()) == default.generate(PROMPT, 12, stop_token_ids=())
    assert (model.generate(PROMPT, 12, SAMPLED, stop_token_ids=())
            == default.generate(PROMPT, 12, SAMPLED, stop_token_ids=()))
    assert torch.equal(model.prefill_logits(PROMPT), default.prefill_logits(PROMPT))


def test_seeded_sampling_repeats(default: LocalModel) -> None:
    first = default.generate(PROMPT, 12, SAMPLED, stop_token_ids=())
    assert default.generate(PROMPT, 12, SAMPLED, stop_token_ids=()) == first


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_a_device_this_machine_lacks_is_one_config_error(llama_path: Path, device: str | torch.device) -> None:
    with pytest.raises(ConfigError, match=r"^--device cuda(:\d)?: .*use --device cpu \(or auto\)$") as err:
        LocalModel.from_pretrained(llama_path, device=device)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_a_malformed_device_names_the_accepted_forms(llama_path: Path, device: str) -> None:
    with pytest.raises(ConfigError, match=r"^--device must be auto, cpu, cuda, cuda:N or mps, got"):
        LocalModel.from_pretrained(llama_path, device=device)


def test_greedy_keeps_the_logits_device_and_sampling_draws_on_the_cpu() -> None:
    logits = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.5])  # a tie: argmax takes the first, as HF (torch.argmax)
    greedy = Sampler(SamplingConfig(temperature=0.0, repetition_penalty=1.3))
    scores = greedy.processed_logits(logits, [1])
    assert scores.device == logits.device and scores.dtype == torch.float32
    assert greedy.next_token(logits, [1]) == 3  # 3.0 / 1.3 < 3.0: the penalised tie loses
    sampled = Sampler(SamplingConfig(temperature=0.7, seed=5))
    assert sampled.processed_logits(logits.to(torch.bfloat16), []).device.type == "cpu"
    assert sampled.generator.device.type == "cpu"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_bf16_tolerance_holds_on_the_cpu(tiny_checkpoints: dict[tuple[str, str], Path], family: str) -> None:
    """The CPU twin of tests/gpu/test_gpu_client.py: CPU bf16 against CPU fp32 passes the documented bf16 cap
    (tests/device_parity.py), and fp32 on an explicit ``torch.device`` is exact."""
    path = tiny_checkpoints[(family, "default")]
    ref = LocalModel.from_pretrained(path)
    exact = parity(ref, LocalModel.from_pretrained(path, device=torch.device("cpu")), PROMPT, 16)
    assert exact.worst == 0.0 and exact.agreed() == 16
    check(exact, FP32_TOL)
    low = parity(ref, LocalModel.from_pretrained(path, dtype="bf16", device="cpu"), PROMPT, 16)
    check(low, BF16_CAP)
    assert low.worst > 0.05  # bf16 really differs (the check above is not vacuous)


def test_the_head_takes_hidden_states_in_any_dtype(llama_path: Path) -> None:
    """What a bf16 head on a GPU gets from an fp32 wire: the rows are cast (and moved) in one go, the logits are
    float32 on the head's device, the same as for rows already in the head's dtype."""
    low = LocalModel.from_pretrained(llama_path, dtype="bf16")
    rows = torch.randn(3, low.spec.hidden_size, generator=torch.Generator().manual_seed(1))  # [B, H] fp32
    logits = low.head.logits(rows)  # [B, V]
    assert (logits.dtype, logits.device, logits.shape) == (torch.float32, low.device, (3, low.spec.vocab_size))
    assert torch.equal(logits, low.head.logits(rows.to(torch.bfloat16)))
