"""Rotary position embeddings (RoPE), including Llama-3 frequency scaling.

Contract: pure torch math on a ``ModelSpec``. Computes inverse frequencies and cos/sin tables exactly
as transformers does (float32 products, cast to the compute dtype), caches the tables and grows them
on demand so that a decode step costs one slice, never a recomputation. Knows nothing of weights,
caches or the network.
"""

from __future__ import annotations

import math

import torch

from meshinfer.models.spec import ModelSpec


def inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float32), with llama3 scaling when the spec asks for it."""
    dim = spec.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim  # [D/2]
    freq = 1.0 / (spec.rope_theta**exponents)  # [D/2]
    rs = spec.rope_scaling
    if rs is None:
        return freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / freq
    # long wavelengths (low frequencies) are divided by factor; short ones kept; the middle interpolated
    scaled = torch.where(wavelen > low_wavelen, freq / rs.factor, freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """Cached cos/sin tables [positions, head_dim] in the compute dtype, grown on demand."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.max_positions = spec.max_position_embeddings
        self.dtype = dtype
        self.device = torch.device(device)
        self._inv_freq = inv_freq(spec).to(self.device)  # [D/2] float32
        self.cos = torch.empty(0, spec.head_dim, dtype=dtype, device=self.device)  # [P, D]
        self.sin = torch.empty(0, spec.head_dim, dtype=dtype, device=self.device)  # [P, D]

    def ensure(self, length: int) -> None:
        """Make the tables cover positions [0, length)."""
        if length <= self.cos.shape[0]:
            return
        n = min(max(length, 2 * self.cos.shape[0], 256), max(length, self.max_positions))
        pos = torch.arange(n, dtype=torch.int64, device=self.device).to(torch.float32)  # [P]
        freqs = pos[:, None] * self._inv_freq[None, :]  # [P, D/2] float32
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos().to(self.dtype)
        self.sin = emb.sin().to(self.dtype)

    def range(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, T, 1, D] for the contiguous positions start .. start+length-1."""
        self.ensure(start + length)
        cos = self.cos[start : start + length]  # [T, D]
        sin = self.sin[start : start + length]
        return cos[None, :, None, :], sin[None, :, None, :]

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, 1, D] for explicit positions [B, T]."""
        self.ensure(int(positions.max().item()) + 1)
        idx = positions.to(self.device)
        return self.cos[idx][:, :, None, :], self.sin[idx][:, :, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, D] by cos/sin broadcastable to it ([B|1, T, 1, D])."""
    return x * cos + rotate_half(x) * sin
