"""Compiled decode steps (``models.compiled``) give the eager engine's tokens, on every block feature that
changes the step: q/k norms (qwen3), q/k/v biases (qwen2), a sliding window (mistral), int4 weights."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from meshinfer.models.compiled import MIN_CAPACITY, capacity
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint

PROMPT = [5, 17, 42, 7, 99, 3, 11, 64]
NEW = 40


def test_capacity_buckets() -> None:
    assert capacity(1, 8192) == MIN_CAPACITY == 256
    assert capacity(256, 8192) == 256 and capacity(257, 8192) == 512 and capacity(3000, 8192) == 4096
    assert capacity(300, 300) == 300 and capacity(200, 100) == 200  # never above the context, never below need


@pytest.fixture(scope="module")
def windowed(sliding_window_checkpoint: Callable[[int], Path]) -> Path:
    """The tiny mistral with a sliding window of 16 tokens (generations cross it)."""
    return sliding_window_checkpoint(16)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "quant"), [("qwen3", "none"), ("qwen2", "int4"), ("mistral-window", "none")])
def test_compiled_decode_equals_eager(family: str, quant: str, windowed: Path) -> None:
    path = windowed if family == "mistral-window" else tiny_checkpoint(family)
    eager = LocalModel.from_pretrained(path, quant=quant)
    compiled = LocalModel.from_pretrained(path, quant=quant, compile=True)
    assert eager.span.compiled is None and compiled.span.compiled is not None
    assert compiled.generate(PROMPT, NEW, stop_token_ids=()) == eager.generate(PROMPT, NEW, stop_token_ids=())
    assert not compiled.span.compiled.failed
    with torch.inference_mode():  # and the logits of each step, closely
        a, b = eager.span.new_cache(capacity(len(PROMPT) + 8, 256)), compiled.span.new_cache(capacity(16, 256))
        x, y = eager._step(torch.tensor([PROMPT]), a), compiled._step(torch.tensor([PROMPT]), b)
        for _ in range(8):
            token = int(x.argmax())
            x, y = eager._step(torch.tensor([[token]]), a), compiled._step(torch.tensor([[token]]), b)
            torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)


def test_a_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tiny_checkpoint("llama")
    model = LocalModel.from_pretrained(path, compile=True)

    def broken(*args: object, **kwargs: object) -> object:
        def graph(*a: object, **k: object) -> object:
            raise RuntimeError("no C++ compiler found")
        return graph

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="meshinfer.models.compiled"):
        got = model.generate(PROMPT, 8, stop_token_ids=())
    assert got == LocalModel.from_pretrained(path).generate(PROMPT, 8, stop_token_ids=())
    assert model.span.compiled is not None and model.span.compiled.failed
    assert "compiled decode is off for this model (falling back to eager): no C++ compiler found" in caplog.text
