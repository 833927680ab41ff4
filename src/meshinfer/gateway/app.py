"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/health``.

Contract: ``create_app(generator, model_name, config, more=...)`` builds the ASGI app around a ``Generator`` (the
swarm's ``SwarmGenerator`` in production, a fake in unit tests), and any more generators by served name
(``gateway.registry.ModelTable``: a request's ``model`` picks one, an unknown name is a 404 listing the served ones;
``ModelTable.add`` serves one more later; all share the first ``Gateway``'s slots, worker thread and counters;
``/v1/models`` lists them with their coverage and the swarm's other models; ``/health`` is the first model's,
``/metrics`` its session metrics plus every model's prompt-cache counters, ``gateway.cachemetrics``); it knows
nothing of servers, routes or sessions. Each request: check the key (401), read the body under ``HttpLimits``
(``gateway.body``: 413 past ``max_body_bytes`` before reading it, 408 past ``body_timeout``), parse and validate the
JSON body (``gateway.requests``; bad input is a 400 in the OpenAI error format, never FastAPI's own, and no input is
a 500), check the model name (404), render the prompt (chat: the tokenizer's chat template with
``add_generation_prompt=True``, tokenised without extra special tokens, as ``meshinfer chat`` does; completion: the
text tokenised as ``meshinfer generate`` does, or the given token ids, each below the vocabulary size), apply the
context limit (a prompt of more characters than the context could hold, or of more messages than it has tokens, is
refused before rendering and tokenising), wait for one of ``max_concurrency`` generation slots (429 when
``max_waiting`` requests already wait; each of ``n`` choices is a generation of its own, ``gateway.choices``), and
wait for the first generated token of every choice before answering, so that a swarm that cannot serve the model (503
with the reason) or a context error is a proper HTTP error even for ``stream: true``. Streams are Server-Sent Events
ending with ``data: [DONE]``; an error after the stream has started is sent as one ``data: {"error": ...}`` event
before ``[DONE]``. When the HTTP client goes away (a failed send, or ``is_disconnected`` while waiting), the
generation is abandoned: its session closes on every server. Chat replies end at the model's eos and end-of-turn
tokens; completions at the eos ids (neither with ``ignore_eos``; ``stop_token_ids`` are added to either; at both with
a ``response_format`` grammar, compiled once per request on the worker thread by the gateway's one
``models.grammar.GrammarCompiler``, a fresh grammar state per choice: 400 for a schema it rejects). Chat with
``tools``: ``gateway.toolflow`` (the template's ``tools=``, the grammar of "required" / a named tool, the reply
parsed into ``tool_calls``; streams hold back a possible call marker, ``gateway.toolstream``, and send the calls as
``tool_calls`` deltas: Hermes calls as they are generated, the name first and then the arguments in fragments; other
formats each call whole at the end). A completion with ``echo`` answers the prompt first (scored by the generator when
logprobs are asked for: one more pass over the prompt, inside the request's slot), then the completion. Decoding the
JSON, validating it, rendering and tokenising the prompt run on one worker thread, off the event loop, so one huge
request never stalls the others (e.g. ``GET /v1/models``). ``/metrics`` needs the key too. ``/health`` is not
key-protected (a load balancer's probe; it shows only the swarm's coverage and the counters): 200 with the swarm's
status when a route exists, else 503 with the reason; both carry the gateway's counters (generation requests, active,
waiting, completed, failed, cancelled: abandoned because the client went away). ``app.state.shutdown_hooks``: what
stops the app's threads and tasks (the worker thread; a caller appends more, e.g. an ``AutoLoader``'s ``aclose``),
run once by ``gateway.serving.shutdown_app`` (``ApiServer`` does when it stops serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from meshinfer.errors import ConfigError
from meshinfer.gateway.body import read_body
from meshinfer.gateway.cachemetrics import PromptCacheCollector
from meshinfer.gateway.choices import Answer, Choices
from meshinfer.gateway.config import GatewayConfig
from meshinfer.gateway.generation import Generator, Outcome, echo_prompt, generate_text
from meshinfer.gateway.httpflow import ClientGone, ClosingStream, after, unless_gone
from meshinfer.gateway.registry import ModelTable
from meshinfer.gateway.requests import (
    ApiError,
    GenerationRequest,
    bad,
    check_api_key,
    check_prompt_chars,
    check_token_ids,
    error_for,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
    resolve_max_tokens,
)
from meshinfer.gateway.responses import SSE_DONE, Choice, ResponseBuilder, Usage, sse
from meshinfer.gateway.tool_output import tool_family
from meshinfer.gateway.toolflow import ToolFlow, special_markers
from meshinfer.gateway.tools import Family
from meshinfer.metrics import render
from meshinfer.models.constraint import ConstraintFactory
from meshinfer.models.detokenize import chat_stop_ids, text_decoder
from meshinfer.models.generator import GenerationParams
from meshinfer.models.grammar import GrammarCompiler, GrammarSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_TOKEN_CHARS = 64
"""Characters one token may cover when the tokenizer cannot list its vocabulary (for the prompt's size check)."""


class Gateway:
    """The state behind the routes: the generator, the served name, the limits and counters."""

    def __init__(self, generator: Generator, model_name: str, config: GatewayConfig, *,
                 share: Gateway | None = None) -> None:
        """``share``: the gateway whose slots, worker thread and counters this one uses (one pool for every
        model of an app; None: its own)."""
        self.generator = generator
        self.model_name = model_name
        self.config = config
        self.created = int(time.time()) if share is None else share.created
        self.slots = asyncio.Semaphore(config.max_concurrency) if share is None else share.slots
        self.stats = ({"requests": 0, "active": 0, "waiting": 0, "completed": 0, "failed": 0, "cancelled": 0}
                      if share is None else share.stats)
        tokenizer = generator.tokenizer
        self.chat_stop_ids = chat_stop_ids(tokenizer, generator.spec.eos_token_ids)
        self.eos_ids = frozenset(generator.spec.eos_token_ids)
        self.vocab_size: int | None = getattr(generator.spec, "vocab_size", None)
        self.max_token_chars = _max_token_chars(tokenizer)
        self._owner: Gateway = self if share is None else share
        self._worker: ThreadPoolExecutor | None = None  # the owner's; started on first use, stopped by close()
        self._grammars: GrammarCompiler | None = None
        template = getattr(tokenizer, "chat_template", None)
        self.tool_family: Family | None = tool_family(template) if isinstance(template, str) else None
        """The tool-call format of the model's chat template (``gateway.tool_output``); None: it takes no tools."""
        self.tool_specials = special_markers(tokenizer, self.tool_family)

    def compile_grammar(self, spec: GrammarSpec) -> ConstraintFactory:
        """The decoding constraint for ``spec`` (on the worker thread: see ``offload``); a 400 naming
        ``spec.name`` when the grammar engine rejects it. Its eos set is every chat stop id."""
        try:
            if self._grammars is None:
                tokenizer = self.generator.tokenizer
                if not self.vocab_size and not hasattr(tokenizer, "__len__"):
                    raise ConfigError("structured output needs the model's vocabulary size")
                self._grammars = GrammarCompiler(tokenizer, self.vocab_size or len(tokenizer), self.chat_stop_ids)
            return self._grammars.compile(spec)
        except ConfigError as err:
            raise bad(str(err), param=spec.name or None) from None

    def close(self) -> None:
        """Stop the worker thread (the owner's, which every sharing gateway uses; a later ``offload`` starts a
        fresh one); idempotent."""
        owner = self._owner
        worker, owner._worker = owner._worker, None
        if worker is not None:
            worker.shutdown(wait=True, cancel_futures=True)

    async def offload(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the gateway's one worker thread (JSON, validation, templates, tokenising)."""
        owner = self._owner
        if owner._worker is None:
            owner._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshinfer-gateway-parse")
        return await asyncio.get_running_loop().run_in_executor(owner._worker, fn)

    # ---- prompts -------------------------------------------------------------------------------

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """The request's prompt as token ids (on the worker thread: see ``offload``)."""
        tokenizer = self.generator.tokenizer
        context = self.generator.spec.max_position_embeddings
        check_token_ids(req, self.vocab_size)
        if req.kind == "completion":
            if isinstance(req.prompt, tuple):
                if self.vocab_size is not None and max(req.prompt) >= self.vocab_size:
                    raise bad(f"token id {max(req.prompt)} is not in the model's vocabulary (ids 0.."
                              f"{self.vocab_size - 1})", param="prompt")
                return list(req.prompt)
            check_prompt_chars(len(req.prompt), context, self.max_token_chars, "prompt")
            return [int(i) for i in tokenizer(req.prompt)["input_ids"]]
        if len(req.messages) >= context:  # every chat template marks each message with at least one token
            raise bad(f"this model's maximum context length is {context} tokens; {len(req.messages)} messages cannot "
                      "fit (each takes at least one token)", param="messages", code="context_length_exceeded")
        chars = sum(len(m["content"] or "") + len(json.dumps(m.get("tool_calls", ""))) for m in req.messages)
        check_prompt_chars(chars, context, self.max_token_chars, "messages")
        if not getattr(tokenizer, "chat_template", None):
            raise bad("this model's tokenizer has no chat template (a base model?): use /v1/completions",
                      param="messages")
        extra = ToolFlow(req, self.tool_family, self.tool_specials).template_kwargs()  # tools= (gateway.toolflow)
        try:
            text = tokenizer.apply_chat_template(list(req.messages), add_generation_prompt=True, tokenize=False,
                                                 **extra)
        except Exception as err:  # a template may reject a conversation (e.g. roles that do not alternate)
            raise bad(f"the chat template rejected these messages: {err}", param="messages") from None
        check_prompt_chars(len(text), context, self.max_token_chars, "messages")
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

    # ---- generation ----------------------------------------------------------------------------

    async def _in_slot(self, pieces: AsyncIterator[str]) -> AsyncIterator[str]:
        """``pieces`` run inside a generation slot (waiting for one first; 429 when too many wait)."""
        async with contextlib.aclosing(pieces):  # type: ignore[type-var]
            if self.slots.locked() and self.stats["waiting"] >= self.config.max_waiting:
                raise ApiError(429, f"too many requests: {self.config.max_concurrency} generations are running and "
                                    f"{self.stats['waiting']} requests wait; retry later", code="rate_limit_exceeded")
            self.stats["waiting"] += 1
            try:
                await self.slots.acquire()
            finally:
                self.stats["waiting"] -= 1
            self.stats["active"] += 1
            try:
                async for piece in pieces:
                    yield piece
            finally:
                self.stats["active"] -= 1
                self.slots.release()

    def _choice(self, req: GenerationRequest, ids: list[int], max_tokens: int, index: int,
                constraint: ConstraintFactory | None = None, keep: Mapping[int, str] | None = None) -> Answer:
        """Choice ``index`` of ``req``: its own generation (with a ``seed``, sampling with ``seed + index``;
        with ``constraint``, its own grammar state, ending at any chat stop id as the grammar's eos)."""
        outcome = Outcome(prompt_tokens=len(ids))
        sampling = req.sampling
        if index and sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=sampling.seed + index)
        stops = frozenset[int]() if req.ignore_eos else self.chat_stop_ids if req.kind == "chat" else self.eos_ids
        if constraint is not None:  # a finished grammar allows only the end-of-turn / eos tokens: they must stop
            stops = stops | self.chat_stop_ids
        stops = stops | frozenset(req.stop_token_ids)
        params = GenerationParams.of(max_tokens, sampling, stops, req.top_logprobs)
        params = dataclasses.replace(params, constraint=constraint)
        pieces = generate_text(self.generator, ids, params, req.stop, outcome, keep)
        if req.echo:
            text = req.prompt if isinstance(req.prompt, str) else text_decoder(self.generator.tokenizer)(ids)
            pieces = after(lambda: echo_prompt(self.generator, ids, text, req.top_logprobs, outcome), pieces)
        return Answer(self._in_slot(pieces), outcome, self.stats)

    async def answer(self, request: Request, req: GenerationRequest) -> Response:
        ids = await self.offload(lambda: self.prompt_ids(req))
        tools = ToolFlow(req, self.tool_family, self.tool_specials)
        grammar = tools.grammar(req.grammar)
        constraint = None if grammar is None else await self.offload(lambda: self.compile_grammar(grammar))
        spec = self.generator.spec
        max_tokens = resolve_max_tokens(len(ids), req.max_tokens, spec.max_position_embeddings,
                                        self.config.default_max_tokens)
        builder = ResponseBuilder(req.kind, self.model_name, include_usage=req.include_usage,
                                  logprobs=req.top_logprobs is not None)
        choices = Choices([self._choice(req, ids, max_tokens, i, constraint, tools.kept_tokens)
                           for i in range(req.n)])
        try:
            firsts = await unless_gone(request, choices.firsts())
            if not req.stream:
                rests = await unless_gone(request, choices.rests())
                await choices.close()
                outcomes = choices.outcomes
                usage = Usage(len(ids), sum(o.completion_tokens for o in outcomes))
                done = [tools.finish_choice(Choice(f + r, o.finish_reason, o.logprobs))
                        for f, r, o in zip(firsts, rests, outcomes, strict=True)]
                return JSONResponse(builder.full_choices(done, usage))
        except BaseException as err:
            if isinstance(err, Exception) and not isinstance(err, ClientGone):
                choices.fail()
            await choices.close()
            raise
        return ClosingStream(self._events(builder, firsts, choices, tools), on_close=choices.close)

    async def _events(self, builder: ResponseBuilder, firsts: list[str], choices: Choices,
                      tools: ToolFlow) -> AsyncIterator[str]:
        outcomes = choices.outcomes
        sent = [0] * len(outcomes)  # per choice, tokens whose logprobs went out (each with its own text delta)
        streams = tools.streams(len(outcomes))

        def chunk(index: int, piece: str, scored: int) -> str | None:
            calls = ""  # tool-call deltas streamed as they are generated (gateway.toolstream), after the content
            if (stream := streams[index]) is not None:
                piece = stream.push(piece)
                calls = "".join(sse(c) for c in tools.stream_deltas(stream, builder, index))
            entries = outcomes[index].logprobs[sent[index]:scored]  # those of the tokens up to this piece
            if not piece and not (builder.logprobs and entries):
                return calls or None
            sent[index] = scored
            return sse(builder.text_chunk(piece, entries, index)) + calls

        try:
            for index in range(len(outcomes)):
                if (head := builder.first_chunk(index)) is not None:
                    yield sse(head)
            for index, first in enumerate(firsts):
                if (event := chunk(index, first, len(outcomes[index].logprobs))) is not None:
                    yield event
            async for index, piece, scored in choices.items():
                if piece is not None:
                    if (event := chunk(index, piece, scored)) is not None:
                        yield event
                else:
                    outcome = outcomes[index]
                    reason = outcome.finish_reason
                    if (stream := streams[index]) is not None:
                        events, reason = tools.stream_end(stream, builder, index, reason)
                        for event in events:
                            yield sse(event)
                    yield sse(builder.finish_chunk(reason, outcome.logprobs[sent[index]:], index))
            if builder.include_usage:
                prompt = outcomes[0].prompt_tokens
                yield sse(builder.usage_chunk(Usage(prompt, sum(o.completion_tokens for o in outcomes))))
        except Exception as err:  # the status line is sent already: report the error in the stream
            choices.fail()
            self.stats["failed"] += 1
            api = error_for(err)
            log.warning("generation failed mid-stream: %s", api.message)
            yield sse(api.body())
        finally:
            await choices.close()
        yield SSE_DONE


def _max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer``'s vocabulary spells (its longest entry, special tokens
    included), so that ``chars > context * this`` proves a text has more tokens than the context holds."""
    try:
        return max(1, max((len(str(t)) for t in tokenizer.get_vocab()), default=1))
    except Exception:  # a tokenizer without a listable vocabulary
        return DEFAULT_MAX_TOKEN_CHARS


def _error_response(err: ApiError) -> Response:
    """The error in the OpenAI format, as ASCII JSON (safe whatever text the message quotes)."""
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    body = json.dumps(err.body(), separators=(",", ":"))
    return Response(body, status_code=err.status, headers=headers, media_type="application/json")


def create_app(generator: Generator, model_name: str, config: GatewayConfig | None = None, *,
               more: Mapping[str, Generator] | None = None) -> FastAPI:
    """The ASGI app serving ``generator`` under ``model_name``, and each of ``more`` under its name (see the
    module docstring)."""
    config = config or GatewayConfig()
    gateway = Gateway(generator, model_name, config)
    table = ModelTable({model_name: gateway, **{name: Gateway(gen, name, config, share=gateway)
                                                for name, gen in (more or {}).items() if name != model_name}})
    if (session_metrics := getattr(generator, "metrics", None)) is not None:  # what /metrics renders
        session_metrics.registry.register(PromptCacheCollector(table))
    app = FastAPI(title="meshinfer OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.state.models = table
    app.state.shutdown_hooks = [gateway.close]  # run by ``gateway.serving.shutdown_app`` (uvicorn's lifespan is off)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(ApiError(exc.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception) -> Response:
        return _error_response(error_for(exc))

    async def guarded(request: Request, work: Callable[[], Awaitable[Response]]) -> Response:
        """Run one /v1 handler: key check first, every error in the OpenAI format."""
        try:
            check_api_key(request.headers.get("authorization"), config.api_key)
            return await work()
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        except Exception as err:
            api = error_for(err)
            if api.status >= 500:
                log.warning("%s %s failed: %s", request.method, request.url.path, api.message,
                            exc_info=api.status == 500)
            return _error_response(api)

    async def generation(request: Request, parse: Callable[[Any], GenerationRequest]) -> Response:
        async def work() -> Response:
            gateway.stats["requests"] += 1
            try:
                raw = await read_body(request, config)
                req = await gateway.offload(lambda: parse(parse_json_body(raw)))
                return await table.get(req.model).answer(request, req)
            except ClientGone:
                raise
            except Exception:
                gateway.stats["failed"] += 1
                raise

        return await guarded(request, work)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generation(request, parse_chat_request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generation(request, parse_completion_request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse(await table.catalog(gateway.created))

        return await guarded(request, work)

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> Response:
        async def work() -> Response:
            table.get(name)
            listing = await table.catalog(gateway.created)
            return JSONResponse(next(card for card in listing["data"] if card["id"] == name))

        return await guarded(request, work)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of this gateway's generations (when the generator keeps them); needs the key."""
        async def work() -> Response:
            session_metrics = getattr(generator, "metrics", None)
            if session_metrics is None:
                return Response(status_code=404)
            sync = getattr(generator, "sync_metrics", None)
            if sync is not None:
                sync()
            body, content_type = render(session_metrics.registry)
            return Response(content=body, media_type=content_type)

        return await guarded(request, work)

    @app.get("/health")
    async def health() -> Response:
        try:
            swarm = await asyncio.wait_for(generator.health(), timeout=15.0)
        except Exception as err:
            swarm = {"ok": False, "reason": f"{type(err).__name__}: {err}"}
        body = {"status": "ok" if swarm.get("ok") else "unavailable", "model": model_name, "swarm": swarm,
                "gateway": dict(gateway.stats)}
        return JSONResponse(body, status_code=200 if swarm.get("ok") else 503)

    return app
