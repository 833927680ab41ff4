"""ggml tensor types: block layouts, which types can be decoded, and how a tensor's bytes are shaped.

Contract: facts about ggml types by name ("Q4_1"), from ``gguf.constants.GGML_QUANT_SIZES``: a row of ``cols``
values is ``cols / block_size`` blocks of ``type_size`` bytes (``row_bytes``); a tensor's bytes are uint8
``[rows, row_bytes]`` (``[row_bytes]`` when 1-D: ``byte_shape``); outside its GGUF a tensor is stored as its
``container``: F32/F16/BF16 keep their safetensors dtype and logical shape, quantized types are ``U8``
``[rows, row_bytes]``. ``is_supported_type``: F32, F16, BF16, Q8_0, Q4_0, Q4_1 (decoded by ``models.ggml``)
and every type ``gguf.quants.dequantize`` decodes. Unknown or undecodable types are ``UnsupportedModelError``s.
Imports numpy and gguf only (no torch), so manifests and seeding of GGUF views stay torch-free.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from meshinfer.errors import UnsupportedModelError

FLOAT_TYPE_NAMES: dict[str, str] = {"F32": "F32", "F16": "F16", "BF16": "BF16"}
"""ggml float types -> the safetensors dtype their containers keep."""
NATIVE_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
"""Types ``models.ggml`` decodes with its own torch code (others go through gguf.quants)."""


def quant_type(ggml_type: str) -> Any:
    """The ``gguf.GGMLQuantizationType`` of a type name (UnsupportedModelError when unknown)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qt = GGMLQuantizationType[ggml_type]
    except KeyError:
        raise UnsupportedModelError(f"unknown ggml tensor type {ggml_type!r}") from None
    if qt not in GGML_QUANT_SIZES:
        raise UnsupportedModelError(f"ggml tensor type {ggml_type} has no known block layout")
    return qt


def type_sizes(ggml_type: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[quant_type(ggml_type)]


@functools.cache
def _gguf_can_dequantize(ggml_type: str) -> bool:
    from gguf.quants import dequantize

    _, size = type_sizes(ggml_type)
    try:
        dequantize(np.zeros((1, size), dtype=np.uint8), quant_type(ggml_type))
    except NotImplementedError:
        return False
    return True


def is_supported_type(ggml_type: str) -> bool:
    """Whether tensors of this ggml type can be decoded."""
    try:
        return ggml_type in NATIVE_TYPES or _gguf_can_dequantize(ggml_type)
    except UnsupportedModelError:
        return False


def check_supported_type(ggml_type: str, what: str) -> None:
    """Raise UnsupportedModelError unless ``ggml_type`` can be decoded (``what`` names the tensor)."""
    if not is_supported_type(ggml_type):
        raise UnsupportedModelError(
            f"{what} is stored as ggml type {ggml_type}, which cannot be decoded; supported: F32, F16, BF16 and "
            f"the quantized types the gguf package decodes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, IQ*...)")


def row_bytes(ggml_type: str, cols: int) -> int:
    """Bytes of one row of ``cols`` values (ValueError unless ``cols`` is a whole number of blocks)."""
    block, size = type_sizes(ggml_type)
    if cols <= 0 or cols % block:
        raise ValueError(f"a row of {cols} values is not a whole number of {ggml_type} blocks of {block}")
    return cols // block * size


def byte_shape(ggml_type: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The uint8 shape of a tensor's bytes: ``[rows, row_bytes]``, or ``[row_bytes]`` for a 1-D tensor."""
    if len(shape) not in (1, 2):
        raise ValueError(f"only 1-D and 2-D tensors are supported, got shape {list(shape)}")
    rb = row_bytes(ggml_type, int(shape[-1]))
    return (int(shape[0]), rb) if len(shape) == 2 else (rb,)


def container(ggml_type: str, shape: Sequence[int]) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype, shape) a tensor is stored as outside its GGUF: float types keep their dtype and
    logical shape; quantized types are ``U8`` bytes ``[rows, row_bytes]`` (``[row_bytes]`` when 1-D)."""
    if ggml_type in FLOAT_TYPE_NAMES:
        byte_shape(ggml_type, shape)  # validates the rank
        return FLOAT_TYPE_NAMES[ggml_type], tuple(int(d) for d in shape)
    return "U8", byte_shape(ggml_type, shape)
