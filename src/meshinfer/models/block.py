"""One transformer block (pre-norm attention + SwiGLU MLP) for llama, mistral, qwen2 and qwen3.

Contract: pure torch; the math of transformers' LlamaDecoderLayer and its Mistral/Qwen2/Qwen3
variants (grouped-query attention, optional q/k/v biases, optional per-head q/k RMSNorm, sliding
window through the ``AttentionPlan`` it is given), written for speed: q/k/v and gate/up are fused
into single matmuls at load time and keys/values are written in place into a ``KVCache``. ``forward_batch``
runs a ragged batch (many sequences, each with its own cache and length) with every per-token part
done once over all tokens and only attention per sequence. ``decode`` is the one-sequence, one-token step
(the hot loop of generation), written for as few tensor ops as the math allows (queries and keys rotated
together, no transposes, no module-call overhead): on a model of small blocks the step's cost is mostly
per-op overhead, not arithmetic. Takes tensors by their Hugging Face names
(``from_hf``); knows nothing of files, embeddings, the LM head, sessions or the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from meshinfer.errors import CheckpointError
from meshinfer.models.kv_cache import KVCache
from meshinfer.models.ops import Linear, rms_norm
from meshinfer.models.rope import apply_rope
from meshinfer.models.spec import ModelSpec


@dataclass(frozen=True)
class AttentionPlan:
    """Which cached slots a step's queries see: keys [lo, end) and a mask (None: all, or causal)."""

    lo: int
    end: int
    mask: torch.Tensor | None  # [T, end - lo] bool, True = attend
    is_causal: bool

    @staticmethod
    def first_slot(start: int, window: int | None) -> int:
        """The first cached slot a query at slot ``start`` may still see (0 without a sliding window)."""
        return 0 if window is None else max(0, start - window + 1)

    @staticmethod
    def make(start: int, new_tokens: int, window: int | None, device: torch.device) -> AttentionPlan:
        """The plan for ``new_tokens`` queries at slots [start, start+T) over a cache filled up to ``start``."""
        t, end = new_tokens, start + new_tokens
        lo = AttentionPlan.first_slot(start, window)
        if t == 1:
            return AttentionPlan(lo, end, None, False)
        if start == 0 and (window is None or window >= t):
            return AttentionPlan(0, end, None, True)
        q_slot = torch.arange(start, end, device=device)[:, None]  # [T, 1]
        k_slot = torch.arange(lo, end, device=device)[None, :]  # [1, S]
        mask = k_slot <= q_slot
        if window is not None:
            mask = mask & (k_slot > q_slot - window)
        return AttentionPlan(lo, end, mask, False)


