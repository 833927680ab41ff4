"""Fixtures for the model-engine tests: our models and transformers references, built once per session.

transformers is used here only as the reference implementation (never by the engine at run time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from meshinfer.models.engine import LocalModel


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and OpenMP spin-waits waste CPU on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def hf_model() -> Callable[..., Any]:
    """Load (and cache) ``AutoModelForCausalLM`` for a checkpoint directory, in eval mode."""
    cache: dict[tuple[Path, torch.dtype], Any] = {}

    def load(path: Path, dtype: torch.dtype = torch.float32) -> Any:
        key = (Path(path), dtype)
        if key not in cache:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            cache[key] = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, attn_implementation="eager"
            ).eval()
        return cache[key]

    return load


@pytest.fixture(scope="session")
def our_model() -> Callable[..., LocalModel]:
    """Load (and cache) our ``LocalModel`` for a checkpoint directory."""
    cache: dict[tuple[Path, str], LocalModel] = {}

    def load(path: Path, dtype: str = "float32") -> LocalModel:
        key = (Path(path), dtype)
        if key not in cache:
            cache[key] = LocalModel.from_pretrained(path, dtype=dtype)
        return cache[key]

    return load


@pytest.fixture(scope="session")
def hf_greedy() -> Callable[[Any, list[int], int], list[int]]:
    """transformers' greedy ``generate()`` for exactly ``n`` new tokens (eos ignored)."""

    def run(model: Any, prompt: list[int], n: int) -> list[int]:
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), generation_config=config, attention_mask=torch.ones(1, len(prompt))
            )
        return [int(t) for t in out[0, len(prompt) :]]

    return run
