"""Tiny GGUFs of every family (llama and mistral as llama.cpp's ``llama`` architecture with permuted q/k rows,
qwen2 with q/k/v biases, qwen3 with q/k norms and head_dim != hidden / heads) in float and quantized types,
against transformers' GGUF loader (the outside reference: its own dequantizer, name mapping and q/k
un-permutation) and, for F32, against the Hugging Face checkpoint they were written from.

transformers ignores ``qwen3.attention.key_length`` when it reads a GGUF config (it derives head_dim from
hidden_size / heads), so for qwen3 the reference model gets the source checkpoint's config and only its weights
from the GGUF.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.gguf_files import tiny_gguf

PROMPT = [1, 45, 300, 77, 12, 401, 99, 250, 18, 333, 64, 7, 5, 6, 200, 201]
NEW_TOKENS = 24
CASES = [(f, "default", t) for f in ("llama", "mistral", "qwen2", "qwen3")
         for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")]
CASES += [("llama", "tied", "Q8_0"), ("llama", "mha", "Q4_1"), ("qwen2", "default", "Q5_1")]


def _transformers(path: Path, family: str, variant: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    extra = {}
    if family == "qwen3":
        extra["config"] = AutoConfig.from_pretrained(tiny_checkpoint(family, variant=variant))
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                attn_implementation="eager", **extra).eval()


@pytest.mark.parametrize(("family", "variant", "ggml_type"), CASES, ids=["-".join(c) for c in CASES])
def test_logits_and_greedy_tokens_equal_transformers_gguf_loading(family: str, variant: str, ggml_type: str,
                                                                  hf_greedy) -> None:
    path = tiny_gguf(family, ggml_type, variant=variant)
    ours = LocalModel.from_pretrained(path)
    ref = _transformers(path, family, variant)
    ours_state = Checkpoint(path).read(ours.spec.block_tensors(0))
    theirs_state = ref.state_dict()
    for name, value in ours_state.items():  # the very same dequantized, un-permuted weights
        assert torch.equal(value, theirs_state[name]), name
    with torch.no_grad():
        logits = ref(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(ours.prefill_logits(PROMPT), logits, atol=1e-4, rtol=1e-4)
    expected = hf_greedy(ref, PROMPT, NEW_TOKENS)
    assert len(set(expected)) >= 4
    assert ours.generate(PROMPT, NEW_TOKENS, stop_token_ids=()) == expected


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_f32_gguf_holds_exactly_the_source_checkpoint(family: str, our_model) -> None:
    gguf, source = Checkpoint(tiny_gguf(family, "F32")), Checkpoint(tiny_checkpoint(family))
    assert gguf.spec.num_blocks == source.spec.num_blocks and gguf.gguf is not None
    assert gguf.gguf["qk_permuted"] is (family in ("llama", "mistral"))
    names = list(source.spec.head_tensors())
    for i in range(source.spec.num_blocks):
        names += list(source.spec.block_tensors(i))
    a, b = gguf.read(names), source.read(names)
    for name in names:
        assert torch.equal(a[name], b[name]), name
    if gguf.gguf["qk_permuted"]:  # the bytes in the file are in llama.cpp's order, not Hugging Face's
        raw = gguf.read_ggml(["model.layers.0.self_attn.q_proj.weight"])
        assert torch.equal(raw["model.layers.0.self_attn.q_proj.weight"].dequantize(),
                           b["model.layers.0.self_attn.q_proj.weight"])
        on_disk = Checkpoint(gguf.path).weight_map["model.layers.0.self_attn.q_proj.weight"]
        assert on_disk == "model.gguf"
    ours, ref = LocalModel.from_pretrained(gguf.path), our_model(tiny_checkpoint(family))
    assert torch.equal(ours.prefill_logits(PROMPT), ref.prefill_logits(PROMPT))


def test_spans_load_from_a_gguf_like_from_a_directory() -> None:
    from meshinfer.types import BlockRange

    ckpt = Checkpoint(tiny_gguf("qwen2", "Q8_0"))
    head, first, rest = ckpt.load_head(), ckpt.load_span(BlockRange(0, 2)), ckpt.load_span(BlockRange(2, 4))
    whole = LocalModel.from_pretrained(ckpt.path)
    with torch.inference_mode():
        c1, c2 = first.new_cache(len(PROMPT)), rest.new_cache(len(PROMPT))
        logits = head.logits(rest(first(head.embed(torch.tensor([PROMPT])), c1), c2))[0]
    torch.testing.assert_close(logits, whole.prefill_logits(PROMPT), atol=1e-5, rtol=1e-5)
