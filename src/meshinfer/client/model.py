"""``DistributedModel``: generate with a model whose transformer blocks run on servers of a swarm.

Contract: loads ONLY the client's share of a checkpoint directory (embeddings, final norm and LM head, as a
``ClientHead``) plus its tokenizer; the model id is ``checkpoint_fingerprint(dir)``, which servers of the same
bytes announce. A client-mode peer (``SwarmView``) joins through ``initial_peers`` on a private ``LoopThread``
and keeps the model's coverage fresh in the background. Each ``stream`` / ``generate`` call plans a route,
opens an ``InferenceSession`` sized for prompt + new tokens, and runs the very same generation loop as
``LocalModel`` (``meshinfer.models.engine.generate_scored``: same prompt checks, ``ContextOverflowError``, eos
handling, sampling), with the blocks' forward pass done by the swarm; the session is closed when the
generation ends or is abandoned. Greedy tokens therefore equal ``LocalModel``'s on the same directory. The
generation loop itself runs on the client's event loop (``astream``, an async generator: embeddings, network
steps, LM head and sampling with no thread switch per token; ``astream_scored`` adds each token's
log-probability and top alternatives; ``ascore_prompt`` scores a prompt's own tokens); ``stream`` hands its
tokens to the calling thread through a queue, off the critical path. The public methods build one
``GenerationParams`` for ``agenerate`` (one generation on the loop; the gateway calls it) or ``generation``
(its sync bridge: ``models.generator.TextGenerator``). Any number of threads may generate at
once, and any number of ``astream`` generations may run concurrently on the loop (one session each, no thread
per session); their LM-head calls are batched (``client.head_batch.HeadBatcher``: the sessions move through
the route in ``cohorts`` groups, each one batch on every server, kept together by burst tags). The head computes
on ``config.device`` (``auto``: the first CUDA GPU, else MPS, else the CPU; ``models.device.resolve_device``):
per step the embeddings come to the CPU in ONE copy for the wire (in the wire dtype: float32 unless an explicit
half ``dtype`` was asked for, see ``from_pretrained``), the route's last hidden states go back to the device in
ONE copy per head batch, and greedy sampling takes its argmax there (only ids come back). ``close()`` (or
the context manager) leaves the swarm. With ``config.audit`` (the default) every session's hops are audited by
shadow sessions (``client.audit``) and the generation runs ``client.audited.agenerate_audited``: tokens are
released once verified (in bursts of up to ``audit_every``), a caught liar is banned and failed over and the
generation rolled back, so the output is an honest swarm's; ``audits`` counts the outcomes per server peer
(``ascore_prompt``'s single pass is not audited). With ``config.speculate`` (the default) a generation of 8+ tokens
runs ``client.speculative.agenerate_speculative`` instead (prompt-lookup drafts verified in one multi-token step,
audited the same way; ``speculation`` counts trips and accepted drafts). ``upkeep`` (``client.upkeep``, started with
the model, stopped by ``close``) checks the model's reports and publishes the audit tally periodically. A private
split (``config.private_blocks`` K > 0, ``client.private_split``): the client also loads blocks [0, K) and
[n - K, n), routes cover only [K, n - K) and each session is a ``PrivateSplitSession`` around the route's. Errors are
``MeshinferError``s: no route ("no online servers cover blocks ... of model ..."), unreachable bootstrap peers,
``RemoteError`` with the server's code. With ``config.sealed`` each generation goes instead, end-to-end encrypted, to
one full node (``client.sealed.agenerate_sealed``: no route, no audit, no top logprobs; prompt scoring refused).
With ``config.prompt_cache_sessions`` N > 0 (not with a private split nor sealed), a generation that ends normally
keeps its session open, idle, in ``prompt_cache`` (``client.prefix_cache``: at most N, least recently used closed
first, each closed after ``prompt_cache_ttl`` s idle, all closed by ``close``), and sessions are opened with
``prompt_cache_headroom`` more tokens (servers reserve ``max_length`` at open); a later prompt sharing a long
enough prefix with a held session's tokens (a chat's next turn) continues it: rewound to the common prefix, only
the rest of the prompt is sent. A held session that fails before its first token is replaced by a fresh one
(avoiding its peers) without any error reaching the caller; speculation, audits and failover work as on a fresh one.
Several models of one swarm share one loop and one peer: ``first.sibling(path)`` (``from_pretrained(...,
share=first)``) loads another model's head on ``first``'s loop and ``SwarmView``; a sibling's ``close`` closes only
its own parts (held sessions, upkeep, receipts, its coverage refresher), the owner's closes its siblings first, then
the peer and the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Collection, Generator, Sequence
from pathlib import Path
from typing import Any

import torch

from meshinfer.client.audit import AuditCounters, Auditor
from meshinfer.client.audited import agenerate_audited
from meshinfer.client.config import DEFAULT_CLIENT_CONFIG, ClientConfig
from meshinfer.client.head_batch import HeadBatcher
from meshinfer.client.prefix_cache import PrefixCache
from meshinfer.client.private_split import ClientSession, PrivateBlocks, PrivateSplitSession, ensure_private_blocks
from meshinfer.client.receipts import ReceiptSender
from meshinfer.client.routing import NoRouteError, RouteHop
from meshinfer.client.sealed import agenerate_sealed
from meshinfer.client.session import InferenceSession
from meshinfer.client.speculative import agenerate_speculative, worth_speculating
from meshinfer.client.swarm import ModelRef, SwarmView, check_initial_peers
from meshinfer.client.sync_session import SyncInferenceSession
from meshinfer.client.upkeep import Upkeep
from meshinfer.config import SamplingConfig
from meshinfer.errors import ConfigError, RemoteError, TransportError, UsageError
from meshinfer.loopthread import LoopThread
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.engine import agenerate_scored, check_prompt, score_hidden
from meshinfer.models.fingerprint import checkpoint_fingerprint
from meshinfer.models.generator import CheckpointGenerator, GenerationParams
from meshinfer.models.head import ClientHead
from meshinfer.models.kv_cache import torch_dtype
from meshinfer.models.ops import autotune_linear, layer_weights
from meshinfer.models.sampling import ScoredToken
from meshinfer.models.spec import ModelSpec
from meshinfer.models.speculate import SpecStats
from meshinfer.types import BlockRange, canonical_dtype
from meshinfer.weights.fetch import ensure_local
from meshinfer.weights.resolve import display_name

log = logging.getLogger(__name__)


class DistributedModel(CheckpointGenerator):
    """The head of a model on this machine, its blocks in the swarm."""

    def __init__(self, spec: ModelSpec, head: ClientHead, *, ref: ModelRef, runner: LoopThread, view: SwarmView,
                 path: Path | None = None, config: ClientConfig = DEFAULT_CLIENT_CONFIG,
                 wire_dtype: str = "float32", private: PrivateBlocks | None = None) -> None:
        self.spec = spec
        self.head = head
        self.private = private
        """This client's own first and last blocks (``config.private_blocks``; None: a plain split)."""
        self.device = head.norm.device
        """Where the head computes (``config.device`` resolved on this machine)."""
        self.wire_dtype = canonical_dtype(wire_dtype)
        """The dtype of the hidden states this client's sessions send and receive (``Open.dtype``): see
        ``from_pretrained``."""
        self.ref = ref
        """The swarm's reference to this model (id, name, block count, quant mode of its routes)."""
        self.path = path
        self.config = config
        """The client's tunables (route wait, timeouts, push, failover, cohorts...)."""
        self.failovers_total = 0
        """Failovers (replaced servers) of every finished session of this model, for metrics."""
        self.decode_steps_total = 0
        self.decode_route_s_total = 0.0
        """One-token steps of every finished session, and their seconds in the route (from sending the step to
        the last server's output; ``InferenceSession.decode_route_s``): what the servers and the network cost."""
        self.audits = AuditCounters()
        """What audits found, per server peer (passed/failed windows, unaudited hops) and in all (detections)."""
        self.speculation = SpecStats()
        """Speculative decoding over every generation of this model: trips, drafts sent and accepted, tokens
        (``client.speculative``; ``speculation.tokens_per_trip``)."""
        self.last_session: InferenceSession | None = None
        """The most recent session (its ``route`` and ``failovers`` say what happened; of a private split, the
        session over the middle blocks that its ``PrivateSplitSession`` wraps)."""
        self.upkeep = Upkeep(view, ref, self.audits, report_check_s=config.report_check_s,
                             publish_audits=config.publish_audits)
        """Report checks and audit tallies in the background (``client.upkeep``)."""
        self.receipts = ReceiptSender(view.node, ref.model_id) if config.receipts else None
        """Signs this client's usage receipts for the servers' work and hands them over (``client.receipts``)."""
        self._runner = runner
        self._view = view
        self._heads = HeadBatcher(head, cohorts=config.cohorts)
        self._lock = threading.Lock()
        self._closed = False
        self.last_route: list[RouteHop] = []
        """The route the most recent session used (for display)."""
        reusable = config.prompt_cache_sessions if private is None and not config.sealed else 0
        self.prompt_cache: PrefixCache[ClientSession] = PrefixCache(reusable, config.prompt_cache_ttl)
        """Finished sessions held for a later prompt sharing their prefix (``client.prefix_cache``; its ``stats``:
        hits, misses, tokens reused...); off with a private split (``config.private_blocks``) or ``sealed``."""
        self._sweeper: asyncio.Task[None] | None = None
        self._owner: DistributedModel | None = None  # a sibling's: the model whose loop and peer it shares
        self._siblings: list[DistributedModel] = []  # the owner's: closed before the shared peer and loop

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        initial_peers: Sequence[str],
        dtype: str | torch.dtype = "float32",
        *,
        config: ClientConfig | None = None,
        model_name: str | None = None,
        device: str | torch.device | None = None,
        share: DistributedModel | None = None,
        adopt: tuple[LoopThread, SwarmView] | None = None,
        **overrides: Any,
    ) -> DistributedModel:
        """Join the swarm through ``initial_peers`` (empty: the peers found on this LAN by mDNS) and load the head of
        ``path``: a checkpoint directory, a GGUF file, a catalogue name (``smollm2``), a model id (the swarm's seeders
        send config, tokenizer and the client part, verified piece by piece, into the local cache, at most
        ``max_download`` bytes/s; see ``meshinfer.weights``), or a hub name ``org/name``. ``config`` holds the client's
        tunables (default ``ClientConfig()``); keyword ``overrides`` replace its fields (``route_wait=0.5``,
        ``push=False``, ...; an unknown name is a TypeError). ``quant`` (none, int8, int4) picks the servers whose
        weights every route uses; None: the most precise mode that covers the model, fixed per session. ``head_quant``
        (none, int8, int4) is how this machine holds the embeddings and LM head (none: as loaded; the head is the
        client's own business, routes do not depend on it). ``model_name``: the name shown (default: from ``path``).

        ``device`` (text or a ``torch.device``; None: ``config.device``, default ``auto``) is where the head
        computes; a device this machine lacks is a ConfigError before anything is joined. ``dtype`` is the head's
        compute dtype (``auto``: the device's default, bf16 on CUDA). The hidden states on the wire stay in
        ``dtype`` with ``auto`` read as float32 (what servers got from a default client so far): a bf16 head on a
        GPU does not round the swarm's inter-hop activations, which servers convert to their own compute dtype
        anyway; an explicit fp16/bf16 ``dtype`` puts that dtype on the wire, as before.

        ``share``: an open ``DistributedModel`` whose loop and swarm peer this one uses (``initial_peers`` and the
        join settings are then ignored): a sibling, see ``sibling``. ``adopt``: a loop and peer from ``join_swarm``
        that this model takes over (closes) once loaded; if loading fails they stay the caller's."""
        from meshinfer.models.device import check_device_dtype, resolve_device, resolve_dtype
        from meshinfer.models.quant import QuantConfig

        if device is not None:
            overrides["device"] = str(device)
        config = dataclasses.replace(config or DEFAULT_CLIENT_CONFIG, **overrides)
        where = resolve_device(config.device)
        compute = resolve_dtype(dtype, where)
        check_device_dtype(where, compute)
        dt = torch_dtype(compute)
        wire = resolve_dtype(dtype, torch.device("cpu"))
        if share is not None:
            share._check_open()
            adopt = (share._runner, share._view)  # a sibling's are its owner's
            share = share._owner or share
        joined = adopt is None  # else the loop and peer come from the caller (adopted) or the owner (shared)
        runner, view = cls.join_swarm(initial_peers, config) if adopt is None else adopt
        try:
            local = runner.run(ensure_local(view.node, str(path), blocks=None, client_part=True,
                                            max_download=config.max_download), timeout=config.fetch_timeout)
            if config.private_blocks:  # blocks [0, K) and [n - K, n) too (client.private_split)
                local = runner.run(ensure_private_blocks(view.node, str(path), local, config.private_blocks,
                                                         config.max_download), timeout=config.fetch_timeout)
            ckpt = Checkpoint(local)
            head = ckpt.load_head(dt, where, quant=QuantConfig(config.head_quant))
            private = PrivateBlocks.load(ckpt, config.private_blocks, dt, where) if config.private_blocks else None
            autotune_linear(layer_weights(head))  # CPU fp32 heads only: oneDNN or MKL, timed once
            ref = ModelRef(checkpoint_fingerprint(local), ckpt.spec.num_blocks,
                             model_name or display_name(str(path), local), quant=config.quant)
        except BaseException:
            if joined:
                with contextlib.suppress(Exception):
                    runner.run(view.close(), timeout=config.close_timeout)
                runner.stop()
            raise
        runner.loop.call_soon_threadsafe(view.start_refresh, ref, view.max_age)
        model = cls(ckpt.spec, head, ref=ref, runner=runner, view=view, path=local, config=config, wire_dtype=wire,
                    private=private)
        if share is not None:
            model._owner = share
            with share._lock:
                share._siblings.append(model)
        runner.loop.call_soon_threadsafe(model.upkeep.start)
        return model

    @staticmethod
    def join_swarm(initial_peers: Sequence[str], config: ClientConfig) -> tuple[LoopThread, SwarmView]:
        """A started client loop and a client-mode peer on it joined through ``initial_peers`` (empty: the peers
        found on this LAN by mDNS), as ``from_pretrained`` joins; for ``adopt``."""
        peers = check_initial_peers(initial_peers) if initial_peers else ()
        runner = LoopThread("meshinfer-client").start()
        try:
            view = runner.run(SwarmView.join(peers, host=config.host, identity=config.identity,
                                             dht_timeout=config.dht_timeout, prior_cap=config.prior_cap,
                                             spread=config.spread, refuted_ban=config.refuted_ban,
                                             swarm_key=config.swarm_key, swarm_allow=config.swarm_allow),
                              timeout=config.join_timeout)
        except BaseException:
            runner.stop()
            raise
        return runner, view

    def sibling(self, path: str | Path, dtype: str | torch.dtype = "float32", *, config: ClientConfig | None = None,
                model_name: str | None = None, **overrides: Any) -> DistributedModel:
        """Another model of the same swarm on this client's loop and peer (``from_pretrained(..., share=self)``;
        ``config`` defaults to this one's): its own head, tokenizer, upkeep and prompt cache. Its ``close`` closes
        only those (and stops its coverage refresher); this model's ``close`` closes its siblings first, then the
        shared peer and loop."""
        return DistributedModel.from_pretrained(path, (), dtype, config=config or self.config, model_name=model_name,
                                                share=self, **overrides)

    # ---- properties ----------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.head.dtype

    @property
    def model_id(self) -> str:
        return self.ref.model_id

    @property
    def view(self) -> SwarmView:
        return self._view

    @property
    def push(self) -> bool:
        return self.config.push

    @property
    def step_timeout(self) -> float:
        return self.config.step_timeout

    @property
    def route_wait(self) -> float:
        return self.config.route_wait

    @property
    def failover(self) -> bool:
        """Replace failed servers mid-generation (replaying their history) instead of failing."""
        return self.config.failover

    # ---- swarm ---------------------------------------------------------------------------------

    def plan(self, exclude: Collection[str] = ()) -> list[RouteHop]:
        """The route a session would take now (NoRouteError when the swarm does not cover the model)."""
        self._check_open()
        middle = self.private.middle if self.private is not None else None
        return self._runner.run(self._view.plan(self.ref, blocks=middle, exclude=exclude, wait=self.route_wait))

    def open_session(self, max_length: int) -> SyncInferenceSession:
        """Plan a route and open a session holding up to ``max_length`` tokens on every hop; returns once every
        hop answered ``Open`` (generations pipeline it with their first step instead)."""
        self._check_open()

        async def opened() -> ClientSession:
            session = await self.aopen_session(max_length)
            remote = session.remote if isinstance(session, PrivateSplitSession) else session
            try:
                await remote.wait_opened()
            except BaseException:
                await session.close()
                raise
            return session

        return SyncInferenceSession(self._runner, self._runner.run(opened()))

    async def aopen_session(self, max_length: int, exclude: Collection[str] = ()) -> ClientSession:
        """``open_session`` as a coroutine on the client's loop (``loop``); with ``private`` blocks, the route
        covers only the middle ones and the session is a ``PrivateSplitSession`` around it. ``exclude``: peers
        the route avoids."""
        middle = self.private.middle if self.private is not None else None
        route = await self._view.plan(self.ref, blocks=middle, exclude=exclude, wait=self.route_wait)
        self.last_route = route
        quant = route[0].record.quant  # every hop's (plan_uniform_route); replacements keep it: same outputs

        async def replan(blocks: BlockRange, exclude: frozenset[str]) -> list[RouteHop]:
            return await self._view.plan(self.ref, blocks=blocks, exclude=exclude, wait=self.route_wait,
                                         quant=quant)

        session = await InferenceSession.open(
            self._view.node, route, model_id=self.ref.model_id, max_length=max_length,
            dtype=self.wire_dtype, on_rtt=self._view.record_rtt,
            replan=replan if self.config.failover else None, bans=self._view.bans, quant=quant, config=self.config,
            stats=self._view.stats,
        )
        if self.config.audit:
            async def find(blocks: BlockRange, exclude: frozenset[str]) -> list[RouteHop]:
                return await self._view.plan(self.ref, blocks=blocks, exclude=exclude, wait=0.0, quant=quant)

            session.auditor = Auditor(session, find, self.audits,
                                      report=self._view.report if self.config.audit_report else None)
        session.receipts = self.receipts
        self.last_session = session
        return session if self.private is None else PrivateSplitSession(session, self.private)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop ``astream`` and ``aopen_session`` must run on."""
        return self._runner.loop

    # ---- generation ----------------------------------------------------------------------------

    def generation(self, input_ids: Sequence[int], params: GenerationParams) -> Generator[ScoredToken]:
        """One generation (``models.generator.TextGenerator.generation``; ``stream`` and ``generate`` are built on
        it). It runs on the client's loop (``agenerate``); tokens reach this thread through a queue.
        Abandoning the iterator cancels the generation and closes its session.
        """
        ids = check_prompt(self.spec, input_ids, params.max_new_tokens)
        self._check_open()
        if params.max_new_tokens == 0:
            return
        tokens: queue.SimpleQueue[ScoredToken | BaseException | None] = queue.SimpleQueue()

        async def produce() -> None:
            try:
                async with contextlib.aclosing(self.agenerate(ids, params)) as generation:
                    async for token in generation:
                        tokens.put(token)
                tokens.put(None)
            except BaseException as err:  # handed to the consuming thread
                tokens.put(err)
                if isinstance(err, asyncio.CancelledError):
                    raise

        future = self._runner.submit(produce())
        try:
            while True:
                item = tokens.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not future.done():
                self._runner.loop.call_soon_threadsafe(future.cancel)
            with contextlib.suppress(BaseException):
                future.result(timeout=10.0)  # the session is closed before we return

    async def astream(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
        stop_token_ids: Collection[int] | None = None,
    ) -> AsyncGenerator[int]:
        """``stream`` as an async generator; iterate it on the client's loop (``loop``)."""
        params = GenerationParams.of(max_new_tokens, sampling, stop_token_ids)
        async with contextlib.aclosing(self.agenerate(input_ids, params)) as tokens:
            async for item in tokens:
                yield item.token

    def astream_scored(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
        stop_token_ids: Collection[int] | None = None,
        top_logprobs: int | None = None,
    ) -> AsyncGenerator[ScoredToken]:
        """``astream`` with each token's log-probability and its ``top_logprobs`` (0..20) most likely
        alternatives, as ``LocalModel.stream_scored`` gives them (None: no scores computed)."""
        return self.agenerate(input_ids, GenerationParams.of(max_new_tokens, sampling, stop_token_ids,
                                                             top_logprobs))

    async def agenerate(self, input_ids: Sequence[int], params: GenerationParams) -> AsyncGenerator[ScoredToken]:
        """One generation on the client's loop (``loop``): a session sized for prompt + ``max_new_tokens``,
        ``engine.agenerate_scored`` over it, the session closed however the generation ends; with the prompt cache
        on (``prompt_cache``), a held session sharing the prompt's prefix is continued instead, and a session that
        ends normally is held for the next one (see ``_agenerate_on``)."""
        ids = check_prompt(self.spec, input_ids, params.max_new_tokens)
        self._check_open()
        if params.max_new_tokens == 0:
            return
        if self.config.sealed:  # the whole generation sealed to one full node (client.sealed)
            if params.constraint is not None:  # the full node samples: a client-side grammar cannot apply
                raise ConfigError("structured output and tool calls are not available with --sealed (the full "
                                  "node samples the tokens): drop response_format/tools or run without --sealed")
            async for item in agenerate_sealed(self._view, self.ref, ids, params, self.config):
                yield item
            return
        length = len(ids) + params.max_new_tokens
        cache = self.prompt_cache
        reuse = cache.take(ids, length, time.monotonic()) if cache.enabled else None
        avoid: frozenset[str] = frozenset()
        if reuse is not None:
            yielded = False
            try:
                async with contextlib.aclosing(self._agenerate_on(reuse.session, ids, params, reuse.keep)) as gen:
                    async for item in gen:
                        yielded = True
                        yield item
                return
            except Exception as err:  # a held session whose servers went away: a fresh one, unseen by the caller
                if yielded:
                    raise
                cache.stats.fallbacks += 1
                log.info("a held session failed before its first token (%s); opening a fresh one", err)
                avoid = frozenset(hop.peer_id for hop in reuse.session.route)  # one of them is gone
        headroom = self.config.prompt_cache_headroom if cache.enabled else 0
        size = min(length + headroom, max(length, self.spec.max_position_embeddings))
        for attempt in (0, 1):
            try:
                session = await self.aopen_session(size, exclude=avoid)
            except NoRouteError:
                if not avoid:
                    raise
                session = await self.aopen_session(size)
            yielded = False
            try:
                async with contextlib.aclosing(self._agenerate_on(session, ids, params, 0)) as gen:
                    async for item in gen:
                        yielded = True
                        yield item
                return
            except (RemoteError, NoRouteError, TransportError) as err:  # servers full? held sessions may fill them
                if yielded or attempt or not len(cache):
                    raise
                log.info("servers refused a session (%s) while %d are held; closing those, retrying", err, len(cache))
                await self.adrop_prompt_cache()

    async def _agenerate_on(self, session: ClientSession, ids: list[int], params: GenerationParams,
                            keep: int) -> AsyncGenerator[ScoredToken]:
        """The generation of ``ids`` on ``session``, whose servers already hold the first ``keep`` positions of
        ``ids`` (a held session, rewound here; 0: a fresh one): the generation loop's prompt step sends only
        ``ids[keep:]``. Ending normally, the session is held (``prompt_cache``) with the ids its servers hold;
        otherwise (an error, or abandoned: a client that went away should free the servers' memory) closed."""
        remote = session.remote if isinstance(session, PrivateSplitSession) else session
        history: list[int] = list(ids[:keep])  # the ids the servers hold KV for, positions [0, len)
        skip = keep
        failovers, steps, route_s = len(remote.failovers), remote.decode_steps, remote.decode_route_s
        self._heads.active += 1
        normal = False
        try:
            if keep:
                self.last_session = remote
                self.last_route = remote.route
                await session.rewind(keep)

            async def forward_rows(chunk: list[int], position: int, rows: int) -> torch.Tensor:  # [T] -> [rows, V]
                nonlocal skip
                if skip and position == 0 and len(chunk) > skip:  # the prompt: its first positions are held
                    chunk, position = chunk[skip:], skip
                skip = 0
                if position != session.position:
                    raise ConfigError(f"generation at position {position}, the session is at {session.position}")
                del history[position:]
                history.extend(chunk)
                out = await session.forward(self._embed(chunk))  # [T, H] on the CPU
                logits, session.burst = await self._heads.logits_rows(out[-rows:], session.last_burst,
                                                                      session.route[0].peer_id)
                return logits  # [rows, V] float32

            async def forward(chunk: list[int], position: int) -> torch.Tensor:  # ids [T] -> logits [V]
                return (await forward_rows(chunk, position, 1))[0]

            # rollbacks (audits, rejected drafts) rewind the remote session: a private split's wrapper follows it
            if worth_speculating(params, self.config.speculate):
                generation = agenerate_speculative(remote, forward_rows, ids, params, self.spec.eos_token_ids,
                                                   draft=self.config.draft_tokens, stats=self.speculation)
            elif remote.auditor is not None:
                generation = agenerate_audited(remote, forward, ids, params, self.spec.eos_token_ids)
            else:
                generation = agenerate_scored(forward, ids, params, self.spec.eos_token_ids)
            async for item in generation:
                yield item
            normal = True
        finally:
            self._heads.active -= 1
            self.failovers_total += len(remote.failovers) - failovers
            self.decode_steps_total += remote.decode_steps - steps
            self.decode_route_s_total += remote.decode_route_s - route_s
            if normal and self.prompt_cache.enabled and not self._closed:
                await asyncio.shield(self._hold(session, history[:session.position]))
            else:
                await asyncio.shield(session.close())

    async def _hold(self, session: ClientSession, history: list[int]) -> None:
        """Keep ``session`` idle in the prompt cache; close what that pushes out."""
        for old in self.prompt_cache.put(session, history, session.max_length, time.monotonic()):
            await old.close()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="prompt-cache-sweeper")

    async def _sweep(self) -> None:
        """Close held sessions as they pass the TTL, while any is held."""
        while (due := self.prompt_cache.next_expiry()) is not None:
            await asyncio.sleep(max(0.05, due - time.monotonic() + 0.01))
            for old in self.prompt_cache.expire(time.monotonic()):
                await old.close()

    async def adrop_prompt_cache(self) -> None:
        """Close every held session (on the client's loop)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for old in self.prompt_cache.drain():
            await old.close()

    def _embed(self, ids: list[int]) -> torch.Tensor:  # [T] -> [T, H] on the CPU in the wire dtype (see below)
        """The embeddings of ``ids``, computed on the head's device and brought to the CPU in ONE copy (cast to
        the wire dtype on the way) for the session to send (a private split's first blocks take them where they are)."""
        with torch.inference_mode():
            hidden = self.head.embed(torch.tensor([ids]))[0]  # [T, H] on self.device
            if self.private is not None:
                return hidden
            return hidden.to(device="cpu", dtype=torch_dtype(self.wire_dtype))

    async def ascore_prompt(self, input_ids: Sequence[int], top_logprobs: int = 0) -> list[ScoredToken]:
        """Each token of ``input_ids`` after the first, scored under the model's distribution at the position
        before it, as ``LocalModel.score_prompt`` does: one pass through the swarm, the LM head here."""
        ids = check_prompt(self.spec, input_ids, 0)
        self._check_open()
        if self.config.sealed:  # it would send the prompt's embeddings through a split route
            raise ConfigError("scoring a prompt (echo, prompt logprobs) is not available with --sealed")
        session = await self.aopen_session(len(ids))
        try:
            out = await session.forward(self._embed(ids))  # [T, H] on the CPU
            return await asyncio.to_thread(score_hidden, self.head, out, ids, top_logprobs)
        finally:
            self.failovers_total += len(session.failovers)
            await asyncio.shield(session.close())

    # ---- lifecycle -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this DistributedModel is closed")

    def close(self) -> None:
        """Leave the swarm and stop the client's event loop (idempotent); a sibling (``sibling``) closes only its
        own parts, the owner its siblings first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            siblings, self._siblings = self._siblings, []
        for sibling in siblings:
            sibling.close()
        with contextlib.suppress(Exception):
            self._runner.run(self.adrop_prompt_cache(), timeout=self.config.close_timeout)
        with contextlib.suppress(Exception):
            self._runner.run(self.upkeep.aclose(), timeout=self.config.close_timeout)
        if self.receipts is not None:
            with contextlib.suppress(Exception):
                self._runner.run(self.receipts.close(), timeout=self.config.close_timeout)
        if self._owner is not None:  # the peer and loop are the owner's
            owner = self._owner
            with owner._lock, contextlib.suppress(ValueError):
                owner._siblings.remove(self)
            if self.ref.model_id not in {m.ref.model_id for m in (owner, *owner._siblings)}:
                with contextlib.suppress(Exception):
                    self._runner.run(self._view.stop_refresh(self.ref.model_id), timeout=self.config.close_timeout)
            return
        with contextlib.suppress(Exception):
            self._runner.run(self._view.close(), timeout=self.config.close_timeout)
        self._runner.stop()

    def __enter__(self) -> DistributedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
