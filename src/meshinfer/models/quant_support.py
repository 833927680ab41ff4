"""Which quantized weights a device can hold, and which matrix shapes its int4 kernel takes: pure decisions.

Contract: no torch, no I/O; the facts come in a ``QuantDeviceFacts`` (``models.quant`` asks torch for them).
- cpu: int8 and int4 (torch's CPU kernels, as before issue 18).
- cuda: int8 (``aten._weight_int8pack_mm`` has a CUDA kernel; any GPU); int4 only on NVIDIA GPUs of compute
  capability 8.0+ with bf16 (torch's tinygemm kernel, ``_weight_int4pack_mm``, is built for sm80+ and takes bf16
  activations only; ROCm builds use another tile layout, so they are refused too), and only where this torch's
  packer writes the layout ``models.tinygemm`` reads (``layout_ok``: checked on the device at load).
  A GPU without int4 is a load-time ``ConfigError`` naming the fix (``--quant int8``), not a silent int8: a
  server's memory plan (``block_weight_bytes``) must describe what it holds.
- mps and anything else: refused (torch has MPS int8/int4 kernels, but their layouts and numerics are not
  verified here), with the fix (``--quant none`` or ``--device cpu``).
``int4_shape_fits``: the CPU kernel takes N % 16 == 0, the CUDA one N % 8 == 0 (its n-tiles are 8 rows); both
need K % group == 0 with a group of 32..256 (so K % 32 == 0, which the CUDA packer's 2 inner k-tiles need).
Shapes that do not fit become int8, matrix by matrix (``models.quant``).
"""

from __future__ import annotations

from dataclasses import dataclass

INT4_GROUPS = (32, 64, 128, 256)
"""Group sizes the int4 kernels accept (CPU and CUDA alike)."""
TINYGEMM_MIN_CAPABILITY = (8, 0)
"""The compute capability torch's CUDA int4 kernel is compiled for (``__CUDA_ARCH__ >= 800`` in int4mm.cu)."""


@dataclass(frozen=True)
class QuantDeviceFacts:
    """What decides quantization support on one device."""

    kind: str
    """The device type: ``cpu``, ``cuda``, ``mps``, ..."""
    label: str = ""
    """A human name for messages (``NVIDIA H200``)."""
    capability: tuple[int, int] | None = None
    """A CUDA GPU's compute capability (None elsewhere)."""
    bf16: bool = True
    """Whether the device computes in bf16."""
    rocm: bool = False
    """A ROCm (HIP) build of torch: its ``cuda`` devices are AMD GPUs."""
    layout_ok: bool = True
    """Whether torch's int4 packer on this device writes the layout ``models.tinygemm`` reads (CUDA only)."""


def quant_refusal(mode: str, facts: QuantDeviceFacts) -> str | None:
    """Why ``--quant mode`` cannot run on the device ``facts`` describes (one line naming the fix), or None."""
    if mode == "none" or facts.kind == "cpu":
        return None
    name = facts.label or facts.kind
    if facts.kind != "cuda":
        return (f"--quant {mode} is not supported on {name} (its quantized kernels are unverified here); "
                "use --quant none or --device cpu")
    if mode != "int4":
        return None
    if facts.rocm:
        return f"--quant int4 is not supported on {name} (ROCm: another int4 tile layout); use --quant int8"
    cap = facts.capability or (0, 0)
    if cap < TINYGEMM_MIN_CAPABILITY or not facts.bf16:
        return (f"--quant int4 needs an NVIDIA GPU of compute capability 8.0+ with bf16 (torch's int4 kernel); "
                f"{name} is {cap[0]}.{cap[1]}: use --quant int8")
    if not facts.layout_ok:
        return "--quant int4: this torch has no CUDA int4 packer writing the layout meshinfer reads; use --quant int8"
    return None


def int4_shape_fits(kind: str, out_features: int, in_features: int, group: int) -> bool:
    """Whether an [out, in] matrix fits the int4 kernel of device type ``kind`` in groups of ``group``."""
    if group not in INT4_GROUPS or in_features % group or in_features < group:
        return False
    return out_features % (8 if kind == "cuda" else 16) == 0 and out_features > 0
