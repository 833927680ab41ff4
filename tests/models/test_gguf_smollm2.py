"""A real GGUF (SmolLM2-135M-Instruct, Q4_1 / Q8_0 / F32 tensors, llama.cpp's q/k permutation) against outside
references: the ``gguf`` package's dequantizer and transformers' GGUF loader.

* the view's config says what the GGUF says (and what transformers' GGUF config reader says);
* every one of the 272 tensors, read through ``Checkpoint.read`` (dequantized, q/k rows un-permuted), equals
  ``gguf.quants.dequantize`` of the same GGUF tensor un-permuted (and permuting ours back gives gguf's array
  exactly), and equals the state dict transformers builds from the GGUF (which un-permutes itself): bit-exact,
  no tolerance;
* greedy decoding (32 new tokens, eos ignored) equals transformers' on a chat prompt rendered with the GGUF's
  own chat template (the answer names Paris) and on a plain prompt, both with transformers loading the GGUF and
  with transformers loading our ``convert_gguf`` output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from meshinfer.models import ggml
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.engine import LocalModel
from meshinfer.models.gguf import gguf_view
from meshinfer.models.gguf_file import GgufFile, hf_tensor_name

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PLAIN = "The three primary colors are"


def _hf_from_gguf(path: Path) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def view(smollm2_gguf: Path) -> Path:
    return gguf_view(smollm2_gguf)


@pytest.fixture(scope="module")
def ours(smollm2_gguf: Path) -> LocalModel:
    return LocalModel.from_pretrained(smollm2_gguf)  # the .gguf file itself, through its view


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path) -> Any:
    return _hf_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def prompts(ours: LocalModel) -> dict[str, list[int]]:
    tok = ours.tokenizer
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    return {"chat": tok.encode(chat, add_special_tokens=False), "plain": tok.encode(PLAIN, add_special_tokens=False)}


def test_the_view_config_states_the_gguf_facts(view: Path, ours: LocalModel, reference: Any) -> None:
    spec = ours.spec
    assert (spec.family, spec.num_blocks, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
            spec.intermediate_size, spec.vocab_size, spec.max_position_embeddings) == (
        "llama", 30, 576, 9, 3, 64, 1536, 49152, 8192)
    assert (spec.rope_theta, spec.rms_norm_eps, spec.tie_word_embeddings) == (1e5, 1e-5, True)
    assert (spec.bos_token_id, spec.eos_token_ids) == (1, (2,))
    section = Checkpoint(view).gguf
    assert section is not None and section["qk_permuted"] is True
    types = [t for t, _ in section["tensors"].values()]
    assert (types.count("Q4_1"), types.count("F32"), types.count("Q8_0"), len(types)) == (210, 61, 1, 272)
    c = reference.config  # transformers' own reading of the GGUF metadata
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (
        30, 576, 9, 3, 1536, 49152, 8192, True)


def test_every_tensor_equals_gguf_and_transformers_bit_for_bit(smollm2_gguf: Path, view: Path,
                                                              reference: Any) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ckpt = Checkpoint(smollm2_gguf)
    assert ckpt.path == view and ckpt.is_gguf
    theirs = reference.state_dict()
    reader = GGUFReader(smollm2_gguf)
    assert len(reader.tensors) == 272
    seen = set()
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        assert name is not None
        seen.add(name)
        ours = ckpt.read([name])[name]
        expected = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if ".q_proj." in name or ".k_proj." in name:
            heads = 9 if ".q_proj." in name else 3
            assert torch.equal(ours[ggml.permute_rows(ours.shape[0], heads)], expected), name
            expected = expected[ggml.unpermute_rows(ours.shape[0], heads)]
        assert torch.equal(ours, expected), name
        assert torch.equal(ours, theirs[name]), name
    assert seen == set(ckpt.gguf["tensors"])


def test_raw_ggml_tensors_keep_the_gguf_encoding(view: Path) -> None:
    ckpt = Checkpoint(view)
    raw = ckpt.read_ggml(["model.layers.0.self_attn.v_proj.weight", "model.embed_tokens.weight"])
    v, e = raw["model.layers.0.self_attn.v_proj.weight"], raw["model.embed_tokens.weight"]
    assert (v.ggml_type, v.shape, tuple(v.data.shape)) == ("Q4_1", (192, 576), (192, 360))
    assert (e.ggml_type, e.shape, tuple(e.data.shape)) == ("Q8_0", (49152, 576), (49152, 612))
    q, scale, low = ggml.q4_decompose(v)
    assert torch.equal(scale.repeat_interleave(32, 1) * q.float() + low.repeat_interleave(32, 1), v.dequantize())


def _greedy(model: Any, prompt: list[int]) -> list[int]:
    """transformers' greedy decoding for exactly NEW_TOKENS tokens, eos included (its forward pass with its KV
    cache, argmax each step: ``generate`` would stop at, or with ``min_new_tokens`` suppress, the eos token)."""
    import inspect

    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x / 4.x
    out: list[int] = []
    with torch.no_grad():
        step = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(NEW_TOKENS):
            out.append(int(step.logits[0, -1].argmax()))
            step = model(torch.tensor([[out[-1]]]), use_cache=True, **{kw: getattr(step, kw)})
    return out


def test_chat_greedy_equals_transformers_and_answers_paris(ours: LocalModel, reference: Any, prompts,
                                                           smollm2_gguf: Path) -> None:
    tok = ours.tokenizer
    assert tok.chat_template == GgufFile(smollm2_gguf).metadata["tokenizer.chat_template"]
    assert tok.decode(prompts["chat"]).endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                                "<|im_start|>assistant\n")
    tokens = ours.generate(prompts["chat"], NEW_TOKENS, stop_token_ids=())
    assert tokens == _greedy(reference, prompts["chat"])
    answer = tok.decode(tokens[: tokens.index(2)] if 2 in tokens else tokens)
    assert "Paris" in answer, answer


def test_plain_greedy_equals_transformers(ours: LocalModel, reference: Any, prompts) -> None:
    tokens = ours.generate(prompts["plain"], NEW_TOKENS, stop_token_ids=())
    assert tokens == _greedy(reference, prompts["plain"])
    assert len(set(tokens)) > 8  # real text, not a loop


def test_converted_directory_loads_in_transformers_and_generates_the_same(smollm2_gguf: Path, ours: LocalModel,
                                                                          prompts, tmp_path: Path) -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meshinfer.models.gguf_convert import convert_gguf

    out = convert_gguf(smollm2_gguf, tmp_path / "hf", dtype="fp32", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "meshinfer_gguf" not in config and config["torch_dtype"] == "float32"
    converted = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    assert AutoTokenizer.from_pretrained(str(out)).encode(PLAIN, add_special_tokens=False) == prompts["plain"]
    for prompt in prompts.values():
        assert _greedy(converted, prompt) == ours.generate(prompt, NEW_TOKENS, stop_token_ids=())
