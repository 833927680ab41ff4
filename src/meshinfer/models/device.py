"""The torch side of devices: what this machine has, where a ``--device`` lands, its memory, its clock.

Contract: the thin effectful shell over ``meshinfer.devices`` (whose pure functions decide). ``device_facts()``
asks torch what it sees; ``resolve_device(text)`` is ``--device`` text as a ``torch.device`` on this machine
(``ConfigError`` when it is not here); ``resolve_dtype(dtype, device)`` the compute dtype (``None``/``auto``:
``devices.default_dtype``). ``memory_info(device)`` gives (free, total) bytes: ``torch.cuda.mem_get_info`` on
CUDA, the recommended working set less what the driver holds on MPS, ``MemAvailable``/``MemTotal`` of
``/proc/meminfo`` on the CPU (None where unknown). ``synchronize`` waits for the device's queued work (timers
around GPU work must call it: kernels are asynchronous). ``is_out_of_memory(err)`` recognises a device
allocation failure (CUDA's ``OutOfMemoryError``, MPS's RuntimeError), and ``release_cached(device)`` hands
the caching allocator's free blocks back after one. ``device_label`` names a device for people and
announcements (``NVIDIA H200``, ``Apple MPS``, ``cpu``); ``peak_bandwidth(label)`` the memory bandwidth of
known GPUs for roofline figures (None: unknown; ``--peak-bandwidth`` overrides in benches). ``pinned(shape,
dtype, device)`` allocates a host staging buffer, page-locked only when the device is a CUDA one. Knows
nothing of models, files (bar ``/proc/meminfo``), sessions or the network.
"""

from __future__ import annotations

from pathlib import Path

import torch

from meshinfer.devices import DeviceFacts, choose_device, default_dtype, parse_device
from meshinfer.errors import ConfigError
from meshinfer.types import canonical_dtype

PEAK_BANDWIDTH_GBS: dict[str, float] = {
    "H200": 4800.0, "GH200": 4000.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
    "B200": 8000.0, "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0,
    "L40S": 864.0, "L40": 864.0, "L4": 300.0, "A10G": 600.0, "A10": 600.0, "T4": 320.0, "V100": 900.0,
    "RTX 4090": 1008.0, "RTX 4080": 717.0, "RTX 3090": 936.0, "RTX A6000": 768.0, "RTX 6000 Ada": 960.0,
}
"""Peak memory bandwidth in GB/s (vendor figures) of GPUs by a part of their torch name; the first key found in
the name wins, so longer, more specific keys come before their prefixes."""


def device_facts() -> DeviceFacts:
    """What torch sees on this machine."""
    cuda_built = torch.backends.cuda.is_built()
    count = torch.cuda.device_count() if cuda_built and torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return DeviceFacts(cuda_count=count, mps=mps, cuda_built=cuda_built)


def resolve_device(text: str | torch.device) -> torch.device:
    """``--device`` text (or a torch.device) as the concrete device it means on this machine, or a ConfigError."""
    choice = parse_device(str(text))
    if choice.kind == "cpu":  # no need to ask torch about GPUs (and no CUDA initialisation)
        return torch.device("cpu")
    return torch.device(str(choose_device(choice, device_facts())))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> str:
    """The canonical compute dtype: ``dtype`` itself, or (None / ``auto``) the device's default."""
    if isinstance(dtype, torch.dtype):
        return canonical_dtype(str(dtype).removeprefix("torch."))
    if dtype is None or dtype.strip().lower() == "auto":
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
        return default_dtype(device.type, bf16)
    return canonical_dtype(dtype)


def _proc_meminfo(path: str = "/proc/meminfo") -> tuple[int, int] | None:
    fields: dict[str, int] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if name in ("MemAvailable", "MemTotal") and parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    if "MemAvailable" not in fields or "MemTotal" not in fields:
        return None
    return fields["MemAvailable"], fields["MemTotal"]


def memory_info(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of ``device``'s memory now, or None where this machine cannot say."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    if device.type == "mps":
        total = int(torch.mps.recommended_max_memory())
        return max(0, total - int(torch.mps.driver_allocated_memory())), total
    return _proc_meminfo()


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on ``device`` is done (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device (or host) allocation failure rather than a bug."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def release_cached(device: torch.device) -> None:
    """Return the caching allocator's unused blocks to the device (after an out-of-memory, or a dropped span)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def device_label(device: torch.device) -> str:
    """A short human name: the GPU's model (``NVIDIA H200``), ``Apple MPS`` or ``cpu``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return "cpu"


def peak_bandwidth(label: str) -> float | None:
    """Peak memory bandwidth in bytes/s of the GPU named ``label`` (``device_label``), or None when unknown."""
    for key, gbs in PEAK_BANDWIDTH_GBS.items():
        if key in label:
            return gbs * 1e9
    return None


def pinned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor to stage copies to/from ``device``: page-locked for CUDA (async copies), plain else."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def check_device_dtype(device: torch.device, dtype: str) -> None:
    """Refuse dtypes a device cannot compute in (bf16 on a CUDA GPU without it), with the fix."""
    if device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{device_label(device)} has no bf16 support; use --dtype fp16 or fp32")
