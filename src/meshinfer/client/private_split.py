"""A private split: the client runs the model's first K and last K blocks itself; servers run only the middle.

Contract: with ``ClientConfig.private_blocks = K`` (``--private-blocks K``, 0 = off) a ``DistributedModel`` holds
blocks [0, K) and [n - K, n) of an n-block model on this machine (``PrivateBlocks``: two ``models.span.BlockSpan``s
on the head's device and in its compute dtype, loaded with the head; ``ensure_private_blocks`` gets them, and the
checkpoint's config, for every kind of model reference: a directory as is, a model id by the swarm's verified
piece fetch, a hub name by its download, only those blocks), and plans every route over ``[K, n - K)`` only
(``PrivateBlocks.middle``; servers need no change: a hop may run any sub-range of the blocks a server holds). So
servers receive the hidden states after block K - 1 and return those before block n - K: never the token
embeddings, never the states the LM head turns into logits (nor the logits, nor the token ids).

``PrivateSplitSession`` wraps one ``client.session.InferenceSession`` (the remote part, over the middle) with
the public surface of one: ``forward``/``step`` take hidden states [T, H] (the embeddings) and return the last
block's output [T, H] (on the head's device, in its dtype; the LM head applies as it does to a plain session's
output), ``position``, ``rewind(position, liar=None)``, ``close``, ``route``, ``failovers``, ``burst``,
``want_commit``, ``auditor``... (read through to the remote session). Each session has its own KV caches of the
local blocks (``max_length`` tokens each, like every hop's), kept at the remote session's position: before every
step they are cut back to it when it is behind them (a ``rewind`` of the wrapper, of the remote session itself by
an audited generation's rollback, or a step that failed half way), so multi-token steps, speculation's rollbacks
and audits' rollbacks work through the wrapper exactly as through a plain session; a remote session AHEAD of the
local caches (stepped directly, bypassing the wrapper) is a ``UsageError``. Failover, audits and pushes are the
remote session's business: they only ever see the middle blocks. Steps of at least ``THREAD_MIN_TOKENS`` tokens
(prefill) run the local blocks on a worker thread, so the client's event loop goes on serving other sessions;
shorter ones run inline, as the LM head does. Greedy tokens equal a plain split's and ``LocalModel``'s: the same
blocks run by the same code, here instead of on a server (equal up to float rounding, as a plain split's are).

What it does NOT hide (the privacy table's facts): the states servers see still carry the tokens. The model's
weights are public to every server (any block can be fetched by the model id), so the first server can invert
block K - 1's outputs to the prompt token by token (tests/client/test_private_split_unit.py does it exactly on a
tiny model; a 64-candidate search recovered 66 of 67 tokens of a real prompt on SmolLM2-135M with K = 1), and the
last server can run blocks [n - K, n) and the head itself. Sizes (tokens per step: the prompt's length, one step
per generated token, ``max_length`` in every ``Open``) and timing are those of a plain split.

Knows nothing of tokens, sampling or the network beyond the wrapped session's interface.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from meshinfer.client.hops import Failover, HopSession
from meshinfer.client.routing import RouteHop
from meshinfer.client.session import InferenceSession
from meshinfer.errors import ConfigError, ContextOverflowError, UsageError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.kv_cache import KVCache
from meshinfer.models.span import BlockSpan
from meshinfer.models.spec import ModelSpec
from meshinfer.p2p.node import PeerNode
from meshinfer.types import BlockRange
from meshinfer.weights.fetch import ensure_local
from meshinfer.wire.messages import Burst

if TYPE_CHECKING:
    from meshinfer.client.audit import Auditor

THREAD_MIN_TOKENS = 32
"""Steps of at least this many tokens run the local blocks on a worker thread (not on the client's loop)."""


def private_middle(k: int, num_blocks: int) -> BlockRange:
    """The blocks servers run when the client keeps the first and last ``k`` of ``num_blocks``: [k, n - k).
    ConfigError (naming ``--private-blocks`` and the fix) unless 0 < k and 2k < n."""
    if k < 1:
        raise ConfigError(f"--private-blocks must be >= 1 for a private split, got {k}")
    if 2 * k >= num_blocks:
        raise ConfigError(f"--private-blocks {k} would keep all {num_blocks} blocks of this model on the client "
                          f"(2 x {k} >= {num_blocks}): use at most {(num_blocks - 1) // 2}")
    return BlockRange(k, num_blocks - k)


async def ensure_private_blocks(node: PeerNode | None, model_ref: str, local: Path, k: int,
                                max_download: float | None = None) -> Path:
    """The checkpoint directory of ``model_ref`` (``local``: where its client part already is) holding blocks
    [0, k) and [n - k, n) too: nothing to do for a directory; a model id fetches the two runs of blocks from the
    swarm's seeders (verified, into the same cache entry); a hub name downloads their shards. ConfigError first
    when ``k`` does not fit the model (``private_middle``)."""
    n = ModelSpec.from_dir(local).num_blocks
    private_middle(k, n)
    path = local
    for blocks in (BlockRange(0, k), BlockRange(n - k, n)):
        path = await ensure_local(node, model_ref, blocks=blocks, client_part=True, max_download=max_download)
    return path


@dataclass(frozen=True)
class PrivateBlocks:
    """The client's own blocks of a private split: [0, k) before the route and [n - k, n) after it."""

    front: BlockSpan
    back: BlockSpan

    @classmethod
    def load(cls, ckpt: Checkpoint, k: int, dtype: torch.dtype, device: torch.device) -> PrivateBlocks:
        """Load blocks [0, k) and [n - k, n) of ``ckpt`` only (ConfigError when ``k`` does not fit)."""
        middle = private_middle(k, ckpt.spec.num_blocks)
        front = ckpt.load_span(BlockRange(0, middle.start), dtype, device)
        back = ckpt.load_span(BlockRange(middle.end, ckpt.spec.num_blocks), dtype, device)
        return cls(front, back)

    @property
    def k(self) -> int:
        return len(self.front)

    @property
    def middle(self) -> BlockRange:
        """The blocks routes cover: [k, n - k)."""
        return BlockRange(self.front.range.end, self.back.range.start)

    @property
    def device(self) -> torch.device:
        return self.front.device

    @property
    def dtype(self) -> torch.dtype:
        return self.front.dtype

    def weight_bytes(self) -> int:
        """Bytes of the local blocks' weights."""
        return sum(p.numel() * p.element_size() for span in (self.front, self.back) for p in span.parameters())

    def cache_bytes(self, max_length: int) -> int:
        """Bytes of one session's local KV caches of ``max_length`` tokens."""
        return self.front.cache_bytes(max_length) + self.back.cache_bytes(max_length)


class PrivateSplitSession:
    """An ``InferenceSession`` over the middle blocks between this client's own first and last blocks."""

    def __init__(self, remote: InferenceSession, blocks: PrivateBlocks) -> None:
        self.remote = remote
        """The session over the servers (blocks ``blocks.middle``)."""
        self.blocks = blocks
        self._front: KVCache = blocks.front.new_cache(remote.max_length)
        self._back: KVCache = blocks.back.new_cache(remote.max_length)
        self.local_s = 0.0
        self.local_tokens = 0
        """Seconds spent in the local blocks, and the tokens they ran (for measurements)."""

    # ---- the wrapped session's surface ----------------------------------------------------------

    @property
    def position(self) -> int:
        return self.remote.position

    @property
    def max_length(self) -> int:
        return self.remote.max_length

    @property
    def dtype(self) -> str:
        """The wire dtype of the remote session (the local blocks compute in ``blocks.dtype``)."""
        return self.remote.dtype

    @property
    def route(self) -> list[RouteHop]:
        return self.remote.route

    @property
    def hops(self) -> list[HopSession]:
        return self.remote.hops

    @property
    def failovers(self) -> list[Failover]:
        return self.remote.failovers

    @property
    def decode_steps(self) -> int:
        return self.remote.decode_steps

    @property
    def decode_route_s(self) -> float:
        return self.remote.decode_route_s

    @property
    def burst(self) -> Burst | None:
        return self.remote.burst

    @burst.setter
    def burst(self, value: Burst | None) -> None:
        self.remote.burst = value

    @property
    def last_burst(self) -> Burst | None:
        return self.remote.last_burst

    @property
    def want_commit(self) -> bool:
        return self.remote.want_commit

    @want_commit.setter
    def want_commit(self, value: bool) -> None:
        self.remote.want_commit = value

    @property
    def auditor(self) -> Auditor | None:
        return self.remote.auditor

    @auditor.setter
    def auditor(self, value: Auditor | None) -> None:
        self.remote.auditor = value

    def chunk_tokens(self, hidden_size: int) -> int:
        return self.remote.chunk_tokens(hidden_size)

    def span_inputs(self, i: int) -> torch.Tensor:
        """What remote hop ``i`` received so far: [position, H]."""
        return self.remote.span_inputs(i)

    # ---- steps ----------------------------------------------------------------------------------

    async def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] embeddings -> [T, H] last block's
        """Run ``hidden`` through the local first blocks, the route (in chunks, ``InferenceSession.forward``) and
        the local last blocks."""
        x = await self._local(self.blocks.front, self._front, self._before(hidden))
        y = await self.remote.forward(x)
        return await self._local(self.blocks.back, self._back, y)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        """``forward`` as ONE step of the route (``InferenceSession.step``)."""
        x = await self._local(self.blocks.front, self._front, self._before(hidden))
        y = await self.remote.step(x)
        return await self._local(self.blocks.back, self._back, y)

    async def rewind(self, position: int, liar: HopSession | None = None) -> None:
        """Forget positions from ``position`` on, here and on the route (``InferenceSession.rewind``)."""
        await self.remote.rewind(position, liar)
        self._sync()

    def _before(self, hidden: torch.Tensor) -> torch.Tensor:
        """Check a step's input and bring the local caches to the remote session's position."""
        if hidden.dim() != 2 or hidden.shape[0] == 0:
            raise ConfigError(f"expected hidden states [tokens, hidden], got {tuple(hidden.shape)}")
        self._sync()
        tokens = hidden.shape[0]
        if self.position + tokens > self.max_length:
            raise ContextOverflowError(f"this session holds {self.position} tokens; {tokens} more exceed "
                                       f"its max_length of {self.max_length}")
        return hidden

    def _sync(self) -> None:
        position = self.remote.position
        for cache in (self._front, self._back):
            if cache.length > position:
                cache.truncate(position)
            elif cache.length < position:
                raise UsageError(f"the remote session is at position {position}, its local blocks at "
                                 f"{cache.length}: step a private split only through its wrapper")

    async def _local(self, span: BlockSpan, cache: KVCache, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.shape[0]

        def run() -> torch.Tensor:
            started = time.perf_counter()
            out = span(hidden.to(device=span.device, dtype=span.dtype)[None], cache)[0]  # [T, H]
            self.local_s += time.perf_counter() - started
            return out

        out = await asyncio.to_thread(run) if tokens >= THREAD_MIN_TOKENS else run()
        if span is self.blocks.back:
            self.local_tokens += tokens
        return out

    # ---- closing --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the remote session (idempotent, never raises); the local caches go with this object."""
        await self.remote.close()

    async def __aenter__(self) -> PrivateSplitSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


ClientSession = InferenceSession | PrivateSplitSession
"""What ``DistributedModel.aopen_session`` returns: a plain session, or a private split's wrapper of one."""
