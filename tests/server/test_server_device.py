"""The server's device, dtype and KV budget: --device/--dtype validation and resolution on this (CPU) machine,
the automatic KV budget as a pure function of free memory, and the budget sized after a real span is loaded."""

from __future__ import annotations

import pytest
import torch

from meshinfer.errors import ConfigError, UsageError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.server.config import (
    CPU_CACHE_TOKENS,
    GPU_KV_FRACTION,
    ServerConfig,
    activation_reserve,
    auto_cache_tokens,
)
from meshinfer.server.device import ServerDevice, open_device, size_cache
from meshinfer.types import BlockRange

GIB = 1024**3


def test_device_and_dtype_flags_are_validated_without_torch() -> None:
    cfg = ServerConfig(model="m")
    assert (cfg.device, cfg.dtype, cfg.cache_tokens) == ("auto", "auto", None)
    assert ServerConfig(model="m", device=" CUDA:1 ", dtype="bf16").device == "cuda:1"
    assert ServerConfig(model="m", dtype="AUTO").dtype == "auto"
    for kwargs, text in [(dict(device="tpu"), "--device must be auto, cpu, cuda, cuda:N or mps"),
                         (dict(device="cpu:1"), "--device must be"),
                         (dict(dtype="int8"), "unknown dtype"),
                         (dict(cache_tokens=-5), "--cache-tokens must be > 0")]:
        with pytest.raises(ConfigError, match=text):
            ServerConfig(model="m", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="sized when the server starts"):
        _ = ServerConfig(model="m").kv_budget


def test_open_device_on_the_cpu_keeps_todays_defaults() -> None:
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("auto picks the GPU on this machine")
    for device in ("auto", "cpu"):
        cfg, dev = open_device(ServerConfig(model="m", device=device))
        assert (cfg.device, cfg.dtype, cfg.cache_tokens, cfg.kv_budget) == ("cpu", "float32", 16384, 16384)
        assert dev.label == "cpu" and dev.is_cpu and dev.memory_used_free() is None
    cfg, _ = open_device(ServerConfig(model="m", device="cpu", dtype="bf16", cache_tokens=100))
    assert (cfg.dtype, cfg.kv_budget, cfg.peer_tokens) == ("bfloat16", 100, 50)


def test_a_gpu_this_machine_lacks_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        open_device(ServerConfig(model="m", device="cuda"))
    text = str(caught.value)
    assert text.startswith("--device cuda: ") and "--device cpu" in text and "\n" not in text


def test_compile_on_a_server_needs_cuda() -> None:
    with pytest.raises(ConfigError, match="--compile on a server needs a CUDA device") as caught:
        open_device(ServerConfig(model="m", device="cpu", compile=True))
    assert "\n" not in str(caught.value)
    cfg, _ = open_device(ServerConfig(model="m", device="cpu"))
    assert cfg.compile is False


def test_auto_cache_tokens_is_exact_on_cpu_and_fills_gpu_memory() -> None:
    # CPU (or unknown free memory): today's budget whatever the memory
    assert auto_cache_tokens("cpu", 500 * GIB, 1024, 0) == CPU_CACHE_TOKENS == 16384
    assert auto_cache_tokens("cuda", None, 1024, 0) == CPU_CACHE_TOKENS
    # an H200 with 100 GiB free after the weights; a Llama-70B-like span of 10 blocks in bf16:
    # 2 (K, V) x 10 blocks x 8 kv heads x 128 dims x 2 bytes = 40960 bytes per token
    per_token = 2 * 10 * 8 * 128 * 2
    reserve = activation_reserve(2048, 8192, 28672, 2)
    assert reserve == 2048 * (4 * 8192 + 3 * 28672) * 2 * 4
    tokens = auto_cache_tokens("cuda", 100 * GIB, per_token, reserve)
    assert tokens == (int(100 * GIB * GPU_KV_FRACTION) - reserve) // per_token
    assert 2_000_000 < tokens < 2_400_000
    assert auto_cache_tokens("mps", 8 * GIB, per_token, reserve) > 0
    assert auto_cache_tokens("cuda", reserve // 2, per_token, reserve) == 0  # nothing fits: the server refuses


def test_size_cache_keeps_a_given_or_cpu_budget(ckpt: Checkpoint) -> None:
    span = ckpt.load_span(BlockRange(0, 2))
    cfg, dev = open_device(ServerConfig(model="m", device="cpu"))
    assert size_cache(cfg, span, dev) is cfg
    given, _ = open_device(ServerConfig(model="m", device="cpu", cache_tokens=77))
    assert size_cache(given, span, dev).kv_budget == 77
    # an unresolved budget on the CPU (open_device normally sets it) comes out as today's
    raw = ServerConfig(model="m", device="cpu", dtype="fp32")
    assert size_cache(raw, span, ServerDevice(torch.device("cpu"), "cpu")).kv_budget == CPU_CACHE_TOKENS


def test_serve_help_names_the_device_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from meshinfer.cli.main import main

    with pytest.raises(SystemExit) as caught:
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert caught.value.code == 0
    assert "--device DEVICE where to compute: auto" in out and "(default: auto)" in out
    assert "default: 16384 on the CPU, on a GPU what fits in 90 percent" in out


def test_size_cache_on_a_gpu_uses_the_memory_left_after_the_weights(ckpt: Checkpoint,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU branch's wiring, with the device's memory reading replaced (this machine has no GPU): the budget is
    auto_cache_tokens of the free bytes, the span's KV bytes per token and the activation reserve; nothing left
    is a one-line ConfigError naming the fixes."""
    from meshinfer.server import device as server_device

    span = ckpt.load_span(BlockRange(0, 2))
    spec = span.spec
    gpu = ServerDevice(torch.device("cuda", 0), "NVIDIA H200")
    cfg = ServerConfig(model="m", device="cuda", dtype="fp32")
    free = [80 * GIB]
    monkeypatch.setattr(server_device, "memory_info", lambda device: (free[0], 141 * GIB))
    monkeypatch.setattr(server_device, "release_cached", lambda device: None)
    reserve = activation_reserve(cfg.max_step_tokens, spec.hidden_size, spec.intermediate_size, 4)
    sized = size_cache(cfg, span, gpu)
    assert sized.kv_budget == auto_cache_tokens("cuda", 80 * GIB, span.cache_bytes(1), reserve) > CPU_CACHE_TOKENS
    assert sized.peer_tokens == sized.kv_budget // 2
    free[0] = reserve // 2
    with pytest.raises(ConfigError, match=r"no room for a KV cache on NVIDIA H200 after loading blocks 0:2 .*"
                                          r"--num-blocks/--blocks.*--quant int8/int4.*--cache-tokens") as caught:
        size_cache(cfg, span, gpu)
    assert "\n" not in str(caught.value)
