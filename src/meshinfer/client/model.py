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
With ``config.prompt_cache_sessions`` N > 0 (not with a private split nor sealed) a generation that ends normally
keeps its session idle in ``prompt_cache`` (at most N, LRU, ``prompt_cache_ttl``), and a later prompt sharing a long
enough prefix with it (a chat's next turn) continues it (``client.held_sessions``; the generation on a session:
``client.session_run``). Several models of one swarm share one loop and one peer: ``first.sibling(path)`` loads
another model on ``first``'s loop and ``SwarmView`` (its ``close`` closes only its own parts; the owner's closes its
siblings first, then the peer and loop). Joining and loading: ``client.loading``; the sync bridge: ``client.bridge``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import AsyncGenerator, Collection, Generator, Sequence
from pathlib import Path
from typing import Any

import torch

from meshinfer.client.audit import AuditCounters
from meshinfer.client.bridge import iterate_on
from meshinfer.client.config import DEFAULT_CLIENT_CONFIG, ClientConfig
from meshinfer.client.head_batch import HeadBatcher
from meshinfer.client.held_sessions import HeldSessions, agenerate_reusing
from meshinfer.client.loading import check_device, join_swarm, load_client_part
from meshinfer.client.prefix_cache import PrefixCache
from meshinfer.client.private_split import ClientSession, PrivateBlocks, PrivateSplitSession
from meshinfer.client.receipts import ReceiptSender
from meshinfer.client.routing import RouteHop
from meshinfer.client.sealed import agenerate_sealed
from meshinfer.client.session import InferenceSession
from meshinfer.client.session_run import agenerate_on, aopen_route_session
from meshinfer.client.swarm import ModelRef, SwarmView
from meshinfer.client.sync_session import SyncInferenceSession
from meshinfer.client.upkeep import Upkeep
from meshinfer.config import SamplingConfig
from meshinfer.errors import ConfigError, UsageError
from meshinfer.loopthread import LoopThread
from meshinfer.models.engine import check_prompt, score_hidden
from meshinfer.models.generator import CheckpointGenerator, GenerationParams
from meshinfer.models.head import ClientHead
from meshinfer.models.kv_cache import torch_dtype
from meshinfer.models.sampling import ScoredToken
from meshinfer.models.spec import ModelSpec
from meshinfer.models.speculate import SpecStats
from meshinfer.types import canonical_dtype

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
        self._held = HeldSessions(self.prompt_cache)
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
        if device is not None:
            overrides["device"] = str(device)
        config = dataclasses.replace(config or DEFAULT_CLIENT_CONFIG, **overrides)
        check_device(config, dtype)  # before anything is joined
        if share is not None:
            share._check_open()
            adopt = (share._runner, share._view)  # a sibling's are its owner's
            share = share._owner or share
        joined = adopt is None  # else the loop and peer come from the caller (adopted) or the owner (shared)
        runner, view = join_swarm(initial_peers, config) if adopt is None else adopt
        try:
            part = load_client_part(path, dtype, config, runner, view, model_name)
        except BaseException:
            if joined:
                with contextlib.suppress(Exception):
                    runner.run(view.close(), timeout=config.close_timeout)
                runner.stop()
            raise
        runner.loop.call_soon_threadsafe(view.start_refresh, part.ref, view.max_age)
        model = cls(part.spec, part.head, ref=part.ref, runner=runner, view=view, path=part.path, config=config,
                    wire_dtype=part.wire_dtype, private=part.private)
        if share is not None:
            model._owner = share
            with share._lock:
                share._siblings.append(model)
        runner.loop.call_soon_threadsafe(model.upkeep.start)
        return model

    join_swarm = staticmethod(join_swarm)
    """``client.loading.join_swarm``: a loop and a joined peer, for ``from_pretrained(..., adopt=)``."""

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
        return await aopen_route_session(self, self._view, max_length, exclude)  # client.session_run

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
        yield from iterate_on(self._runner, lambda: self.agenerate(ids, params))  # client.bridge

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
        async for item in agenerate_reusing(self._held, ids, params, context=self.spec.max_position_embeddings,
                                            headroom=self.config.prompt_cache_headroom, open_session=self.aopen_session,
                                            run=self._agenerate_on):
            yield item

    def _agenerate_on(self, session: ClientSession, ids: list[int], params: GenerationParams,
                      keep: int) -> AsyncGenerator[ScoredToken]:
        """The generation on ``session`` (``client.session_run``), held afterwards when the prompt cache is on."""
        hold = self._held.hold if self.prompt_cache.enabled else None
        return agenerate_on(self, session, ids, params, keep, heads=self._heads, embed=self._embed, hold=hold)

    async def adrop_prompt_cache(self) -> None:
        """Close every held session (on the client's loop)."""
        await self._held.drop()

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

    @property
    def closed(self) -> bool:
        return self._closed

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
