"""Helpers for gateway tests: fakes for the unit tests (a character-level tokenizer, a scripted ``Generator``),
the handle on the real swarm behind the gateway (``Served``) and references computed without the gateway.

The fake tokenizer maps each character to its code point (ids 1-3 are special tokens), so expected texts,
prompt lengths and token counts are computed by hand in the tests; the fake generator yields a scripted
token sequence with the engine's semantics (stop after ``max_new_tokens`` or after a stop token) and records
how it was called and whether it was abandoned.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from meshinfer.config import SamplingConfig
from meshinfer.loopthread import run_on
from meshinfer.models.generator import GenerationParams
from meshinfer.models.sampling import ScoredToken

EOS, IM_END, BOS = 1, 2, 3
SPECIAL = {EOS: "<eos>", IM_END: "<|im_end|>", BOS: "<bos>"}


def ids(text: str) -> list[int]:
    """The fake tokenizer's ids of ``text`` (no special tokens)."""
    return [ord(c) for c in text]


class FakeTokenizer:
    chat_template = "fake"
    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids(text)}

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(("" if skip_special_tokens else SPECIAL[i]) if i in SPECIAL else chr(i) for i in token_ids)

    def get_vocab(self) -> dict[str, int]:
        return {name: i for i, name in SPECIAL.items()}

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> str:
        assert not tokenize
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def chat_prompt(messages: list[dict[str, str]]) -> str:
    """What ``FakeTokenizer`` renders for ``messages`` (with the generation prompt)."""
    return FakeTokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def fake_scored(token: int, top: int | None) -> ScoredToken:
    """What ``FakeGenerator`` yields: ``token`` at logprob ``-token/100``, and ``top`` alternatives: the token
    itself first, then ids ``token+1, token+2...`` at lower logprobs (None: no scores, as the engine)."""
    if top is None:
        return ScoredToken(token)
    return ScoredToken(token, -token / 100, tuple((token + i, -token / 100 - i) for i in range(top)))


class FakeGenerator:
    """Yields ``script`` (engine semantics); ``gate`` holds the first token back until set; ``fail`` is raised
    before the first token (``fail_at=0``) or instead of token ``fail_at``; ``delay`` s between tokens."""

    def __init__(self, script: Sequence[int], *, context: int = 256, gate: asyncio.Event | None = None,
                 fail: BaseException | None = None, fail_at: int = 0, delay: float = 0.0,
                 health: dict[str, Any] | None = None, chat_template: str | None = "fake") -> None:
        self.tokenizer = FakeTokenizer()
        self.tokenizer.chat_template = chat_template  # type: ignore[misc]
        self.spec = SimpleNamespace(max_position_embeddings=context, eos_token_ids=(EOS,))
        self.script = list(script)
        self.gate, self.fail, self.fail_at, self.delay = gate, fail, fail_at, delay
        self._health = health if health is not None else {"ok": True}
        self.calls: list[dict[str, Any]] = []
        self.scored: list[list[int]] = []
        self.produced = 0
        self.closed = False

    async def stream(self, input_ids: Sequence[int], params: GenerationParams) -> AsyncIterator[ScoredToken]:
        max_new_tokens, top_logprobs = params.max_new_tokens, params.top_logprobs
        stop_token_ids = params.stops(self.spec.eos_token_ids)
        self.calls.append({"ids": list(input_ids), "max_new_tokens": max_new_tokens, "sampling": params.sampling,
                           "stop_token_ids": stop_token_ids, "top_logprobs": top_logprobs})
        try:
            if self.gate is not None:
                await self.gate.wait()
            for i, token in enumerate(self.script[:max_new_tokens]):
                if self.fail is not None and i == self.fail_at:
                    raise self.fail
                if self.delay:
                    await asyncio.sleep(self.delay)
                self.produced += 1
                yield fake_scored(token, top_logprobs)
                if token in stop_token_ids:
                    return
        finally:
            self.closed = True

    async def score(self, input_ids: Sequence[int], top_logprobs: int) -> list[ScoredToken]:
        self.scored.append(list(input_ids))
        return [fake_scored(t, top_logprobs) for t in input_ids[1:]]

    async def health(self) -> dict[str, Any]:
        return self._health


def sse_events(raw: str) -> list[str]:
    """The ``data:`` payloads of a Server-Sent Events body, checking the framing on the way."""
    assert raw.endswith("\n\n"), raw[-50:]
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


# ---- the real swarm behind the gateway (see conftest.served) ---------------------------------------------

SPANS = [(0, 1), (1, 3), (3, 4)]
CACHE_TOKENS = 4096
"""Each server's KV budget (``--cache-tokens``): what ``cache_tokens_left`` returns to once sessions close."""
MODEL_NAME = "tiny-llama3"


@dataclass
class Served:
    """A running swarm with the gateway in front of it."""

    model_dir: Path
    swarm: Any  # LocalSwarm
    model: Any  # DistributedModel, the gateway's
    local: Any  # LocalModel of the same checkpoint
    server: Any  # ApiServer
    app: Any

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/v1"

    def on_client_loop(self, coro: Any, timeout: float = 20.0) -> Any:
        """Run ``coro`` on the gateway's client loop (where its swarm view lives)."""
        return run_on(self.model.loop, coro, timeout)

    def cache_left(self) -> dict[str, int]:
        """Each server's announced ``cache_tokens_left``, read from the DHT now."""
        cov = self.on_client_loop(self.model.view.coverage(self.model.ref, refresh=True))
        return {peer: rec.cache_tokens_left for peer, rec in cov.servers.items()}


# ---- references computed without the gateway (for the tests against a real swarm) ----------------------


def local_chat(local: Any, messages: list[dict[str, str]], max_tokens: int,
               sampling: SamplingConfig | None = None) -> tuple[str, list[int], list[int], str]:
    """What ``meshinfer chat`` does locally for ``messages``: (reply text, prompt ids, reply ids, finish reason).

    The prompt is rendered with the tokenizer's chat template and tokenised without special tokens; the reply
    ends at ``meshinfer.cli.chat.stop_ids``; the text is the reply's decode with special tokens skipped."""
    from meshinfer.cli.chat import stop_ids

    tok = local.tokenizer
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = [int(i) for i in tok(rendered, add_special_tokens=False)["input_ids"]]
    stops = stop_ids(tok, local.spec)
    reply = local.generate(prompt, max_tokens, sampling or SamplingConfig(), stop_token_ids=stops)
    text = tok.decode(reply, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text, prompt, reply, "stop" if reply and reply[-1] in stops else "length"
