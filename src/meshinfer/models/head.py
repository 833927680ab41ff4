"""The client's share of a model: token embeddings, the final norm and the LM head.

Contract: pure torch. ``embed`` turns token ids into hidden states, ``logits`` turns the last span's hidden states
into float32 logits; both compute on the head's device (its parameters'), taking their inputs from wherever they are
(ids are checked on the host first) and returning results on that device; with tied embeddings the LM head is the
embedding matrix itself (one tensor in memory). The table and the head are ``ops.Embedding`` and ``ops.Linear``
modules (``embedding``, ``output``), the seams ``models.quant`` replaces to hold them in int8/int4. Knows nothing of
blocks, caches, files or the network.
"""

from __future__ import annotations

import torch
from torch import nn

from meshinfer.errors import CheckpointError, ConfigError
from meshinfer.models.kv_cache import torch_dtype
from meshinfer.models.ops import Embedding, Linear, rms_norm
from meshinfer.models.spec import ModelSpec


class ClientHead(nn.Module):
    """Embeddings (ids -> hidden), final RMSNorm and LM head (hidden -> logits)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.spec = spec
        self.dtype = dtype
        self.eps = spec.rms_norm_eps
        v, h = spec.vocab_size, spec.hidden_size
        embedding, output = Embedding(v, h, dtype, device), Linear(v, h, False, dtype, device)  # [V, H] each
        if spec.tie_word_embeddings:
            output.weight = embedding.weight
        self.embedding: nn.Module = embedding
        self.norm = nn.Parameter(torch.empty(h, dtype=dtype, device=device), requires_grad=False)
        self.output: nn.Module = output

    @property
    def embed_tokens(self) -> torch.Tensor:
        """The embedding table [V, H] (dense; a quantized head has none)."""
        return _tensor(self.embedding.weight)

    @property
    def lm_head(self) -> torch.Tensor:
        """The LM head weight [V, H] (the embedding table itself when tied; dense heads only)."""
        return _tensor(self.output.weight)

    @classmethod
    def from_hf(
        cls,
        spec: ModelSpec,
        tensors: dict[str, torch.Tensor],
        dtype: str | torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> ClientHead:
        """Build from Hugging Face-named tensors (``lm_head.weight`` is ignored when embeddings are tied)."""
        head = cls(spec, torch_dtype(dtype), device)
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not spec.tie_word_embeddings:
            names.append("lm_head.weight")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise CheckpointError(f"missing tensors: {', '.join(missing)}")
        with torch.no_grad():
            head.embed_tokens.copy_(tensors["model.embed_tokens.weight"])
            head.norm.copy_(tensors["model.norm.weight"])
            if not spec.tie_word_embeddings:
                head.lm_head.copy_(tensors["lm_head.weight"])
        return head

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] int -> [B, T, H]
        if ids.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"token ids must be integers, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            raise ConfigError(
                f"token ids must lie in 0..{self.spec.vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}"
            )
        return self.embedding(ids.to(self.norm.device))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., V] float32, on the head's device
        h = rms_norm(hidden.to(device=self.norm.device, dtype=self.dtype), self.norm, self.eps)  # one copy if moved
        return self.output(h).float()


def _tensor(value: torch.Tensor | nn.Module) -> torch.Tensor:
    """A module attribute known to be a tensor (``nn.Module.__getattr__`` is typed Tensor | Module)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor, got a {type(value).__name__}")
    return value
