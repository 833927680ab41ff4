"""OpenAI request bodies in, validated ``GenerationRequest``s out; OpenAI-format errors.

Contract: pure functions over plain JSON data (dicts, lists, numbers): no HTTP framework, no torch, no
network, so every rule here is tested in milliseconds. ``parse_chat_request`` / ``parse_completion_request``
check a decoded body the way the OpenAI API documents it and raise ``ApiError`` (status 400, the offending
``param``) for anything malformed or unsupported by the engine: ``n`` over 16, ``best_of`` > 1, ``suffix``,
several prompts. Chat takes ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (or the legacy ``functions``),
``tool`` messages and assistant messages with ``tool_calls`` (``gateway.tools``; completions refuse tools).
``response_format`` (text, json_object, json_schema; both endpoints) becomes ``GenerationRequest.grammar``
(``gateway.structured``). Sampling takes OpenAI's ``presence_penalty`` /
``frequency_penalty`` (in [-2, 2]) and ``logit_bias`` (token-id strings to numbers in [-100, 100], at most 1024;
``check_token_ids`` checks the ids against the vocabulary once the gateway knows it), and vLLM's extensions
``min_p``, ``ignore_eos`` (no eos / end-of-turn stop; stop strings still apply) and ``stop_token_ids`` (added to
the stop set); ``max_completion_tokens`` is a synonym of ``max_tokens`` in both endpoints (it wins when both are
given). ``logprobs`` are supported: chat takes ``logprobs: true`` and ``top_logprobs`` 0..20,
completions ``logprobs`` 0..20 (the number of alternatives); ``top_logprobs`` is then that number and None
when none were asked for. Completions take ``echo`` (the prompt comes back before the answer, with its own
tokens' logprobs when asked: how evaluation harnesses score a text), and then ``max_tokens`` may be 0. Unknown
fields are ignored (clients send many). ``temperature`` defaults to 1 as in the OpenAI API; ``top_k`` and
``repetition_penalty`` are accepted as extensions. ``resolve_max_tokens`` applies the context limit (400
``context_length_exceeded``); ``check_api_key`` (401) and ``check_model`` (404) guard every ``/v1`` route.
``error_for`` maps any exception to the ``ApiError`` to send: ``ContextOverflowError``/``ConfigError`` 400,
``NoRouteError``, an ``overloaded`` server or an unreachable swarm 503 (with the reason), anything else 500.
No input may cause that 500: JSON nested too deeply, a text with a lone surrogate (not UTF-8 encodable; in the
model name, a prompt, a message or a stop string), a ``seed`` outside int64, a negative token id are 400s,
and so is a prompt longer in characters than the context could hold (``check_prompt_chars``, before any
tokenising). The OpenAI errors and route guards (``ApiError``, ``bad``, ``check_api_key``, ``check_model``,
``error_for``) are ``gateway.apierror``'s, the readers of single fields ``gateway.fields``'s (both re-exported
here); this module composes them into whole requests. Knows nothing of tokenizers or models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from meshinfer.config import SamplingConfig
from meshinfer.errors import ConfigError
from meshinfer.gateway import fields
from meshinfer.gateway.apierror import ApiError, bad, check_api_key, check_model, error_for
from meshinfer.gateway.fields import MAX_LOGPROBS
from meshinfer.gateway.structured import ResponseFormatError, parse_response_format
from meshinfer.gateway.tools import ToolError, ToolRequest, parse_tools, tool_message
from meshinfer.models.grammar import GrammarSpec

__all__ = [
    "MAX_CHOICES", "MAX_LOGPROBS", "ApiError", "GenerationRequest", "bad", "check_api_key", "check_model",
    "check_prompt_chars", "check_token_ids", "error_for", "parse_chat_request", "parse_completion_request",
    "parse_json_body", "resolve_max_tokens",
]

MAX_CHOICES = 16
"""The most choices (``n``) one request may ask for: each is a generation of its own on the swarm."""
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
"""Accepted message roles and the role the chat template sees (``developer`` is OpenAI's newer ``system``)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One validated ``/v1/chat/completions`` or ``/v1/completions`` request."""

    kind: Literal["chat", "completion"]
    model: str
    messages: tuple[dict[str, Any], ...] = ()
    """Chat: the conversation, each ``{"role", "content"}`` with text content only (``tool`` messages add
    ``tool_call_id``; assistant messages with calls add ``tool_calls`` and may have ``content`` None)."""
    prompt: str | tuple[int, ...] = ""
    """Completion: the prompt text, or its token ids."""
    max_tokens: int | None = None
    """None: the gateway's default (bounded by the context)."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None
    """None: no logprobs; else report each token's logprob and this many (0..20) alternatives."""
    echo: bool = False
    """Completion: answer with the prompt followed by the completion (and the prompt's logprobs)."""
    n: int = 1
    """How many choices to generate (1..16); with a ``seed``, choice i samples with ``seed + i``."""
    ignore_eos: bool = False
    """vLLM's extension: do not stop at the model's eos / end-of-turn tokens (stop strings still apply)."""
    stop_token_ids: tuple[int, ...] = ()
    """vLLM's extension: more token ids that end the generation (added to the stop set)."""
    grammar: GrammarSpec | None = None
    """What the output must match (``response_format``: ``gateway.structured``); None: free text."""
    tools: ToolRequest | None = None
    """Chat: the declared tools and ``tool_choice`` (``gateway.tools``); None: no tools."""


# ---- checks of the whole request ----------------------------------------------------------------


def parse_json_body(raw: bytes) -> Any:
    """The decoded JSON body, or a 400 saying it is not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"the request body is not valid JSON ({err})") from None
    except RecursionError:
        raise bad("the request body is JSON nested too deeply") from None


def check_prompt_chars(chars: int, context: int, max_token_chars: int, param: str) -> None:
    """400 ``context_length_exceeded`` when a prompt of ``chars`` characters cannot fit ``context`` tokens even
    if each token covered ``max_token_chars`` characters (the vocabulary's longest): checked before tokenising."""
    limit = context * max_token_chars
    if chars > limit:
        raise bad(f"this model's maximum context length is {context} tokens; the prompt has {chars} characters, "
                  f"more than {context} tokens can cover (limit {limit} characters: {max_token_chars} per token at "
                  "most)", param=param, code="context_length_exceeded")


def resolve_max_tokens(prompt_tokens: int, requested: int | None, context: int, default: int) -> int:
    """How many tokens to generate at most: ``requested``, or ``default`` bounded by what the context leaves;
    400 ``context_length_exceeded`` when the prompt plus the requested tokens do not fit."""
    if prompt_tokens <= 0:
        raise bad("the prompt is empty: give at least one token", param="prompt")
    if prompt_tokens >= context:
        raise bad(f"this model's maximum context length is {context} tokens; however, the prompt has "
                  f"{prompt_tokens} tokens, leaving none to generate", param="messages", code="context_length_exceeded")
    if requested is None:
        return min(default, context - prompt_tokens)
    if prompt_tokens + requested > context:
        raise bad(f"this model's maximum context length is {context} tokens; however, you requested "
                  f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the "
                  f"completion): reduce the prompt or max_tokens", param="max_tokens", code="context_length_exceeded")
    return requested


# ---- field parsers ----------------------------------------------------------------------------------


def check_token_ids(req: GenerationRequest, vocab_size: int | None) -> None:
    """400 when ``logit_bias`` or ``stop_token_ids`` name a token past the vocabulary (``vocab_size`` None:
    unknown, nothing checked)."""
    if vocab_size is None:
        return
    for param, ids in (("logit_bias", [t for t, _ in req.sampling.logit_bias]), ("stop_token_ids", req.stop_token_ids)):
        if ids and max(ids) >= vocab_size:
            raise bad(f"token id {max(ids)} is not in the model's vocabulary (ids 0..{vocab_size - 1})", param=param)


def _common(body: Any) -> dict[str, Any]:
    """Fields both endpoints share, checked."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter", param="model")
    fields.text(model, "model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad(f"stream must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", param="stream_options")
    include_usage = bool(stream and options and options.get("include_usage"))
    top_k = fields.integer(body, "top_k", low=-1)
    try:
        sampling = SamplingConfig(
            temperature=fields.number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=fields.number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            top_k=max(0, top_k or 0),  # -1 (vLLM's "disabled") and 0 both disable it
            repetition_penalty=fields.number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
            seed=fields.seed(body),
            presence_penalty=fields.number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=fields.number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            min_p=fields.number(body, "min_p", 0.0, 0.0, 1.0),
            logit_bias=fields.logit_bias(body),
        )
    except ConfigError as err:  # the ranges above should already exclude this
        raise bad(str(err)) from None
    n = fields.integer(body, "n", low=1) or 1
    if n > MAX_CHOICES:
        raise bad(f"n must be in 1..{MAX_CHOICES}, got {n}", param="n")
    try:
        grammar = parse_response_format(body.get("response_format"))
    except ResponseFormatError as err:
        raise bad(str(err), param="response_format") from None
    return {"model": model, "sampling": sampling, "stop": fields.stop(body), "stream": stream,
            "include_usage": include_usage, "n": n, "ignore_eos": fields.flag(body, "ignore_eos"),
            "stop_token_ids": fields.stop_token_ids(body), "grammar": grammar}


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return fields.text(content, f"messages[{index}].content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{index}].content: only text parts are supported",
                          param=f"messages[{index}].content")
            parts.append(fields.text(part["text"], f"messages[{index}].content"))
        return "".join(parts)
    raise bad(f"messages[{index}].content must be a string or a list of text parts",
              param=f"messages[{index}].content")


def parse_chat_request(body: Any) -> GenerationRequest:
    """A validated chat completion request (see the module docstring for the rules)."""
    common = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                      param=f"messages[{i}].role")
        calls = role == "assistant" and message.get("tool_calls") is not None
        content = None if calls and message.get("content") is None else _content(message, i)
        if role == "tool" or calls:
            try:
                out.append(tool_message(message, i, content))
            except ToolError as err:
                raise bad(str(err), param=err.param) from None
        else:
            out.append({"role": CHAT_ROLES[role], "content": content})
    max_tokens = fields.integer(body, "max_completion_tokens", low=1)
    if max_tokens is None:
        max_tokens = fields.integer(body, "max_tokens", low=1)
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad(f"logprobs must be a boolean, got {logprobs!r}", param="logprobs")
    top = fields.logprob_count(body, "top_logprobs")
    if top and not logprobs:
        raise bad("top_logprobs requires logprobs: true", param="top_logprobs")
    try:
        tools = parse_tools(body)
    except ToolError as err:
        raise bad(str(err), param=err.param) from None
    if tools is not None and tools.choice not in ("auto", "none") and common["grammar"] is not None:
        raise bad("response_format cannot be combined with a forced tool call (tool_choice required or named)",
                  param="tool_choice")
    return GenerationRequest(kind="chat", messages=tuple(out), max_tokens=max_tokens,
                             top_logprobs=(top or 0) if logprobs else None, tools=tools, **common)


def parse_completion_request(body: Any) -> GenerationRequest:
    """A validated (legacy) completion request with one prompt: text, or token ids."""
    common = _common(body)
    echo = body.get("echo", False)
    if not isinstance(echo, bool | None):
        raise bad(f"echo must be a boolean, got {echo!r}", param="echo")
    max_tokens = fields.integer(body, "max_completion_tokens", low=0)
    if max_tokens is None:
        max_tokens = fields.integer(body, "max_tokens", low=0)
    if max_tokens == 0 and not echo:
        raise bad("max_tokens must be >= 1 (0 only with echo: true)", param="max_tokens")
    best_of = fields.integer(body, "best_of", low=1)
    if best_of not in (None, 1):
        raise bad(f"best_of must be 1, got {best_of}", param="best_of", code="unsupported_parameter")
    if body.get("tools") or body.get("functions"):
        raise bad("tools are for /v1/chat/completions", param="tools", code="unsupported_parameter")
    if body.get("suffix"):
        raise bad("suffix is not supported by this gateway", param="suffix", code="unsupported_parameter")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        parsed: str | tuple[int, ...] = fields.text(prompt, "prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise bad(f"token ids must be >= 0, got {min(prompt)}", param="prompt")
        parsed = tuple(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise bad("only one prompt per request is supported", param="prompt")
    else:
        raise bad("prompt must be a string or a non-empty list of token ids", param="prompt")
    return GenerationRequest(kind="completion", prompt=parsed, max_tokens=max_tokens,
                             top_logprobs=fields.logprob_count(body, "logprobs"), echo=bool(echo), **common)


