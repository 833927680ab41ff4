"""``GenerationParams`` (pure value logic) and the one generator protocol both models implement."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from meshinfer.config import SamplingConfig
from meshinfer.models.generator import CheckpointGenerator, GenerationParams


def test_of_normalises_the_public_arguments() -> None:
    params = GenerationParams.of(5, None, [7, 7, 9], 2)
    assert params == GenerationParams(5, SamplingConfig(), frozenset({7, 9}), 2)
    assert GenerationParams.of(3) == GenerationParams(3)
    assert GenerationParams.of(3).sampling == SamplingConfig() and GenerationParams.of(3).top_logprobs is None
    seeded = SamplingConfig(temperature=0.7, seed=4)
    assert GenerationParams.of(3, seeded).sampling is seeded


def test_stops_default_to_the_models_eos_and_empty_disables() -> None:
    assert GenerationParams(4).stops((2, 3)) == frozenset({2, 3})
    assert GenerationParams.of(4, stop_token_ids=()).stops((2, 3)) == frozenset()
    assert GenerationParams.of(4, stop_token_ids=[5]).stops((2, 3)) == frozenset({5})


def test_params_are_frozen_and_hashable() -> None:
    params = GenerationParams.of(4, stop_token_ids=[1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_new_tokens = 5  # type: ignore[misc]
    assert hash(params) == hash(GenerationParams.of(4, stop_token_ids=(1,)))


def test_both_models_share_the_checkpoint_generator() -> None:
    from meshinfer.client.model import DistributedModel
    from meshinfer.models.engine import LocalModel

    assert issubclass(LocalModel, CheckpointGenerator) and issubclass(DistributedModel, CheckpointGenerator)


@pytest.mark.slow  # starts a Python process
def test_importing_the_protocol_does_not_import_torch() -> None:
    code = "import sys, meshinfer.models.generator; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
