"""Local generation: the whole model (head + all blocks) on this machine, as a Python API.

Contract: ``LocalModel`` composes a ``ClientHead`` and one ``BlockSpan`` over [0, n) loaded from a checkpoint
directory, and generates with a preallocated KV cache: one prefill over the prompt, then one decode step per token,
the LM head applied to the last position only. Sampling is delegated to ``meshinfer.models.sampling.Sampler``.
Inference mode is entered per step (never held across a ``yield``). Context limits are checked up front
(``ContextOverflowError`` with the numbers). On a device (``from_pretrained(device=...)``) prompt ids go there once
per step, logits stay there and greedy sampling takes its argmax there (``sampling``: only token ids come back;
sampled decoding draws on the CPU); logits returned by ``prefill_logits`` are on the device. Knows nothing of the
network. ``check_prompt`` and ``generate_scored`` (the loop over any ``forward(ids, position) -> logits`` callable,
yielding ``ScoredToken``s: with ``top_logprobs`` set, each token's log-probability and the most likely alternatives,
``sampling.score_token``; ``agenerate_scored`` is the same loop over an async ``forward``) are shared with the
distributed client, so both generate with exactly the same semantics. ``LocalModel`` is a
``models.generator.TextGenerator``: its public ``stream`` / ``stream_scored`` / ``generate`` build one
``GenerationParams``, which ``generation`` and the loop take whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Generator, Iterator, Sequence
from pathlib import Path

import torch

from meshinfer.config import SamplingConfig
from meshinfer.errors import ConfigError, ContextOverflowError, UsageError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.compiled import capacity
from meshinfer.models.generator import CheckpointGenerator, GenerationParams
from meshinfer.models.head import ClientHead
from meshinfer.models.kv_cache import KVCache, torch_dtype
from meshinfer.models.ops import autotune_linear, layer_weights, rms_norm
from meshinfer.models.sampling import ScoredToken, score_rows, score_token
from meshinfer.models.span import BlockSpan
from meshinfer.models.spec import ModelSpec
from meshinfer.types import BlockRange


class LocalModel(CheckpointGenerator):
    """A model run entirely in this process."""

    def __init__(self, spec: ModelSpec, head: ClientHead, span: BlockSpan, path: Path | None = None) -> None:
        if span.range != BlockRange(0, spec.num_blocks):
            raise UsageError(f"a local model needs all blocks 0:{spec.num_blocks}, got {span.range}")
        self.spec = spec
        self.head = head
        self.span = span
        self.path = path

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: str | torch.dtype = "float32", device: torch.device | str = "cpu", *,
        quant: str = "none", quant_group_size: int | None = None, head_quant: str | None = None,
        compile: bool = False,
    ) -> LocalModel:
        """Load a Hugging Face checkpoint directory (safetensors), a GGUF file or a GGUF-sourced directory in
        ``dtype`` (fp32, fp16 or bf16). ``quant`` (none, int8, int4; ``quant_group_size`` for int4) holds the
        blocks' weights quantized (``models.quant``); ``head_quant`` the LM head's (None: int8 whenever the blocks
        are quantized, the best trade measured on SmolLM2: int4 heads cost perplexity, int8 ones almost none).
        ``compile``: decode steps run as ``torch.compile`` graphs on the CPU (``models.compiled``: faster on models
        of small blocks; the first generation per cache capacity waits for the compiler) and as replayed CUDA graphs
        on a CUDA device (``models.cuda_graphs``: captured on each generation's first decode step). ``device``:
        where the whole model computes, ``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` text or a ``torch.device`` (a
        ConfigError when this machine lacks it; ``models.device.resolve_device``); ``dtype`` ``auto`` is that
        device's default (fp32 on the CPU, bf16 on CUDA, fp16 on MPS). The defaults stay the CPU in fp32: exact,
        comparable with transformers on any machine."""
        from meshinfer.models.device import check_device_dtype, resolve_device, resolve_dtype
        from meshinfer.models.quant import QuantConfig

        where = resolve_device(device)
        name = resolve_dtype(dtype, where)
        check_device_dtype(where, name)
        dt = torch_dtype(name)
        blocks_quant = QuantConfig(quant, quant_group_size)
        head_mode = head_quant if head_quant is not None else ("none" if quant == "none" else "int8")
        ckpt = Checkpoint(path)
        ckpt.check_all()
        head = ckpt.load_head(dt, where, quant=QuantConfig(head_mode))
        span = ckpt.load_span(BlockRange(0, ckpt.spec.num_blocks), dt, where, quant=blocks_quant)
        autotune_linear(layer_weights(span))  # CPU fp32 weights only (a no-op on other devices)
        if compile:
            span.compile_decode()
        return cls(ckpt.spec, head, span, ckpt.path)

    @property
    def dtype(self) -> torch.dtype:
        return self.span.dtype

    @property
    def device(self) -> torch.device:
        """Where the model computes."""
        return self.head.norm.device

    # ---- forward passes -----------------------------------------------------------------------

    def _check_prompt(self, input_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return check_prompt(self.spec, input_ids, max_new_tokens)

    def prefill_logits(self, input_ids: Sequence[int]) -> torch.Tensor:
        """Logits [T, vocab] (float32) at every position of one forward pass over ``input_ids``."""
        ids = self._check_prompt(input_ids, 0)
        with torch.inference_mode():
            cache = self.span.new_cache(len(ids))
            hidden = self.span(self.head.embed(torch.tensor([ids])), cache)  # [1, T, H]
            return self.head.logits(hidden)[0]  # [T, V]

    def hidden_states(self, input_ids: Sequence[int]) -> list[torch.Tensor]:
        """Per-layer hidden states like transformers' ``output_hidden_states``: n+1 tensors [T, H].

        Entry 0 is the embeddings, entry i the output of block i-1, and the last one has the final
        norm applied (as transformers reports it).
        """
        ids = self._check_prompt(input_ids, 0)
        out: list[torch.Tensor] = []
        with torch.inference_mode():
            x = self.head.embed(torch.tensor([ids]))  # [1, T, H]
            self.span(x, self.span.new_cache(len(ids)), collect=out)
            out.insert(0, x)
            out[-1] = rms_norm(out[-1], self.head.norm, self.spec.rms_norm_eps)
        return [h[0] for h in out]

    # ---- generation ---------------------------------------------------------------------------

    def stream_scored(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
        stop_token_ids: Collection[int] | None = None,
        top_logprobs: int | None = None,
    ) -> Generator[ScoredToken]:
        """``stream`` with each token's log-probability and its ``top_logprobs`` most likely alternatives
        (``sampling.score_token``; None: the bare tokens, no scores computed)."""
        return self.generation(input_ids, GenerationParams.of(max_new_tokens, sampling, stop_token_ids,
                                                              top_logprobs))

    def generation(self, input_ids: Sequence[int], params: GenerationParams) -> Generator[ScoredToken]:
        """One generation (``generator.TextGenerator.generation``): the prompt checked, the KV cache allocated
        for prompt + ``max_new_tokens``, then ``generate_scored``."""
        ids = self._check_prompt(input_ids, params.max_new_tokens)
        if params.max_new_tokens == 0:
            return
        with torch.inference_mode():
            wanted = len(ids) + params.max_new_tokens
            cache = self.span.new_cache(wanted if self.span.compiled is None
                                        else capacity(wanted, self.spec.max_position_embeddings))

        def forward(chunk: list[int], position: int) -> torch.Tensor:  # ids [T] -> logits [V]
            return self._step(torch.tensor([chunk]), cache)

        yield from generate_scored(forward, ids, params, self.spec.eos_token_ids)

    def score_prompt(self, input_ids: Sequence[int], top_logprobs: int = 0) -> list[ScoredToken]:
        """Each token of ``input_ids`` after the first, scored under the model's distribution at the position
        before it (one forward pass; see ``score_hidden``)."""
        ids = self._check_prompt(input_ids, 0)
        with torch.inference_mode():
            hidden = self.span(self.head.embed(torch.tensor([ids])), self.span.new_cache(len(ids)))  # [1, T, H]
            return score_hidden(self.head, hidden[0], ids, top_logprobs)

    def _step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:  # [1, T] -> logits [V] float32
        hidden = self.span(self.head.embed(ids), cache)  # [1, T, H]
        return self.head.logits(hidden[0, -1])  # [V]


# ---- the generation loop, shared with the distributed client ---------------------------------------

Forward = Callable[[list[int], int], torch.Tensor]
"""``forward(ids, position) -> logits[V]``: run ``ids`` (new tokens, placed at ``position`` onward) through
the model, keeping its cache, and return the float32 logits of the last position."""
AsyncForward = Callable[[list[int], int], Awaitable[torch.Tensor]]
"""The same as ``Forward``, as a coroutine function (the distributed client's forward goes over the network)."""


def check_prompt(spec: ModelSpec, input_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The prompt as a list of ints, or a ConfigError / ContextOverflowError saying what is wrong."""
    ids = [int(i) for i in input_ids]
    if not ids:
        raise ConfigError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    bad = [i for i in ids if not 0 <= i < spec.vocab_size]
    if bad:
        raise ConfigError(f"token id {bad[0]} is outside the vocabulary (0..{spec.vocab_size - 1})")
    limit = spec.max_position_embeddings
    if len(ids) > limit:
        raise ContextOverflowError(f"the prompt has {len(ids)} tokens; the model's context is {limit}")
    if len(ids) + max_new_tokens > limit:
        raise ContextOverflowError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) = {len(ids) + max_new_tokens}"
            f" exceeds the model's context of {limit} tokens"
        )
    return ids


SCORE_CHUNK = 256
"""Positions per LM-head call when scoring a prompt (bounds the [positions, vocab] logits held at once)."""


def score_hidden(head: ClientHead, hidden: torch.Tensor, ids: Sequence[int], top: int) -> list[ScoredToken]:
    """Score ``ids[1:]`` from the last block's output ``hidden`` [T, H] over ``ids`` (position i predicts token
    i+1): ``T - 1`` ``ScoredToken``s, the LM head applied ``SCORE_CHUNK`` positions at a time."""
    if hidden.dim() != 2 or hidden.shape[0] != len(ids):
        raise ConfigError(f"expected hidden states [{len(ids)}, hidden], got {tuple(hidden.shape)}")
    out: list[ScoredToken] = []
    with torch.inference_mode():
        for a in range(0, len(ids) - 1, SCORE_CHUNK):
            b = min(a + SCORE_CHUNK, len(ids) - 1)
            out += score_rows(head.logits(hidden[a:b]), ids[a + 1:b + 1], top)  # logits [b-a, V]
    return out


Request = tuple[list[int], int]
"""``(ids, position)``: the next tokens to run through the model and where they go."""


class _Steps:
    """The rules every generation loop shares: the prefill, then one decode step per sampled token, the
    sampling itself (in inference mode) and when to stop (``max_new_tokens`` or a stop token)."""

    def __init__(self, ids: list[int], params: GenerationParams, eos_token_ids: Collection[int]) -> None:
        from meshinfer.models.sampling import MAX_TOP_LOGPROBS

        top_logprobs = params.top_logprobs
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}")
        self.top = top_logprobs
        self.sampler = params.sampler(len(ids))
        self.history = list(ids)
        self.left = params.max_new_tokens
        self.stops = params.stops(eos_token_ids)

    def first(self) -> Request | None:
        """The prefill (None when no token is wanted)."""
        return (self.history, 0) if self.left > 0 else None

    def sample(self, logits: torch.Tensor) -> ScoredToken:
        with torch.inference_mode():
            token = self.sampler.next_token(logits, self.history)
            scored = score_token(logits, token, self.top) if self.top is not None else ScoredToken(token)
        self.left -= 1
        return scored

    def rng_state(self) -> torch.Tensor:
        """The sampler's generator state (before the next ``sample``), for ``rewind``."""
        return self.sampler.generator.get_state()

    def rewind(self, history: list[int], left: int, rng_state: torch.Tensor) -> None:
        """Go back to an earlier point of this generation: its ``history`` (prompt + tokens kept), the tokens
        ``left`` to generate and the sampler's generator state then (``rng_state``)."""
        self.history = list(history)
        self.left = left
        self.sampler.generator.set_state(rng_state)

    def after(self, token: int) -> Request | None:
        """The decode step that follows ``token`` (just yielded), or None when the generation is over."""
        if token in self.stops or self.left == 0:
            return None
        self.history.append(token)
        return [token], len(self.history) - 1


GenerationSteps = _Steps
"""The generation rules as an object, for loops that must rewind (``client.audited``)."""


def generate_scored(forward: Forward, ids: list[int], params: GenerationParams,
                    eos_token_ids: Collection[int]) -> Iterator[ScoredToken]:
    """Prefill ``ids`` at position 0, then one decode step per token; yield each token as produced (scored
    when ``params.top_logprobs`` is set: see ``sampling.score_token``).

    Stops after ``params.max_new_tokens`` or after yielding a stop token (``params.stops(eos_token_ids)``:
    pass the model's eos ids). ``forward`` and sampling run in inference mode, which is never held across a
    ``yield``. ``ids`` must already be checked (``check_prompt``).
    """
    steps = _Steps(ids, params, eos_token_ids)
    request = steps.first()
    while request is not None:
        with torch.inference_mode():
            scored = steps.sample(forward(*request))
        yield scored
        request = steps.after(scored.token)


async def agenerate_scored(forward: AsyncForward, ids: list[int], params: GenerationParams,
                           eos_token_ids: Collection[int]) -> AsyncIterator[ScoredToken]:
    """``generate_scored`` over an async ``forward``: the same prefill, decode, sampling and stop rules."""
    steps = _Steps(ids, params, eos_token_ids)
    request = steps.first()
    while request is not None:
        scored = steps.sample(await forward(*request))
        yield scored
        request = steps.after(scored.token)
