"""An inference session over a planned route: one server session per hop, steps pushed along the chain,
failed hops replaced mid-generation with their history replayed.

Contract (docs/architecture.md section 10): ``InferenceSession.open`` opens one ``meshinfer/session/1`` stream per
hop (an idle one the node kept from an earlier session to that server when it can: no dial) and sends
``Open(session_id_i, model, span_i, max_length, dtype, route_tail=[hops after i])``, all hops concurrently, WITHOUT
waiting for ``Opened``: the first step follows at once, and each hop's ``Opened`` (its round trip is reported as
that peer's RTT) or refusal comes through the readers during it. A refused ``Open`` fails that hop like a failed
step (failover, or the error raised from the first step without ``replan``; an error no other server could get past
is raised as ``RemoteError``). ``close`` hands each hop's stream back to the node for the next session (not after a
failure). ``step(hidden[T, H])`` sends ``Step(position, hidden)`` to the FIRST hop only; every hop returns its
``StepResult`` to the client while pushing its output to the next hop. The client keeps each hop's input (the
previous hop's output) as that span's history (``span_inputs``) and returns the last hop's output.
``Error(next_hop_failed)`` from hop i makes the client drive hop i+1 itself with hop i's output (so does
``push=False`` for every hop).

Failover (given a ``replan`` function): a hop FAILS when its stream breaks (server killed, network),
when it answers with an error that says it cannot go on (``FAILOVER_CODES``: shutting down, unknown
session, internal error...), when opening it fails, or when it stalls: no progress for
``stall_timeout`` (adaptive: many times the usual time per token, at least ``min_stall_s``; a hung
server is found in seconds, not at the step deadline). The failed peer backs off (``PeerBans``, exponential
backoff from 1 s, shared by the client's sessions; a peer whose Open proves its record false, see
``client.recovery.refutation``, is banned instead, for long); ``replan`` gives a chain of other servers for
the lost blocks (possibly several); sessions are opened there and the span's history is replayed
through them in chunks (rebuilding their KV caches; the outputs of the last one are dropped: the next
hop already has them) by ``recovery`` (a ``client.recovery.Recovery`` given what it needs at
construction; it returns the fresh hops and the session splices them in); ``Retarget`` points the
previous hop's pushes at the replacement and the replacement's at the next hop; then the interrupted
step is sent again from the first hop without its output (with a new step id; hops after it
recompute the same position identically). The output
is the same as if nothing had failed. ``failovers`` records each one (peer, reason, seconds, tokens
replayed). Errors that a replacement would repeat (bad request, limits) are raised as
``RemoteError``; after ``max_failovers`` in one step, or with no ``replan``, a failure is final and the
session unusable. ``close`` sends ``Close`` on every hop and ends all streams (idempotent, never raises);
a step on a closed session raises ``UsageError``. Each hop's stream (open, reader, steps, close) is its
``HopSession``'s (``client.hops``).

Measurements: given ``stats`` (``client.measured.PeerStats``, the swarm view's), every one-token step that
went through the whole route without a failover reports each hop's share of it (from the previous hop's
answer reaching the client to this hop's) as ``stats.record_step``; routes are planned on these figures.

Audits (``client.audit``): ``auditor`` (set by ``DistributedModel``) is told of every completed step; each hop
keeps the outputs it claimed (``HopSession.outputs``) beside its inputs. ``open_side`` opens an audit's side
session with this session's settings; ``rewind(position, liar)`` forgets every position from ``position`` on and
replaces ``liar`` (its inputs [0, position) replayed elsewhere); the next step must be at ``position``; each
hop's ``steps`` stay aligned with its inputs and outputs (``truncate_steps``). Before each step the auditor's
``before_step(tokens)`` may set ``want_commit`` (a check will be due after it: its window must be signed).

Async core, run on the ``PeerNode``'s loop; ``client.sync_session.SyncInferenceSession`` wraps it for
threads through a ``LoopThread``. Knows nothing of tokens, embeddings or sampling: hidden states in (from any
device: they are brought to the CPU in the session dtype, a no-op when they are there already), hidden states out
(on the CPU, in the session dtype).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from meshinfer.client.audit import truncate_parts, truncate_steps
from meshinfer.client.config import DEFAULT_CLIENT_CONFIG, ClientConfig
from meshinfer.client.hops import (
    FAILOVER_CODES,
    Failover,
    HopEvent,
    HopFailure,
    HopSession,
    RttCallback,
    link_prev,
    replaceable,
    route_tail,
)
from meshinfer.client.measured import PeerStats
from meshinfer.client.recovery import Recovery, Replanner, fix_tails, refutation
from meshinfer.client.routing import RouteHop
from meshinfer.errors import (
    ConfigError,
    ContextOverflowError,
    MeshinferError,
    RemoteError,
    TransportError,
    UsageError,
    WireError,
)
from meshinfer.p2p.node import PeerNode
from meshinfer.types import canonical_dtype
from meshinfer.weights.bans import PeerBans
from meshinfer.wire.messages import Burst, Error, ErrorCode, Hop, Opened, StepResult
from meshinfer.wire.tensor import ITEMSIZE

if TYPE_CHECKING:
    from meshinfer.client.audit import Auditor
    from meshinfer.client.receipts import ReceiptSender

log = logging.getLogger(__name__)



class InferenceSession:
    """Hidden states through a chain of servers, keeping each server's KV cache alive between steps."""

    def __init__(self, node: PeerNode, route: Sequence[RouteHop], *, model_id: str, max_length: int,
                 dtype: str = "float32", replan: Replanner | None = None, bans: PeerBans | None = None,
                 quant: str | None = None, config: ClientConfig = DEFAULT_CLIENT_CONFIG,
                 stats: PeerStats | None = None) -> None:
        if not route:
            raise ConfigError("a session needs a route of at least one hop")
        for a, b in itertools.pairwise(route):
            if a.span.end != b.span.start:
                raise ConfigError(f"route hops {a.span} and {b.span} are not consecutive")
        if max_length <= 0:
            raise ConfigError(f"max_length must be > 0, got {max_length}")
        self.node = node
        self.model_id = model_id
        self.max_length = max_length
        self.dtype = canonical_dtype(dtype)
        self.config = config
        """The client's tunables; the ones below are copied from it (``max_chunk_tokens`` may be changed)."""
        self.push = config.push
        self.step_timeout = config.step_timeout
        self.max_chunk_tokens = config.max_chunk_tokens
        self.replan = replan
        self.bans = bans if bans is not None else PeerBans()
        self.max_failovers = config.max_failovers
        self.min_stall_s = config.min_stall
        self.open_timeout = config.open_timeout
        self.quant = quant
        """The quant mode every hop must run (sent in ``Open``; replacements are planned with it too)."""
        self.hops = [HopSession(h, secrets.token_hex(12)) for h in route]
        if self.push:
            link_prev(self.hops)  # each server takes pushes only from the hop before it (Open.prev_peer)
        self.position = 0
        self.failovers: list[Failover] = []
        self._step_ids = itertools.count()
        self._events: asyncio.Queue[HopEvent] = asyncio.Queue()
        self._broken: MeshinferError | None = None
        self._closed = False
        self._answered: dict[int, torch.Tensor] = {}
        self._s_per_token: float | None = None  # smoothed seconds per token of a whole step
        self.decode_steps = 0
        self.decode_route_s = 0.0
        """One-token steps done, and their seconds from sending to the last hop's output (failovers included)."""
        self.burst: Burst | None = None
        """The burst tag (``wire.burst``) of this session's next one-token step to the first hop, set by the caller
        (the batched LM head hands it out); that step takes it (sent once: not on a retry) and clears it."""
        self.last_burst: Burst | None = None
        """The burst tag the last hop's result of the latest step came with (``wire.burst``)."""
        self.want_commit = False
        """Set by the caller (an audit): the next step asks every hop for a signed commit on its result
        (``Step.want_commit``; cleared once a step went through)."""
        self._on_rtt: RttCallback | None = None
        self.stats = stats
        """Where measured step times go (None: nowhere)."""
        self.recovery = None if replan is None else Recovery(
            replan, self.bans, open_hop=self._open_hop, step_ids=self._step_ids, chunk_tokens=self._per_step,
            limits=node.settings.stream.limits, dtype=self.dtype, max_failovers=config.max_failovers,
            step_timeout=config.step_timeout)
        """Failover (None: no ``replan``, a failed hop is final)."""
        self.auditor: Auditor | None = None
        """The audits of this session's hops (``client.audit``; None: not audited), set by its opener."""
        self.receipts: ReceiptSender | None = None
        """Signs this client's usage receipts for each hop's work (``client.receipts``; None: none), set by its
        opener."""
        self.replaced: list[HopSession] = []
        """Hops failover replaced (their work up to then is receipted when the session closes)."""

    @property
    def route(self) -> list[RouteHop]:
        return [h.hop for h in self.hops]

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    async def open(cls, node: PeerNode, route: Sequence[RouteHop], *, model_id: str, max_length: int,
                   dtype: str = "float32", on_rtt: RttCallback | None = None, replan: Replanner | None = None,
                   bans: PeerBans | None = None, quant: str | None = None,
                   config: ClientConfig = DEFAULT_CLIENT_CONFIG, stats: PeerStats | None = None) -> InferenceSession:
        """Open a session on every hop of ``route``. A hop that cannot be opened is replaced (with
        ``replan``); without ``replan`` it is all or nothing (a failure closes what was opened)."""
        session = cls(node, route, model_id=model_id, max_length=max_length, dtype=dtype, replan=replan, bans=bans,
                      quant=quant, config=config, stats=stats)
        session._on_rtt = on_rtt
        try:
            results = await asyncio.gather(*(session._open_hop(hs, session._route_tail(i), wait=False)
                                             for i, hs in enumerate(session.hops)), return_exceptions=True)
            failed = [(hs, r) for hs, r in zip(session.hops, results, strict=True) if isinstance(r, BaseException)]
            for _, err in failed:
                if not isinstance(err, Exception):
                    raise err  # cancelled
            if failed and (replan is None or any(not replaceable(err) for _, err in failed)):
                raise next(err for _, err in failed if replan is None or not replaceable(err))
            for hs, err in failed:
                await session._replace(hs, f"cannot open a session: {err}")
            await session._fix_tails()
        except BaseException:
            await session.close()
            raise
        for hs in session.hops:
            hs.start_reader(session._events)
        return session

    async def wait_opened(self) -> None:
        """Wait until every hop answered its pipelined ``Open`` (for callers that open a session to hold it, not to
        step at once): a refusal raises ``RemoteError``, a lost stream ``TransportError``, no answer within
        ``open_timeout`` too. Only before the first step (it reads the hops' events)."""
        deadline = time.monotonic() + self.open_timeout
        while waiting := [hs for hs in self.hops if not hs.confirmed]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(f"no answer to Open for {self.open_timeout:g}s from {waiting[0].where()}")
            try:
                hs, msg = await asyncio.wait_for(self._events.get(), left)
            except TimeoutError:
                continue
            if hs not in self.hops:
                continue
            if isinstance(msg, Opened) and msg.session_id == hs.session_id:
                hs.confirm(msg)
            elif isinstance(msg, Error) and msg.step_id is None:
                raise RemoteError(msg.code, f"{msg.message} ({hs.where()})")
            elif isinstance(msg, MeshinferError):
                raise TransportError(f"cannot open a session on {hs.where()}: {msg}")

    def _route_tail(self, i: int) -> list[Hop]:
        return route_tail(self.hops, i) if self.push else []

    async def _open_hop(self, hs: HopSession, tail: list[Hop], *, wait: bool = True) -> None:
        """Open ``hs`` (``wait=False``: send ``Open`` only, its answer comes with the first step); when the failure
        proves its server's record false (``refutation``), ban the server."""
        try:
            await hs.open(self.node, model_id=self.model_id, max_length=self.max_length, dtype=self.dtype,
                          quant=self.quant, route_tail=tail, timeout=self.open_timeout, on_rtt=self._on_rtt,
                          wait=wait)
        except Exception as err:
            self._refuted(hs, err)
            raise

    def _refuted(self, hs: HopSession, err: BaseException) -> None:
        """Ban ``hs``'s server when ``err``, its failure to open, proves its record false (``refutation``)."""
        peer = hs.hop.peer_id
        why = refutation(err, dialled=hs.stream is not None,
                         reached_before=self.stats is not None and self.stats.reached(peer))
        if why is not None:
            length = self.bans.ban(peer, time.monotonic())
            log.warning("%s: %s; its record is not believed for %.0fs", hs.where(), why, length)

    async def _replace(self, failed: HopSession, reason: str) -> None:
        """Have ``recovery`` replace ``failed``; splice the fresh hops into the route and start reading them."""
        assert self.recovery is not None
        await self.node.drop_idle(failed.hop.peer_id)  # its kept connections are not handed out again
        fresh, record = await self.recovery.replace(failed, reason)
        index = self.hops.index(failed)
        self.hops[index:index + 1] = fresh
        self.replaced.append(failed)
        for hs in fresh:
            hs.start_reader(self._events)
        self.failovers.append(record)
        if self.receipts is not None:
            self.receipts.update(fresh)  # their replays are work too

    async def _fix_tails(self) -> None:
        if self.push:
            await fix_tails(self.hops)

    async def open_side(self, hs: HopSession) -> None:
        """Open ``hs`` as a side session of this one (an audit's shadow or referee: no pushes, no reader)."""
        await self._open_hop(hs, [])

    @property
    def step_ids(self) -> Iterator[int]:
        return self._step_ids

    def chunk_tokens(self, hidden_size: int) -> int:
        """The most tokens one step of this session may carry."""
        return self._per_step(hidden_size)

    async def rewind(self, position: int, liar: HopSession | None = None) -> None:
        """Forget positions from ``position`` on (their outputs are not trusted) and replace ``liar`` (already
        banned by the audit that caught it), replaying its span's inputs [0, position). The next step must be at
        ``position``: every server truncates its cache there."""
        if not 0 <= position <= self.position:
            raise UsageError(f"cannot rewind a session at position {self.position} to {position}")
        for hs in self.hops:
            hs.inputs = truncate_parts(hs.inputs, position)
            hs.outputs = truncate_parts(hs.outputs, position)
            hs.steps = truncate_steps(hs.steps, position)
        self.position = position
        if self.auditor is not None:
            self.auditor.rewind(position)
        if liar is not None and liar in self.hops:
            if self.recovery is None:
                err = TransportError(f"{liar.where()} lied and failover is off")
                self._broken = err
                raise err
            await self._replace(liar, "caught lying by an audit")
            await self._fix_tails()

    # ---- steps ---------------------------------------------------------------------------------

    def span_inputs(self, i: int) -> torch.Tensor:
        """Everything hop ``i``'s span received so far, concatenated: [position, H] (for replay)."""
        inputs = self.hops[i].inputs
        if not inputs:
            raise UsageError("this session has not run any step yet")
        return torch.cat(inputs, dim=0)

    def _per_step(self, hidden_size: int) -> int:
        return max(1, min(self.max_chunk_tokens,
                          self.node.settings.stream.limits.max_tensor_bytes // (hidden_size * ITEMSIZE[self.dtype])))

    async def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        """Run ``hidden`` through the route as one or more steps of at most ``max_chunk_tokens``."""
        if hidden.dim() != 2 or hidden.shape[0] == 0:
            raise ConfigError(f"expected hidden states [tokens, hidden], got {tuple(hidden.shape)}")
        chunks = torch.split(hidden, self._per_step(hidden.shape[1]), dim=0)
        outs = [await self.step(chunk) for chunk in chunks]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        """One step through every hop; returns the last hop's output in the session dtype. A one-token step
        takes ``burst`` (the tag of one of several steps sent to the first hop at once)."""
        if self._closed:
            raise UsageError("this inference session is closed")
        if self._broken is not None:
            raise self._broken
        if hidden.dim() != 2 or hidden.shape[0] == 0:
            raise ConfigError(f"expected hidden states [tokens, hidden], got {tuple(hidden.shape)}")
        tokens = hidden.shape[0]
        burst, self.burst = (self.burst if tokens == 1 else None), None
        if self.position + tokens > self.max_length:
            raise ContextOverflowError(f"this session holds {self.position} tokens; {tokens} more exceed "
                                       f"its max_length of {self.max_length}")
        x = hidden.detach().to(device="cpu", dtype=getattr(torch, self.dtype)).contiguous()  # [T, H] for the wire
        if self.auditor is not None:
            self.auditor.before_step(tokens)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.step_timeout):
                outputs = await self._step_with_failover(x, burst)
        except TimeoutError:
            err = TransportError(f"a step of {tokens} token(s) got no answer from "
                                 f"{self._laggards_text()} within {self.step_timeout:g}s")
            self._broken = err
            raise err from None
        except MeshinferError as err:
            self._broken = err
            raise
        self.want_commit = False
        for i, hs in enumerate(self.hops):
            hs.inputs.append(x if i == 0 else outputs[i - 1])
            hs.outputs.append(outputs[i])
            hs.steps.append((hs.answered if hs.answered is not None else -1, self.position, tokens))
            hs.work += tokens
        self.position += tokens
        if self.receipts is not None:
            self.receipts.update(self.hops)
        if self.auditor is not None:
            self.auditor.after_step()
        elapsed = time.monotonic() - started
        if tokens == 1:
            self.decode_steps += 1
            self.decode_route_s += elapsed
        per_token = elapsed / tokens
        self._s_per_token = per_token if self._s_per_token is None else 0.8 * self._s_per_token + 0.2 * per_token
        return outputs[len(self.hops) - 1]

    async def _step_with_failover(self, x: torch.Tensor, burst: Burst | None = None) -> dict[int, torch.Tensor]:
        outputs: dict[int, torch.Tensor] = {}
        start, failures = 0, 0
        while True:
            try:
                await self._fix_tails()
                await self._run_from(start, x if start == 0 else outputs[start - 1], outputs, x.shape[0],
                                     burst if failures == 0 else None)
                return outputs
            except HopFailure as failure:
                failures += 1
                if self.recovery is None or failures > self.max_failovers:
                    raise TransportError(f"lost the session on {failure}") from None
                index = self.hops.index(failure.hs)
                await self._replace(failure.hs, failure.reason)
                start = min([index] + [j for j in range(index) if j not in outputs])
                outputs = {j: out for j, out in outputs.items() if j < start}

    def _laggards_text(self) -> str:
        waiting = [h.where() for i, h in enumerate(self.hops) if i not in self._answered]
        return ", ".join(waiting) or "the route"

    def _stall_timeout(self, tokens: int) -> float:
        """Seconds without any progress after which the first unanswered hop counts as hung."""
        if self._s_per_token is None:
            return self.step_timeout
        return max(self.min_stall_s, 20.0 * self._s_per_token * tokens)

    async def _run_from(self, start: int, first_input: torch.Tensor, outputs: dict[int, torch.Tensor],
                        tokens: int, burst: Burst | None = None) -> None:
        """Send the step to hop ``start`` and collect every hop's output from there on into ``outputs``."""
        n = len(self.hops)
        step_id = next(self._step_ids)
        self._answered = outputs  # for the timeout message: who has not answered yet
        drive = set(range(start + 1, n)) if not self.push else set()  # hops the client sends to itself
        sent = {start}
        sent_at = time.monotonic()
        arrived: dict[int, float] = {}
        await self.hops[start].send_step(step_id, self.position, first_input, burst, self.want_commit)
        while len(outputs) < n:
            wait = self._stall_timeout(tokens)
            opening = [(left, h) for h in self.hops if (left := h.open_overdue(time.perf_counter())) is not None]
            if opening:  # a pipelined Open not answered yet: the open timeout bounds it, as when Opened was awaited
                wait = max(0.0, min(wait, *(left for left, _ in opening)))
            try:
                hs, msg = await asyncio.wait_for(self._events.get(), wait)
            except TimeoutError:
                overdue = [h for h in self.hops
                           if (left := h.open_overdue(time.perf_counter())) is not None and left <= 0]
                if overdue:
                    raise HopFailure(overdue[0], f"no answer to Open for {self.open_timeout:g}s (hung?)") from None
                lag = self.hops[min(j for j in range(start, n) if j not in outputs)]
                raise HopFailure(lag, f"no answer for {self._stall_timeout(tokens):.1f}s (hung?)") from None
            if hs not in self.hops:
                continue  # from a hop that was replaced
            i = self.hops.index(hs)
            if isinstance(msg, MeshinferError):
                raise HopFailure(hs, f"stream lost: {msg}")
            if isinstance(msg, StepResult):
                if msg.session_id != hs.session_id or msg.step_id != step_id or i in outputs:
                    continue  # an answer to an earlier step (push and fallback overlapped, or a retry)
                outputs[i] = hs.output(msg, first_input, self.node.settings.stream.limits, self.dtype)
                hs.answered = msg.step_id
                arrived[i] = time.monotonic()
                if i == n - 1:
                    self.last_burst = msg.burst
            elif isinstance(msg, Opened):
                if msg.session_id == hs.session_id and not hs.confirmed:
                    hs.confirm(msg)  # the pipelined Open's answer (the first step was sent right after it)
            elif isinstance(msg, Error):
                if not hs.confirmed and msg.step_id is None:  # the pipelined Open was refused
                    err = RemoteError(msg.code, f"{msg.message} ({hs.where()})")
                    self._refuted(hs, err)
                    if msg.code in FAILOVER_CODES and self.recovery is not None:
                        raise HopFailure(hs, f"cannot open a session: {msg.code}: {msg.message}")
                    raise err
                if msg.step_id is not None and msg.step_id < step_id:
                    continue  # about an earlier step that has completed (or been retried) anyway
                if msg.code == ErrorCode.NEXT_HOP_FAILED and i + 1 < n:
                    log.info("%s could not push to the next hop (%s); driving it directly", hs.where(), msg.message)
                    drive.add(i + 1)
                elif msg.code in FAILOVER_CODES:
                    raise HopFailure(hs, f"{msg.code}: {msg.message}")
                else:
                    raise RemoteError(msg.code, f"{msg.message} ({hs.where()})")
            else:
                raise WireError(f"{hs.where()} sent an unexpected {type(msg).__name__} during a step")
            for j in sorted(drive - sent):
                if j - 1 in outputs:
                    sent.add(j)
                    await self.hops[j].send_step(step_id, self.position, outputs[j - 1], want_commit=self.want_commit)
        if tokens == 1 and start == 0 and self.stats is not None:
            self._measured(sent_at, arrived)

    def _measured(self, sent_at: float, arrived: dict[int, float]) -> None:
        """Report each hop's share of one one-token step (from the previous answer to its own) to ``stats``."""
        assert self.stats is not None
        previous = sent_at
        for i, hs in enumerate(self.hops):
            at = arrived.get(i)
            if at is None:
                return
            self.stats.record_step(hs.hop.peer_id, len(hs.hop.span), max(0.0, at - previous), at)
            previous = max(previous, at)

    # ---- closing -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every hop's session and stream (idempotent, never raises)."""
        if self._closed:
            return
        self._closed = True
        if self.auditor is not None:
            await self.auditor.close()
        # all hops at once: one round trip to the farthest, not one per hop in turn (~2 one-way delays each on a
        # WAN: bench wan measured 307 ms to close a 3-hop route at 50 ms per hop one after another)
        # a healthy session's streams go back to the node for the next session to the same servers
        reuse = self._broken is None
        await asyncio.gather(*(hs.close(send_timeout=2.0, stream_timeout=1.0, reuse=reuse) for hs in self.hops))
        if self.receipts is not None:
            self.receipts.finish([*self.replaced, *self.hops])
        if self._broken is None:
            for hs in self.hops:
                self.bans.succeed(hs.hop.peer_id)

    async def __aenter__(self) -> InferenceSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
