"""``DistributedModel`` on a ``device``: explicit ``cpu`` (text or ``torch.device``) and ``auto`` give the same greedy
and seeded tokens as ``LocalModel`` through a real two-server swarm, the head is where the device says, and the
wire carries float32 for ``dtype="auto"`` (an explicit half dtype still goes on the wire as before)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from client_helpers import PROMPT, start_swarm, stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.config import SamplingConfig
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

SAMPLED = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=7)


@dataclass
class Setup:
    model_dir: Path
    swarm: LocalSwarm
    local: LocalModel
    prompt_ids: list[int]


@pytest.fixture(scope="module")
def setup(bootstrap: list[str]) -> Iterator[Setup]:
    model_dir = tiny_checkpoint("llama")
    swarm = start_swarm(model_dir, [(0, 2), (2, 4)], bootstrap)
    try:
        local = LocalModel.from_pretrained(model_dir)
        yield Setup(model_dir, swarm, local, [int(i) for i in local.tokenizer(PROMPT)["input_ids"]])
    finally:
        stop_swarm(swarm)


def test_cpu_explicit_and_auto_equal_local(setup: Setup) -> None:
    want = setup.local.generate(setup.prompt_ids, 10, stop_token_ids=())
    want_sampled = setup.local.generate(setup.prompt_ids, 10, SAMPLED, stop_token_ids=())
    here = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    with contextlib.ExitStack() as stack:
        explicit = stack.enter_context(DistributedModel.from_pretrained(
            setup.model_dir, setup.swarm.initial_peers, device=torch.device("cpu")))
        auto = stack.enter_context(DistributedModel.from_pretrained(
            setup.model_dir, setup.swarm.initial_peers, dtype="auto"))
        assert (explicit.device, explicit.dtype, explicit.wire_dtype) == (torch.device("cpu"), torch.float32,
                                                                          "float32")
        assert auto.config.device == "auto" and auto.wire_dtype == "float32" and auto.device == here
        for client in (explicit, auto):
            if client.device.type == "cpu":
                assert client.generate(setup.prompt_ids, 10, stop_token_ids=()) == want
                assert client.generate(setup.prompt_ids, 10, SAMPLED, stop_token_ids=()) == want_sampled


def test_a_half_dtype_goes_on_the_wire_as_before(setup: Setup) -> None:
    with DistributedModel.from_pretrained(setup.model_dir, setup.swarm.initial_peers, dtype="bf16",
                                          device="cpu") as client:
        assert (client.dtype, client.wire_dtype) == (torch.bfloat16, "bfloat16")
        assert len(client.generate(setup.prompt_ids, 4, stop_token_ids=())) == 4
        assert client.last_session is not None and client.last_session.dtype == "bfloat16"
