"""The key/value cache of one span of blocks for one batch of sequences.

Contract: preallocated K and V tensors ``[batch, kv_heads, max_length, head_dim]`` per block, allocated
once; steps write into them in place (no concatenation, no reallocation). One tensor per block and kind,
rather than views of one buffer, so a compiled decode step (``models.compiled``) can take and mutate them as
plain inputs. All rows of the batch share one ``length``. ``nbytes`` gives the memory a cache will take before
anything is allocated, so a server can admit or refuse a session. Knows nothing of weights or the network.
"""

from __future__ import annotations

import torch

from meshinfer.errors import ConfigError, ContextOverflowError, UsageError
from meshinfer.models.spec import ModelSpec
from meshinfer.types import canonical_dtype

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a canonical name ("float32", "float16", "bfloat16") or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_DTYPES.values():
            raise ConfigError(f"unsupported dtype {dtype}; choose one of fp32, fp16, bf16")
        return dtype
    return _TORCH_DTYPES[canonical_dtype(dtype)]


class KVCache:
    """K and V of ``num_blocks`` consecutive blocks, ``length`` tokens filled out of ``max_length``."""

    def __init__(
        self,
        spec: ModelSpec,
        num_blocks: int,
        max_length: int,
        *,
        batch: int = 1,
        dtype: str | torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        zeroed: bool = False,
    ) -> None:
        """``zeroed``: fill the tensors with zeros (needed where slots past ``length`` are read under a mask, as
        compiled decode steps do: masked scores weigh 0, but 0 times uninitialised NaN is NaN)."""
        if num_blocks <= 0 or batch <= 0:
            raise ConfigError(f"a KV cache needs blocks > 0 and batch > 0, got {num_blocks} and {batch}")
        if not 0 < max_length <= spec.max_position_embeddings:
            raise ContextOverflowError(
                f"cache length {max_length} must be in 1..{spec.max_position_embeddings} (the model's context)"
            )
        self.num_blocks = num_blocks
        self.batch = batch
        self.max_length = max_length
        self.dtype = torch_dtype(dtype)
        self.length = 0
        # per block: K and V [B, kv_heads, M, D]; never read beyond `length`, so no need to zero them
        shape = (batch, spec.num_kv_heads, max_length, spec.head_dim)
        alloc = torch.zeros if zeroed else torch.empty
        self._k = [alloc(shape, dtype=self.dtype, device=device) for _ in range(num_blocks)]
        self._v = [alloc(shape, dtype=self.dtype, device=device) for _ in range(num_blocks)]

    @staticmethod
    def nbytes(
        spec: ModelSpec, num_blocks: int, max_length: int, *, batch: int = 1, dtype: str | torch.dtype = "float32"
    ) -> int:
        """Bytes the cache will take (computable before allocating)."""
        itemsize = torch.empty((), dtype=torch_dtype(dtype)).element_size()
        return spec.kv_cache_bytes(num_blocks, max_length, batch=batch, dtype_bytes=itemsize)

    @property
    def size_bytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self._k)

    @property
    def remaining(self) -> int:
        return self.max_length - self.length

    def check_room(self, new_tokens: int) -> None:
        """Raise ContextOverflowError unless ``new_tokens`` more tokens fit."""
        if self.length + new_tokens > self.max_length:
            raise ContextOverflowError(
                f"{self.length} cached + {new_tokens} new tokens exceed the cache length {self.max_length}"
            )

    def keys(self, block: int) -> torch.Tensor:
        """The whole K buffer of the span's ``block``-th block: [B, kv_heads, M, D]."""
        return self._k[block]

    def values(self, block: int) -> torch.Tensor:
        return self._v[block]

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, kv_heads, T, D] at slots [length, length+T) of ``block`` (length unchanged)."""
        t = k.shape[2]
        self._k[block][:, :, self.length : self.length + t] = k
        self._v[block][:, :, self.length : self.length + t] = v

    def advance(self, new_tokens: int) -> None:
        """Mark ``new_tokens`` more slots as filled (after every block of the span wrote them)."""
        self.check_room(new_tokens)
        self.length += new_tokens

    def truncate(self, length: int) -> None:
        """Forget every token from slot ``length`` on (e.g. to roll back or replay)."""
        if not 0 <= length <= self.length:
            raise UsageError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0