class TransformerBlock(nn.Module):
    """A decoder layer with fused weights. ``forward`` runs prefill (T > 1) or decode (T == 1)."""

    def __init__(self, spec: ModelSpec, index: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.index = index
        self.window = spec.window_of(index)
        self.eps = spec.rms_norm_eps
        self.nh, self.kvh, self.d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.split = (spec.q_size, spec.kv_size, spec.kv_size)
        self.qk_size = spec.q_size + spec.kv_size
        self.inter = spec.intermediate_size
        h, i, qkv = spec.hidden_size, spec.intermediate_size, spec.q_size + 2 * spec.kv_size

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.input_norm = param(h)
        self.qkv = Linear(qkv, h, spec.attention_bias, dtype, device)  # q, k, v fused: [q_size + 2 kv_size, H]
        self.q_norm = param(self.d) if spec.qk_norm else None
        self.k_norm = param(self.d) if spec.qk_norm else None
        self.o = Linear(h, spec.q_size, spec.o_proj_bias, dtype, device)
        self.post_norm = param(h)
        self.gate_up = Linear(2 * i, h, spec.mlp_bias, dtype, device)  # gate, up fused: [2 I, H]
        self.down = Linear(h, i, spec.mlp_bias, dtype, device)

    @classmethod
    def from_hf(
        cls,
        spec: ModelSpec,
        index: int,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> TransformerBlock:
        """Build block ``index`` from its Hugging Face tensors (names as in ``spec.block_tensors``)."""
        block = cls(spec, index, dtype, device)
        p = f"model.layers.{index}."

        def get(name: str) -> torch.Tensor:
            try:
                return tensors[p + name]
            except KeyError:
                raise CheckpointError(f"missing tensor {p + name}") from None

        def cat(*names: str) -> torch.Tensor:
            return torch.cat([get(n) for n in names], dim=0)

        with torch.no_grad():
            block.input_norm.copy_(get("input_layernorm.weight"))
            block.qkv.weight.copy_(cat("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"))
            if block.qkv.bias is not None:
                block.qkv.bias.copy_(cat("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"))
            if block.q_norm is not None and block.k_norm is not None:
                block.q_norm.copy_(get("self_attn.q_norm.weight"))
                block.k_norm.copy_(get("self_attn.k_norm.weight"))
            block.o.weight.copy_(get("self_attn.o_proj.weight"))
            if block.o.bias is not None:
                block.o.bias.copy_(get("self_attn.o_proj.bias"))
            block.post_norm.copy_(get("post_attention_layernorm.weight"))
            block.gate_up.weight.copy_(cat("mlp.gate_proj.weight", "mlp.up_proj.weight"))
            if block.gate_up.bias is not None and block.down.bias is not None:
                block.gate_up.bias.copy_(cat("mlp.gate_proj.bias", "mlp.up_proj.bias"))
                block.down.bias.copy_(get("mlp.down_proj.bias"))
            block.down.weight.copy_(get("mlp.down_proj.weight"))
        return block

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,  # [B, T, H]
        cache: KVCache,
        slot: int,  # this block's index inside the cache's span
        cos: torch.Tensor,  # [B|1, T, 1, D]
        sin: torch.Tensor,
        plan: AttentionPlan,
    ) -> torch.Tensor:  # [B, T, H]
        x = x + self._attention(rms_norm(x, self.input_norm, self.eps), cache, slot, cos, sin, plan)
        return x + self._mlp(rms_norm(x, self.post_norm, self.eps))

    def _attention(
        self,
        h: torch.Tensor,  # [B, T, H]
        cache: KVCache,
        slot: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
    ) -> torch.Tensor:  # [B, T, H]
        q, k, v = self._qkv(h, cos, sin)  # [B, nh, T, D], [B, kvh, T, D], [B, kvh, T, D]
        return self.o(self._attend(q, k, v, cache, slot, plan))

    def _qkv(
        self,
        h: torch.Tensor,  # [B, T, H]
        cos: torch.Tensor,  # [B|1, T, 1, D]
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [B, nh, T, D], [B, kvh, T, D], [B, kvh, T, D]
        """Project, per-head normalise and rotate the queries and keys of every token (row-independent)."""
        b, t, _ = h.shape
        q, k, v = self.qkv(h).split(self.split, dim=-1)
        q = q.view(b, t, self.nh, self.d)  # [B, T, nh, D]
        k = k.view(b, t, self.kvh, self.d)  # [B, T, kvh, D]
        v = v.view(b, t, self.kvh, self.d)
        if self.q_norm is not None and self.k_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [B, nh, T, D]
        k = apply_rope(k, cos, sin).transpose(1, 2)  # [B, kvh, T, D]
        return q, k, v.transpose(1, 2)  # v: [B, kvh, T, D]

    def _attend(
        self,
        q: torch.Tensor,  # [B, nh, T, D] (rotated)
        k: torch.Tensor,  # [B, kvh, T, D] (rotated)
        v: torch.Tensor,  # [B, kvh, T, D]
        cache: KVCache,
        slot: int,
        plan: AttentionPlan,
    ) -> torch.Tensor:  # [B, T, nh * D], before o_proj
        """Write k/v at the cache's next slots, then attend q to the slots the plan allows."""
        b, _, t, _ = q.shape
        cache.write(slot, k, v)
        keys = cache.keys(slot)[:, :, plan.lo : plan.end]  # [B, kvh, S, D]
        values = cache.values(slot)[:, :, plan.lo : plan.end]
        if t == 1 and plan.mask is None:
            # decode: every query head of a group sees the same keys, so fold the group into the
            # query-length axis instead of repeating K/V: [B, kvh, n_rep, D]
            qg = q.reshape(b, self.kvh, self.nh // self.kvh, self.d)
            out = F.scaled_dot_product_attention(qg, keys, values)  # [B, kvh, n_rep, D]
            return out.reshape(b, 1, self.nh * self.d)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=plan.mask, is_causal=plan.is_causal, enable_gqa=self.nh != self.kvh
        )  # [B, nh, T, D]
        return out.transpose(1, 2).reshape(b, t, self.nh * self.d)

    def forward_batch(
        self,
        x: torch.Tensor,  # [1, N, H]: the tokens of every item, concatenated (N = sum T_i)
        caches: Sequence[KVCache],  # one batch-1 cache per item
        bounds: Sequence[tuple[int, int]],  # per item: (offset of its first token in x, T_i)
        slot: int,
        cos: torch.Tensor,  # [1, N, 1, D]: each token's own position
        sin: torch.Tensor,
        plans: Sequence[AttentionPlan],  # per item, for this block's window
    ) -> torch.Tensor:  # [1, N, H]
        """Ragged batch: norms, projections, rope and MLP run once over all N tokens; attention per item.

        Item i's tokens x[:, off_i : off_i + T_i] attend to ``caches[i]`` exactly as ``forward`` would
        run them alone (keys/values written at that cache's next slots; caches are not advanced here).
        """
        q, k, v = self._qkv(rms_norm(x, self.input_norm, self.eps), cos, sin)  # [1, nh|kvh, N, D]
        if len(caches) == 1:
            attn = self._attend(q, k, v, caches[0], slot, plans[0])  # [1, N, nh * D]
        else:
            parts = [
                self._attend(q[:, :, o : o + t], k[:, :, o : o + t], v[:, :, o : o + t], cache, slot, plan)
                for cache, (o, t), plan in zip(caches, bounds, plans, strict=True)
            ]  # each [1, T_i, nh * D]
            attn = torch.cat(parts, dim=1)  # [1, N, nh * D]
        x = x + self.o(attn)
        return x + self._mlp(rms_norm(x, self.post_norm, self.eps))

    def decode(
        self,
        x: torch.Tensor,  # [1, 1, H]: one token of one sequence
        cache: KVCache,  # batch 1
        slot: int,
        cos: torch.Tensor,  # [D]: the token's own position
        sin: torch.Tensor,
        lo: int,  # the first cached slot it may see (``AttentionPlan.first_slot``)
    ) -> torch.Tensor:  # [1, 1, H]
        """``forward`` for one token of one sequence (same math, same cache writes), with fewer ops."""
        nh, kvh, d = self.nh, self.kvh, self.d
        qkv, qk = self._decode_qk(x, cos, sin)
        length = cache.length
        keys, values = cache.keys(slot)[0], cache.values(slot)[0]  # [kvh, M, D]
        keys[:, length] = qk[nh:]
        values[:, length] = qkv.view(-1)[self.qk_size :].view(kvh, d)
        out = F.scaled_dot_product_attention(  # a query group per kv head: [1, kvh, nh/kvh, D]
            qk[:nh].view(1, kvh, nh // kvh, d), keys[None, :, lo : length + 1], values[None, :, lo : length + 1])
        return self._decode_rest(x, out)

    def decode_masked(
        self,
        x: torch.Tensor,  # [1, 1, H]
        keys: torch.Tensor,  # [1, kvh, M, D]: this block's whole K tensor
        values: torch.Tensor,
        pos: torch.Tensor,  # [1] int64: the token's slot (and position)
        cos: torch.Tensor,  # [D]
        sin: torch.Tensor,
        mask: torch.Tensor,  # [1, 1, 1, M] bool: the slots it may see
    ) -> torch.Tensor:  # [1, 1, H]
        """``decode`` with static shapes, for ``models.compiled``: the cache write is an ``index_copy_`` at
        ``pos`` and attention covers the whole capacity under ``mask``."""
        nh, kvh, d = self.nh, self.kvh, self.d
        qkv, qk = self._decode_qk(x, cos, sin)
        keys.index_copy_(2, pos, qk[nh:].view(1, kvh, 1, d))
        values.index_copy_(2, pos, qkv.view(-1)[self.qk_size :].view(1, kvh, 1, d))
        out = F.scaled_dot_product_attention(qk[:nh].view(1, kvh, nh // kvh, d), keys, values, attn_mask=mask)
        return self._decode_rest(x, out)

    def _decode_qk(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:  # [1, 1, H] -> qkv [1, 1, qkv], rotated q|k [nh + kvh, D]
        """A decode step's projection and its queries and keys normalised per head and rotated, all heads at once."""
        nh, d = self.nh, self.d
        qkv = self.qkv.forward(rms_norm(x, self.input_norm, self.eps))  # [1, 1, qkv]
        qk = qkv.view(-1)[: self.qk_size].view(nh + self.kvh, d)  # queries and keys: [nh + kvh, D]
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat((rms_norm(qk[:nh], self.q_norm, self.eps), rms_norm(qk[nh:], self.k_norm, self.eps)))
        half = d // 2
        return qkv, qk * cos + torch.cat((-qk[:, half:], qk[:, :half]), dim=-1) * sin  # rotate_half

    def _decode_rest(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:  # attn [1, kvh, nh/kvh, D]
        """A decode step after attention: output projection, residual, SwiGLU MLP, residual -> [1, 1, H]."""
        # reshape, not view: SDPA's CUDA kernels may return [1, kvh, nh/kvh, D] in another memory order (fp32)
        x = x + self.o.forward(attn.reshape(1, 1, self.nh * self.d))
        gate_up = self.gate_up.forward(rms_norm(x, self.post_norm, self.eps))  # [1, 1, 2I]
        return x + self.down.forward(F.silu(gate_up[..., : self.inter]) * gate_up[..., self.inter :])

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        gate, up = self.gate_up(h).chunk(2, dim=-1)  # [B, T, I] each
        return self.down(F.silu(gate) * up)
