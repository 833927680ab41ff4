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
tokenising). Knows nothing of tokenizers or models.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from meshinfer.client.routing import NoRouteError
from meshinfer.config import MAX_LOGIT_BIAS, SamplingConfig
from meshinfer.errors import ConfigError, ContextOverflowError, MeshinferError, RemoteError, TransportError
from meshinfer.gateway.structured import ResponseFormatError, parse_response_format
from meshinfer.gateway.tools import ToolError, ToolRequest, parse_tools, tool_message
from meshinfer.models.grammar import GrammarSpec

MAX_STOP_STRINGS = 4
"""The OpenAI API accepts up to 4 stop sequences."""
MAX_CHOICES = 16
"""The most choices (``n``) one request may ask for: each is a generation of its own on the swarm."""
SEED_RANGE = (-(2**63), 2**63 - 1)
"""Accepted ``seed`` values (int64, as the OpenAI API documents; choice i samples with ``seed + i``)."""
MAX_STOP_TOKEN_IDS = 128
"""The most ``stop_token_ids`` one request may give (with the model's own, within ``wire.sealed.MAX_STOP_IDS``)."""
MAX_LOGPROBS = 20
"""The most alternatives per token a request may ask for (``models.sampling.MAX_TOP_LOGPROBS``)."""
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
"""Accepted message roles and the role the chat template sees (``developer`` is OpenAI's newer ``system``)."""


