"""What "a model that generates" is, and the parameters of one generation.

Contract: ``GenerationParams`` (frozen) is one generation's parameters: ``max_new_tokens``, ``sampling``,
``stop_token_ids`` (None: the model's eos ids; empty: never stop early), ``top_logprobs`` (None: bare
tokens, no scores computed) and ``constraint`` (a ``models.constraint.ConstraintFactory``: which tokens may come
next; None: any). The public methods (``LocalModel.stream/stream_scored/generate``,
``DistributedModel.stream/astream/astream_scored``) keep their loose keyword arguments and build one
``GenerationParams``; everything inside (``engine.generate_scored``, the client's loop, the CLI, the gateway)
passes that one value. Values are checked where they are used, as before: ``engine.check_prompt``
(``max_new_tokens``) and the generation loop (``top_logprobs``).

``ModelHandle`` is what every generator shows, sync or async: its ``spec`` and ``tokenizer``.
``TextGenerator`` (a ``typing.Protocol``) is the one definition of a model that generates in this process's
thread: ``generation(ids, params)`` (the ``ScoredToken``s of one generation), the public ``stream`` /
``generate`` built on it, and ``close``. ``LocalModel`` and the swarm's ``DistributedModel`` implement it
through ``CheckpointGenerator`` (tokenizer loaded lazily from the checkpoint directory, ``stream`` and
``generate`` over ``generation``); the CLI types against ``TextGenerator``. The gateway's async port
(``gateway.generation.Generator``) extends ``ModelHandle`` with its own async face. No torch at import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from meshinfer.config import SamplingConfig
from meshinfer.errors import UsageError

if TYPE_CHECKING:
    from meshinfer.models.constraint import ConstraintFactory
    from meshinfer.models.sampling import Sampler, ScoredToken
    from meshinfer.models.spec import ModelSpec


@dataclass(frozen=True)
class GenerationParams:
    """One generation's parameters (see the module docstring)."""

    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_token_ids: frozenset[int] | None = None
    """The tokens that end the generation (yielded, then stop); None: the model's eos ids."""
    top_logprobs: int | None = None
    """Score each token with this many most likely alternatives (0..20); None: no scores computed."""
    constraint: ConstraintFactory | None = field(default=None, compare=False)
    """Makes this generation's ``models.constraint.TokenConstraint`` (a grammar, a tool-call format): the
    sampler then chooses only tokens it allows. None: unconstrained."""

    @classmethod
    def of(cls, max_new_tokens: int, sampling: SamplingConfig | None = None,
           stop_token_ids: Collection[int] | None = None, top_logprobs: int | None = None) -> GenerationParams:
        """The parameters as the public methods take them (``sampling`` None: greedy defaults)."""
        return cls(max_new_tokens, sampling or SamplingConfig(),
                   None if stop_token_ids is None else frozenset(stop_token_ids), top_logprobs)

    def sampler(self, prompt_len: int) -> Sampler:
        """This generation's ``Sampler`` (its own generator and, with ``constraint``, its own constraint) for a
        prompt of ``prompt_len`` tokens (penalties on generated tokens and the constraint see only what follows)."""
        from meshinfer.models.sampling import Sampler

        return Sampler(self.sampling, prompt_len=prompt_len,
                       constraint=self.constraint() if self.constraint is not None else None)

    def stops(self, eos_token_ids: Collection[int]) -> frozenset[int]:
        """``stop_token_ids``, or ``eos_token_ids`` (the model's) when it is None."""
        return frozenset(eos_token_ids if self.stop_token_ids is None else self.stop_token_ids)


class ModelHandle(Protocol):
    """What every generator shows, sync or async: the model's spec and its tokenizer."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def tokenizer(self) -> Any: ...


class TextGenerator(ModelHandle, Protocol):
    """A model that generates in the calling thread: ``LocalModel``, or the swarm's ``DistributedModel``."""

    def generation(self, input_ids: Sequence[int], params: GenerationParams) -> Generator[ScoredToken]:
        """Each new token as soon as it is produced (scored when ``params.top_logprobs`` is set); stops after
        ``max_new_tokens`` or after yielding a stop token. Closing the iterator abandons the generation."""
        ...

    def stream(self, input_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
               stop_token_ids: Collection[int] | None = None) -> Iterator[int]:
        """The token ids of ``generation`` (stop tokens default to the model's eos ids; empty: none)."""
        ...

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 stop_token_ids: Collection[int] | None = None) -> list[int]:
        """The new token ids (prompt excluded); see ``stream``."""
        ...

    def close(self) -> None:
        """Release what the model holds (a swarm client's sessions and loop; nothing for a local model)."""
        ...


class CheckpointGenerator:
    """The part of a ``TextGenerator`` every model loaded from a checkpoint directory shares.

    Subclasses set ``spec`` and ``path`` and implement ``generation``; this gives them the lazily loaded
    tokenizer, ``stream``, ``generate`` and a ``close`` that releases nothing.
    """

    spec: ModelSpec
    path: Path | None
    _tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (loaded on first use through ``AutoTokenizer``)."""
        if self._tokenizer is None:
            if self.path is None:
                raise UsageError("this model was not loaded from a directory, so it has no tokenizer")
            from meshinfer.models.checkpoint import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def close(self) -> None:
        """Release what the model holds: nothing for a model run in this process (the swarm client closes its
        sessions and loop)."""

    def generation(self, input_ids: Sequence[int], params: GenerationParams) -> Generator[ScoredToken]:
        raise NotImplementedError

    def stream(self, input_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
               stop_token_ids: Collection[int] | None = None) -> Iterator[int]:
        """Yield each new token id as soon as it is produced.

        Generation stops after ``max_new_tokens`` or after yielding a stop token (default: the
        model's eos ids; pass an empty collection to disable). Abandoning the iterator abandons the generation.
        """
        params = GenerationParams.of(max_new_tokens, sampling, stop_token_ids)
        with contextlib.closing(self.generation(input_ids, params)) as tokens:
            for scored in tokens:
                yield scored.token

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 stop_token_ids: Collection[int] | None = None) -> list[int]:
        """The new token ids (prompt excluded); see ``stream``."""
        return list(self.stream(input_ids, max_new_tokens, sampling, stop_token_ids))
