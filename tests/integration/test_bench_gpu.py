"""``meshinfer bench gpu`` on the CPU (a tiny shape, 2 blocks): every config measured or explained, the JSON fields
there, the bytes a step reads equal to what the formats hold, and the model built on the device as specified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from meshinfer.bench.gpu import SHAPES, config_dict
from meshinfer.bench.gpu_model import build, weights_read
from meshinfer.cli.main import main
from meshinfer.errors import ConfigError
from meshinfer.models.spec import ModelSpec

FIGURES = {"tokens_per_s", "ms_per_step", "ms_per_step_min", "weight_bytes", "kv_bytes_per_step", "capacity",
           "bytes_per_step", "achieved_gbs", "roofline_fraction"}


@pytest.mark.slow
def test_bench_gpu_cpu_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--device", "cpu", "--shape", "tiny", "--layers", "2", "--batches", "1,4",
                 "--modes", "eager,graphed", "--steps", "3", "--warmup", "1", "--context", "16",
                 "--peak-bandwidth", "100", "--out", str(out), "--json"]) == 0
    doc = json.loads(out.read_text())
    res = doc["results"]
    assert res["device"] == "cpu" and res["device_label"] == "cpu" and res["peak_bandwidth_gbs"] == 100
    configs = res["configs"]
    for key in ("bf16.b1.eager", "bf16.b4.eager", "int4.b1.eager", "int4.b4.eager"):
        c = configs[key]
        assert FIGURES <= set(c), key
        assert c["tokens_per_s"] > 0 and c["ms_per_step"] > 0
        assert c["bytes_per_step"] == c["weight_bytes"] + c["kv_bytes_per_step"]
        assert c["roofline_fraction"] == pytest.approx(c["achieved_gbs"] / 100, rel=1e-2, abs=1e-4)
    assert configs["bf16.b1.graphed"] == {"error": "graphed steps need a CUDA device"}
    assert "batch-1 only" in configs["bf16.b4.graphed"]["error"]
    assert configs["int4.b1.eager"]["weight_bytes"] < 0.45 * configs["bf16.b1.eager"]["weight_bytes"]
    # 4 sessions read 4 caches: context 16 + warm-up 1, then 3 timed steps (lengths 17, 18, 19 before each)
    assert configs["bf16.b4.eager"]["kv_bytes_per_step"] == 4 * configs["bf16.b1.eager"]["kv_bytes_per_step"]
    assert set(res["target"]) == {"batch1_bf16_roofline_min", "batch1_bf16_roofline_best", "met"}
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert json.loads(printed[-1])["configs"].keys() == configs.keys()


def test_random_model_shapes_and_bytes() -> None:
    spec = ModelSpec.from_config(config_dict("tiny", 2))
    head, span = build(spec, "bf16", torch.device("cpu"))
    assert span.dtype == torch.bfloat16 and len(span) == 2
    w = span.layers[0].gate_up.weight
    assert tuple(w.shape) == (2 * SHAPES["tiny"]["intermediate_size"], SHAPES["tiny"]["hidden_size"])
    assert 0.015 < float(w.float().std()) < 0.025 and float(span.layers[0].input_norm.float().min()) == 1.0
    params = len(span) * spec.block_param_count() + spec.hidden_size + spec.vocab_size * spec.hidden_size
    assert weights_read(head, span) == 2 * params  # bf16: blocks, final norm, LM head (not the embedding)


def test_llama3_8b_spec() -> None:
    spec = ModelSpec.from_config(config_dict("llama3-8b", 32))
    shape = (spec.hidden_size, spec.num_blocks, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    assert shape == (4096, 32, 32, 8, 128)
    assert (spec.intermediate_size, spec.vocab_size, spec.rope_theta) == (14336, 128256, 500000.0)
    assert 7.9e9 < spec.param_count() < 8.1e9
    with pytest.raises(ConfigError, match="--layers"):
        config_dict("tiny", 0)


def test_bad_flags_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, flag in ((["--modes", "eager,bogus"], "--modes"), (["--formats", "fp8"], "--formats"),
                       (["--batches", "0"], "--batches"), (["--steps", "0"], "--steps")):
        assert main(["bench", "gpu", "--device", "cpu", "--shape", "tiny", "--layers", "1", *argv]) == 2
        assert flag in capsys.readouterr().err


def test_bandwidth_and_target_figures() -> None:
    from meshinfer.bench.gpu import _bandwidth, _target

    got = _bandwidth({"weight_bytes": 3_000_000_000, "kv_bytes_per_step": 1_000_000_000, "ms_per_step": 1.0}, 5e12)
    assert got == {"bytes_per_step": 4_000_000_000, "achieved_gbs": 4000.0, "roofline_fraction": 0.8}
    unknown = _bandwidth({"weight_bytes": 1, "kv_bytes_per_step": 0, "ms_per_step": 1.0}, None)
    assert unknown["roofline_fraction"] is None
    configs = {"bf16.b1.eager": {"roofline_fraction": 0.3}, "bf16.b1.graphed": {"roofline_fraction": 0.72},
               "bf16.b32.eager": {"roofline_fraction": 0.9}, "int4.b1.graphed": {"error": "x"}}
    assert _target(configs, 5e12) == {"batch1_bf16_roofline_min": 0.7, "batch1_bf16_roofline_best": 0.72, "met": True}
    assert _target({"bf16.b1.eager": {"roofline_fraction": None}}, None)["met"] is None