class ApiError(MeshinferError):
    """An error answer in the OpenAI format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error" if status != 503 else "service_unavailable_error"
    return "invalid_request_error"


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


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


def _text(value: str, param: str) -> str:
    """``value``, or a 400 when it is not valid Unicode text (a lone surrogate from a ``\\ud800`` escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise bad(f"{param} is not valid Unicode text: {err.reason} at character {err.start}", param=param) from None
    return value


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """Nothing when no key is configured or ``Authorization: Bearer <key>`` matches; else 401."""
    if api_key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


def check_model(requested: str, served: str) -> None:
    """404 ``model_not_found`` unless ``requested`` is the served model's name."""
    if requested != served:
        raise ApiError(404, f"the model {requested!r} does not exist; this gateway serves {served!r}",
                       param="model", code="model_not_found")


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


def error_for(err: BaseException) -> ApiError:
    """The OpenAI error answer for any exception raised while serving a request."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ContextOverflowError):
        return bad(str(err), code="context_length_exceeded")
    if isinstance(err, NoRouteError):
        return ApiError(503, f"the swarm cannot serve this model right now: {err}", code="no_route")
    if isinstance(err, RemoteError) and err.code == "overloaded":
        return ApiError(503, f"the swarm is overloaded right now: {err}", code="overloaded")
    if isinstance(err, TransportError):
        return ApiError(503, f"the swarm cannot be reached right now: {err}", code="swarm_unreachable")
    if isinstance(err, ConfigError):
        return bad(str(err))
    return ApiError(500, f"internal error: {type(err).__name__}: {err}")


# ---- field parsers ----------------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, *,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"{name} must be a number, got {value!r}", param=name)
    if not (low < value if low_open else low <= value) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad(f"{name} must be in {interval}, got {value!r}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {value!r}", param=name)
    if low is not None and value < low:
        raise bad(f"{name} must be >= {low}, got {value}", param=name)
    return value


def _seed(body: dict[str, Any]) -> int | None:
    seed = _integer(body, "seed")
    low, high = SEED_RANGE
    if seed is not None and not low <= seed <= high:
        raise bad(f"seed must be a 64-bit signed integer (in {low}..{high}), got {seed}", param="seed")
    return seed


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop must be a string or a list of strings", param="stop")
    if len(items) > MAX_STOP_STRINGS:
        raise bad(f"stop takes at most {MAX_STOP_STRINGS} sequences, got {len(items)}", param="stop")
    if any(s == "" for s in items):
        raise bad("stop sequences must not be empty", param="stop")
    for s in items:
        _text(s, "stop")
    return tuple(dict.fromkeys(items))


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: an object of token ids (as strings) to biases in [-100, 100]."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad("logit_bias must be an object mapping token ids (strings) to numbers", param="logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(value)}", param="logit_bias")
    pairs: dict[int, float] = {}
    for key, bias in value.items():
        token = key.strip()
        if not (token.isascii() and token.isdigit()) or len(token) > 10:
            raise bad(f"logit_bias keys must be token ids (non-negative integers as strings), got {key[:32]!r}",
                      param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise bad(f"logit_bias[{token}] must be a number in [-100, 100], got {bias!r}", param="logit_bias")
        pairs[int(token)] = float(bias)  # "7" and "07" name one token: the last one given wins
    return tuple(pairs.items())


def _stop_token_ids(body: dict[str, Any]) -> tuple[int, ...]:
    value = body.get("stop_token_ids")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad("stop_token_ids must be a list of token ids (integers)", param="stop_token_ids")
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise bad(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(value)}", param="stop_token_ids")
    if any(t < 0 for t in value):
        raise bad(f"token ids must be >= 0, got {min(value)}", param="stop_token_ids")
    return tuple(dict.fromkeys(value))


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be a boolean, got {value!r}", param=name)
    return value


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
    _text(model, "model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad(f"stream must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", param="stream_options")
    include_usage = bool(stream and options and options.get("include_usage"))
    top_k = _integer(body, "top_k", low=-1)
    try:
        sampling = SamplingConfig(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            top_k=max(0, top_k or 0),  # -1 (vLLM's "disabled") and 0 both disable it
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
            seed=_seed(body),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            logit_bias=_logit_bias(body),
        )
    except ConfigError as err:  # the ranges above should already exclude this
        raise bad(str(err)) from None
    n = _integer(body, "n", low=1) or 1
    if n > MAX_CHOICES:
        raise bad(f"n must be in 1..{MAX_CHOICES}, got {n}", param="n")
    try:
        grammar = parse_response_format(body.get("response_format"))
    except ResponseFormatError as err:
        raise bad(str(err), param="response_format") from None
    return {"model": model, "sampling": sampling, "stop": _stop(body), "stream": stream,
            "include_usage": include_usage, "n": n, "ignore_eos": _flag(body, "ignore_eos"),
            "stop_token_ids": _stop_token_ids(body), "grammar": grammar}


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return _text(content, f"messages[{index}].content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{index}].content: only text parts are supported",
                          param=f"messages[{index}].content")
            parts.append(_text(part["text"], f"messages[{index}].content"))
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
    max_tokens = _integer(body, "max_completion_tokens", low=1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", low=1)
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad(f"logprobs must be a boolean, got {logprobs!r}", param="logprobs")
    top = _logprob_count(body, "top_logprobs")
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
    max_tokens = _integer(body, "max_completion_tokens", low=0)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", low=0)
    if max_tokens == 0 and not echo:
        raise bad("max_tokens must be >= 1 (0 only with echo: true)", param="max_tokens")
    best_of = _integer(body, "best_of", low=1)
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
        parsed: str | tuple[int, ...] = _text(prompt, "prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise bad(f"token ids must be >= 0, got {min(prompt)}", param="prompt")
        parsed = tuple(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise bad("only one prompt per request is supported", param="prompt")
    else:
        raise bad("prompt must be a string or a non-empty list of token ids", param="prompt")
    return GenerationRequest(kind="completion", prompt=parsed, max_tokens=max_tokens,
                             top_logprobs=_logprob_count(body, "logprobs"), echo=bool(echo), **common)


def _logprob_count(body: dict[str, Any], name: str) -> int | None:
    count = _integer(body, name, low=0)
    if count is not None and count > MAX_LOGPROBS:
        raise bad(f"{name} must be in 0..{MAX_LOGPROBS}, got {count}", param=name)
    return count
