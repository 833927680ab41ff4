"""ModelSpec parsing (transformers 4.x and 5.x config dialects), rope frequencies and cache sizing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from meshinfer.errors import CheckpointError, UnsupportedModelError
from meshinfer.models.kv_cache import KVCache
from meshinfer.models.rope import inv_freq
from meshinfer.models.spec import ModelSpec
from meshinfer.testing.checkpoints import list_tiny_checkpoints, tiny_config

VARIANTS = list_tiny_checkpoints()


def v5_config(classic: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The same config as the installed transformers (5.x) writes it."""
    from transformers import AutoConfig

    src = tmp_path / "classic"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(classic))
    AutoConfig.from_pretrained(str(src)).save_pretrained(str(tmp_path / "v5"))
    return json.loads((tmp_path / "v5" / "config.json").read_text())


@pytest.mark.parametrize(("family", "variant"), VARIANTS, ids=[f"{f}-{v}" for f, v in VARIANTS])
def test_both_config_dialects_give_the_same_spec(family: str, variant: str, tmp_path: Path) -> None:
    classic = tiny_config(family, variant)
    modern = v5_config(classic, tmp_path)
    assert "rope_parameters" in modern and "rope_theta" not in modern and "dtype" in modern
    assert ModelSpec.from_config(modern) == ModelSpec.from_config(classic)


def test_family_facts() -> None:
    qwen3 = ModelSpec.from_config(tiny_config("qwen3"))
    assert (qwen3.family, qwen3.head_dim, qwen3.qk_norm, qwen3.attention_bias) == ("qwen3", 32, True, False)
    assert qwen3.head_dim * qwen3.num_heads != qwen3.hidden_size  # explicit head_dim wins
    qwen2 = ModelSpec.from_config(tiny_config("qwen2"))
    assert qwen2.attention_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    assert "model.layers.0.self_attn.q_proj.bias" in qwen2.block_tensors(0)
    tied = ModelSpec.from_config(tiny_config("llama", "tied"))
    assert tied.tie_word_embeddings and "lm_head.weight" not in tied.head_tensors()
    mha = ModelSpec.from_config(tiny_config("llama", "mha"))
    assert mha.num_kv_heads == mha.num_heads
    gqa = ModelSpec.from_config(tiny_config("llama"))
    assert gqa.num_kv_heads < gqa.num_heads and gqa.rope_scaling is None
    llama3 = ModelSpec.from_config(tiny_config("llama", "llama3"))
    assert llama3.rope_scaling is not None and llama3.rope_scaling.factor == 8.0
    assert llama3.rope_scaling.original_max_position_embeddings == 64 and llama3.rope_theta == 500000.0


def test_eos_ids_include_generation_config(tiny_checkpoints) -> None:
    path = tiny_checkpoints[("llama", "default")]
    gen = json.loads((path / "generation_config.json").read_text())
    spec = ModelSpec.from_dir(path)
    assert set(gen["eos_token_id"]) <= set(spec.eos_token_ids)


@pytest.mark.parametrize("variant", ["default", "llama3"])
def test_inv_freq_matches_transformers(variant: str) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    classic = tiny_config("llama", variant)
    spec = ModelSpec.from_config(classic)
    hf_config = LlamaConfig(**{k: v for k, v in classic.items() if k not in ("architectures", "model_type")})
    if variant == "llama3":
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, torch.device("cpu"))
        assert not torch.equal(inv_freq(spec), inv_freq(ModelSpec.from_config(tiny_config("llama"))))
    else:
        dim, base = spec.head_dim, spec.rope_theta
        expected = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    torch.testing.assert_close(inv_freq(spec), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("change", "error", "needle"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, UnsupportedModelError, "supported: default, llama3"),
        ({"hidden_act": "gelu"}, UnsupportedModelError, "only silu"),
        ({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}, UnsupportedModelError,
         "unsupported architecture 'phi3'; supported: llama, mistral, qwen2, qwen3"),
        ({"architectures": ["LlamaForSequenceClassification"]}, UnsupportedModelError,
         "unsupported architecture 'LlamaForSequenceClassification'"),
        ({"hidden_size": None}, CheckpointError, "missing 'hidden_size'"),
        ({"num_key_value_heads": 3}, CheckpointError, "not a multiple"),
        ({"vocab_size": -5}, CheckpointError, "'vocab_size' must be a positive integer"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, CheckpointError, "llama3 rope scaling"),
    ],
)
def test_bad_configs(change: dict[str, Any], error: type[Exception], needle: str) -> None:
    config = tiny_config("llama")
    for key, value in change.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    with pytest.raises(error) as err:
        ModelSpec.from_config(config)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_sliding_window_layers() -> None:
    mistral = tiny_config("mistral")
    assert ModelSpec.from_config(mistral).sliding_window is None
    spec = ModelSpec.from_config({**mistral, "sliding_window": 8})
    assert spec.sliding_window == 8 and all(spec.sliding_layers)
    wide = ModelSpec.from_config({**mistral, "sliding_window": mistral["max_position_embeddings"]})
    assert wide.sliding_window is None  # a window as long as the context excludes nothing
    qwen2 = tiny_config("qwen2")
    assert ModelSpec.from_config({**qwen2, "sliding_window": 8}).sliding_window is None  # use_sliding_window off
    on = ModelSpec.from_config({**qwen2, "sliding_window": 8, "use_sliding_window": True, "max_window_layers": 2})
    assert on.sliding_layers == (False, False, True, True)
    typed = ModelSpec.from_config({**qwen2, "sliding_window": 8, "use_sliding_window": True,
                                   "layer_types": ["sliding_attention", "full_attention"] * 2})
    assert [typed.window_of(i) for i in range(4)] == [8, None, 8, None]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cache_size_is_known_before_allocation(dtype: str) -> None:
    spec = ModelSpec.from_config(tiny_config("llama"))
    expected = KVCache.nbytes(spec, 3, 100, batch=2, dtype=dtype)
    item = 4 if dtype == "float32" else 2
    assert expected == 2 * 3 * 2 * spec.num_kv_heads * 100 * spec.head_dim * item
    assert KVCache(spec, 3, 100, batch=2, dtype=dtype).size_bytes == expected
