"""Device choice (pure) and its torch shell on a machine without a GPU (CI's)."""

from __future__ import annotations

import pytest
import torch

from meshinfer.devices import DeviceChoice, DeviceFacts, choose_device, default_dtype, kv_tokens_for, parse_device
from meshinfer.errors import ConfigError
from meshinfer.models import device as dev


@pytest.mark.parametrize(("text", "kind", "index"), [
    ("auto", "auto", None), ("CPU", "cpu", None), (" cuda ", "cuda", None), ("cuda:3", "cuda", 3), ("mps", "mps", None),
])
def test_parse_device(text: str, kind: str, index: int | None) -> None:
    assert parse_device(text) == DeviceChoice(kind, index)


@pytest.mark.parametrize("text", ["", "gpu", "cuda:", "cuda:-1", "cpu:0", "mps:1", "cuda:1:2", "xla", "cuda:9999"])
def test_parse_device_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda, cuda:N or mps"):
        parse_device(text)


def test_auto_prefers_cuda_then_mps_then_cpu() -> None:
    auto = DeviceChoice("auto")
    assert str(choose_device(auto, DeviceFacts(cuda_count=2, mps=True, cuda_built=True))) == "cuda:0"
    assert str(choose_device(auto, DeviceFacts(mps=True))) == "mps"
    assert str(choose_device(auto, DeviceFacts())) == "cpu"


def test_missing_devices_are_explained() -> None:
    with pytest.raises(ConfigError, match="CPU-only wheel"):
        choose_device(DeviceChoice("cuda"), DeviceFacts(cuda_built=False))
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        choose_device(DeviceChoice("cuda", 0), DeviceFacts(cuda_built=True))
    with pytest.raises(ConfigError, match="has 2 CUDA device"):
        choose_device(DeviceChoice("cuda", 2), DeviceFacts(cuda_count=2, cuda_built=True))
    with pytest.raises(ConfigError, match="MPS is not available"):
        choose_device(DeviceChoice("mps"), DeviceFacts(cuda_count=1, cuda_built=True))
    assert str(choose_device(DeviceChoice("cuda"), DeviceFacts(cuda_count=1, cuda_built=True))) == "cuda:0"


def test_default_dtypes() -> None:
    assert default_dtype("cpu") == "float32"
    assert default_dtype("cuda") == "bfloat16"
    assert default_dtype("cuda", bf16_ok=False) == "float16"
    assert default_dtype("mps") == "float16"


def test_kv_tokens_for() -> None:
    assert kv_tokens_for(1000, 10, fraction=1.0) == 100
    assert kv_tokens_for(1000, 10, fraction=0.5, reserve_bytes=100) == 40
    assert kv_tokens_for(1000, 10, at_most=7) == 7
    assert kv_tokens_for(50, 100) == 0
    assert kv_tokens_for(-5, 100) == 0
    with pytest.raises(ConfigError):
        kv_tokens_for(1000, 0)


def test_torch_shell_on_this_machine() -> None:
    assert dev.resolve_device("cpu") == torch.device("cpu")
    facts = dev.device_facts()
    assert dev.resolve_device("auto").type == ("cuda" if facts.cuda_count else "mps" if facts.mps else "cpu")
    if facts.cuda_count == 0:
        with pytest.raises(ConfigError, match="--device cuda"):
            dev.resolve_device("cuda")
    assert dev.resolve_dtype(None, torch.device("cpu")) == "float32"
    assert dev.resolve_dtype("bf16", torch.device("cpu")) == "bfloat16"
    assert dev.resolve_dtype(torch.float16, torch.device("cpu")) == "float16"
    info = dev.memory_info(torch.device("cpu"))
    assert info is not None and 0 < info[0] <= info[1]
    dev.synchronize(torch.device("cpu"))
    assert dev.device_label(torch.device("cpu")) == "cpu"
    assert dev.pinned((2, 3), torch.float32, torch.device("cpu")).shape == (2, 3)


def test_peak_bandwidth_table_prefers_specific_names() -> None:
    assert dev.peak_bandwidth("NVIDIA H200") == 4800e9
    assert dev.peak_bandwidth("NVIDIA H100 PCIe") == 2000e9
    assert dev.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3350e9
    assert dev.peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2039e9
    assert dev.peak_bandwidth("NVIDIA GeForce RTX 4090") == 1008e9
    assert dev.peak_bandwidth("cpu") is None


def test_out_of_memory_is_recognised() -> None:
    assert dev.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert dev.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert dev.is_out_of_memory(MemoryError())
    assert not dev.is_out_of_memory(RuntimeError("shape mismatch"))
