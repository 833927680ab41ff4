"""Tensor codec: a torch tensor as dtype name + shape + raw little-endian bytes.

Contract: ``encode_tensor`` turns a float32/float16/bfloat16 tensor into a ``Tensor`` struct;
``check_tensor`` validates a received ``Tensor`` against ``WireLimits`` (dtype name, rank, each
dimension, element count, byte length) without allocating; ``decode_tensor`` checks first and only
then builds a torch tensor. Malformed input only ever raises ``WireError`` / ``LimitExceededError``.
Nothing here pickles, does I/O, or knows about streams or peers. torch is imported lazily so that
schema-only users (records, the CLI) stay light.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import msgspec

from meshinfer.errors import LimitExceededError, WireError
from meshinfer.types import DTYPES
from meshinfer.wire.limits import DEFAULT_LIMITS, WireLimits

if TYPE_CHECKING:
    import torch

ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}

Dim = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class Tensor(msgspec.Struct, frozen=True):
    """A tensor on the wire: ``data`` holds ``prod(shape) * itemsize(dtype)`` little-endian bytes."""

    dtype: str
    shape: Annotated[list[Dim], msgspec.Meta(max_length=8)]
    data: bytes

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_tensor(t: Tensor, limits: WireLimits = DEFAULT_LIMITS) -> None:
    """Raise WireError/LimitExceededError unless ``t`` is well-formed and within ``limits``."""
    if t.dtype not in ITEMSIZE:
        raise WireError(f"unsupported tensor dtype {t.dtype[:32]!r}; expected one of {', '.join(DTYPES)}")
    rank = len(t.shape)
    if rank == 0 or rank > limits.max_rank:
        raise LimitExceededError(f"tensor rank {rank} outside 1..{limits.max_rank}")
    hidden = t.shape[-1]
    if hidden > limits.max_hidden_size:
        raise LimitExceededError(
            f"tensor last dimension {hidden} exceeds max hidden size {limits.max_hidden_size}"
        )
    tokens = 1
    for d in t.shape[:-1]:
        tokens *= d
        if tokens > limits.max_tokens_per_step:
            raise LimitExceededError(
                f"tensor leading dimensions {t.shape[:-1]} exceed max tokens per step "
                f"{limits.max_tokens_per_step}"
            )
    nbytes = tokens * hidden * ITEMSIZE[t.dtype]
    if nbytes > limits.max_tensor_bytes:
        raise LimitExceededError(f"tensor of {nbytes} bytes exceeds the limit of {limits.max_tensor_bytes}")
    if len(t.data) != nbytes:
        raise WireError(
            f"tensor data is {len(t.data)} bytes but dtype {t.dtype} shape {t.shape} needs {nbytes}"
        )


def encode_tensor(x: torch.Tensor) -> Tensor:
    """Encode a float32/float16/bfloat16 tensor (any device; copied to CPU, made contiguous)."""
    name = str(x.dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise WireError(f"cannot send a {name} tensor; expected one of {', '.join(DTYPES)}")
    x = x.detach().to("cpu").contiguous()
    raw = x.reshape(-1).view(_uint8())
    if sys.byteorder != "little" and ITEMSIZE[name] > 1:
        raw = raw.reshape(-1, ITEMSIZE[name]).flip(-1).reshape(-1)
    return Tensor(dtype=name, shape=list(x.shape), data=raw.numpy().tobytes())


def decode_tensor(t: Tensor, limits: WireLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Check ``t`` against ``limits`` (before allocating), then return a new writable CPU tensor."""
    import torch

    check_tensor(t, limits)
    dtype = _torch_dtypes()[t.dtype]
    if t.numel == 0:
        return torch.empty(t.shape, dtype=dtype)
    buf = bytearray(t.data)  # one copy: the tensor owns writable memory, the message can be freed
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    if sys.byteorder != "little" and ITEMSIZE[t.dtype] > 1:
        raw = raw.reshape(-1, ITEMSIZE[t.dtype]).flip(-1).reshape(-1).contiguous()
    return raw.view(dtype).reshape(t.shape)


def _uint8() -> torch.dtype:
    import torch

    return torch.uint8
