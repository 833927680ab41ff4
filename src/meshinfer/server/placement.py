"""Block selection and rebalancing: where in the model a server should sit (architecture.md section 6).

Contract: pure functions of a swarm snapshot (a list of ``ServerRecord``) and plain numbers. No I/O,
no clock, no torch, no network; the caller fetches the snapshot, measures memory and throughput, and
acts on the answer (load a span, drain and re-announce). Errors are ``ConfigError`` (a nonsensical number)
and ``UsageError`` (the caller's own record is missing from the snapshot it passed).

The model (as in Petals): a server of throughput ``t`` tokens/s adds ``t`` to every block of its span,
so a block's throughput is the sum over the servers covering it, and the swarm is as fast as its
weakest block. Only ``online`` and ``joining`` servers count; ``draining`` ones are leaving. A server
that has not measured its throughput yet (a ``joining`` record announcing 0) is assumed to be as fast
as the server doing the choosing, and every counted server adds at least ``MIN_THROUGHPUT``, so a
throughput of exactly 0 means a hole in coverage and nothing else.

* ``choose_span`` puts a new server where the swarm is weakest: the start minimising, in this order,
  the weakest block of the window and the window's sum (a hole is always chosen first). Among equally
  good starts it prefers windows that line up with the edge of the weak region (the model's ends or a
  stronger neighbour), so a large hole is filled from its edges instead of being split into fragments.
* Anti-pile-up: starts that are still equally good are ordered and one is taken by a stable hash
  (sha256, never Python's salted ``hash``) of the tie-break string, the peer id. Two servers starting
  at the same moment with the same snapshot therefore usually pick different places, and one server
  always picks the same place. An empty tie-break takes the first (lowest) start.
* ``should_move`` simulates the caller leaving and re-choosing; it answers a new span only when that
  raises the whole model's minimum block throughput by a clear margin (``balance_quality``), so it
  never proposes a move that lowers the minimum or opens a hole. Callers should jitter their periodic
  check and re-read the snapshot just before moving, so two servers do not leave for the same hole.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterable

from meshinfer.errors import ConfigError, UsageError
from meshinfer.types import BlockRange, PeerIdStr
from meshinfer.wire.records import ServerRecord

MIN_THROUGHPUT = 1e-3
"""Least throughput (tokens/s) a counted server adds to each block it covers, so covered never reads as a hole."""

COUNTED_STATES = frozenset({"online", "joining"})
"""Server states whose throughput counts; ``draining`` servers are on their way out."""

DEFAULT_BALANCE_QUALITY = 0.75
"""Move only if the current minimum is below this fraction of the minimum after the move."""

_REL_TIE = 1e-9
"""Relative difference under which two window minima or sums count as equal (float noise, not signal)."""


def _check_num_blocks(num_blocks: int) -> None:
    if num_blocks < 1:
        raise ConfigError(f"a model needs at least one block, got num_blocks={num_blocks}")


def _check_rate(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0 tokens/s, got {value}")


def _counted(servers: Iterable[ServerRecord], exclude: Iterable[PeerIdStr]) -> list[ServerRecord]:
    """Servers that count, one record per peer id (its first in the snapshot), sorted by peer id."""
    excluded = set(exclude)
    first: dict[PeerIdStr, ServerRecord] = {}
    for record in servers:
        first.setdefault(record.peer_id, record)
    return [
        first[peer] for peer in sorted(first)
        if peer not in excluded and first[peer].state in COUNTED_STATES
    ]


def _contribution(throughput: float, unmeasured: float) -> float:
    return max(throughput if throughput > 0 else unmeasured, MIN_THROUGHPUT)


def block_throughputs(
    servers: Iterable[ServerRecord],
    num_blocks: int,
    *,
    exclude: Iterable[PeerIdStr] = (),
    unmeasured: float = MIN_THROUGHPUT,
) -> list[float]:
    """Throughput of each block: the sum over the online/joining servers covering it (0.0 = a hole).

    ``exclude`` drops peers; a server announcing 0 (not measured yet) counts as ``unmeasured``. Spans
    reaching past ``num_blocks`` are clipped. Sums run in peer-id order, so the result does not depend
    on the snapshot's order.
    """
    _check_num_blocks(num_blocks)
    _check_rate("unmeasured", unmeasured)
    totals = [0.0] * num_blocks
    for record in _counted(servers, exclude):
        add = _contribution(record.throughput, unmeasured)
        for block in range(record.span.start, min(record.span.end, num_blocks)):
            totals[block] += add
    return totals


def _window_mins(values: list[float], length: int) -> list[float]:
    """Minimum of every window of ``length`` consecutive values (monotonic deque, O(n))."""
    mins: list[float] = []
    window: deque[int] = deque()
    for i, value in enumerate(values):
        while window and values[window[-1]] >= value:
            window.pop()
        window.append(i)
        if window[0] <= i - length:
            window.popleft()
        if i >= length - 1:
            mins.append(values[window[0]])
    return mins


def _stable_index(tie_break: str, count: int) -> int:
    if not tie_break:
        return 0
    digest = hashlib.sha256(tie_break.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def best_start(throughputs: list[float], span_length: int, *, tie_break: str = "") -> int:
    """Start of the best window of ``span_length`` blocks over per-block ``throughputs`` (see module doc).

    Order: weakest block in the window (lowest first), then the window's sum (lowest first), then how
    many of its two ends line up with the model's ends or a stronger neighbour (most first), then the
    stable hash of ``tie_break`` among the starts still tied.
    """
    n = len(throughputs)
    if not 1 <= span_length <= n:
        raise ConfigError(f"span length {span_length} does not fit a model of {n} blocks")
    mins = _window_mins(throughputs, span_length)
    prefix = [0.0]
    for value in throughputs:
        prefix.append(prefix[-1] + value)
    sums = [prefix[s + span_length] - prefix[s] for s in range(n - span_length + 1)]

    best_min = min(mins)
    starts = [s for s, m in enumerate(mins) if m <= best_min * (1 + _REL_TIE)]
    best_sum = min(sums[s] for s in starts)
    sum_slack = _REL_TIE * best_sum + 1e-12 * prefix[-1]  # prefix differences carry rounding of the total
    starts = [s for s in starts if sums[s] <= best_sum + sum_slack]

    def aligned_ends(s: int) -> int:
        end = s + span_length
        left = s == 0 or throughputs[s - 1] > mins[s] * (1 + _REL_TIE)
        right = end == n or throughputs[end] > mins[s] * (1 + _REL_TIE)
        return int(left) + int(right)

    most = max(aligned_ends(s) for s in starts)
    starts = [s for s in starts if aligned_ends(s) == most]
    return starts[_stable_index(tie_break, len(starts))]


def choose_span(
    servers: Iterable[ServerRecord],
    num_blocks: int,
    span_length: int,
    *,
    own_throughput: float,
    exclude: Iterable[PeerIdStr] = (),
    tie_break: str = "",
) -> BlockRange:
    """The span of ``span_length`` blocks (clamped to [1, num_blocks]) where the swarm is weakest.

    ``own_throughput`` is the choosing server's throughput (0 if not measured yet); servers that have
    not measured theirs are assumed to be as fast. ``tie_break`` is the choosing peer's id.
    """
    _check_rate("own_throughput", own_throughput)
    _check_num_blocks(num_blocks)
    length = min(max(span_length, 1), num_blocks)
    totals = block_throughputs(servers, num_blocks, exclude=exclude, unmeasured=max(own_throughput, MIN_THROUGHPUT))
    start = best_start(totals, length, tie_break=tie_break)
    return BlockRange(start, start + length)


def should_move(
    servers: Iterable[ServerRecord],
    num_blocks: int,
    *,
    me: PeerIdStr,
    balance_quality: float = DEFAULT_BALANCE_QUALITY,
) -> BlockRange | None:
    """The span ``me`` should move to, or None to stay.

    Simulates ``me`` leaving and re-choosing with ``choose_span`` (same length, its throughput). It
    answers the new span only when the whole model's minimum block throughput now is below
    ``balance_quality`` times the minimum after the move (0 < balance_quality <= 1), which can never
    lower the minimum or leave a block uncovered. Only an ``online`` server moves (a joining one has
    not settled; a draining one is already leaving).
    """
    if not 0 < balance_quality <= 1:
        raise ConfigError(f"balance_quality must be in (0, 1], got {balance_quality}")
    _check_num_blocks(num_blocks)
    snapshot = list(servers)
    mine = next((record for record in snapshot if record.peer_id == me), None)
    if mine is None:
        raise UsageError(f"peer {me} has no record in the swarm snapshot, so it cannot consider moving")
    if mine.state != "online":
        return None
    unmeasured = _contribution(mine.throughput, MIN_THROUGHPUT)
    current_min = min(block_throughputs(snapshot, num_blocks, unmeasured=unmeasured))
    length = min(len(mine.span), num_blocks)
    new_span = choose_span(snapshot, num_blocks, length, own_throughput=mine.throughput, exclude=[me], tie_break=me)
    if new_span == mine.span:
        return None
    after = block_throughputs(snapshot, num_blocks, exclude=[me], unmeasured=unmeasured)
    for block in new_span.blocks():
        after[block] += unmeasured
    new_min = min(after)
    if current_min < balance_quality * new_min:
        return new_span
    return None


def span_length_for_memory(free_bytes: int, bytes_per_block: int, num_blocks: int, *, cache_fraction: float) -> int:
    """How many blocks (at most ``num_blocks``) fit in ``free_bytes`` once ``cache_fraction`` of it is kept for KV.

    Raise ConfigError when not even one block fits, or for nonsensical inputs.
    """
    _check_num_blocks(num_blocks)
    if bytes_per_block <= 0:
        raise ConfigError(f"bytes per block must be > 0, got {bytes_per_block}")
    if free_bytes < 0:
        raise ConfigError(f"free memory must be >= 0 bytes, got {free_bytes}")
    if not 0 <= cache_fraction < 1:
        raise ConfigError(f"cache fraction must be in [0, 1), got {cache_fraction}")
    for_weights = math.floor(free_bytes * (1.0 - cache_fraction))
    fits = for_weights // bytes_per_block
    if fits < 1:
        raise ConfigError(
            f"not even one block fits: {_mib(free_bytes)} free, {cache_fraction:.0%} kept for the KV cache leaves "
            f"{_mib(for_weights)} for weights, and one block needs {_mib(bytes_per_block)}"
        )
    return min(fits, num_blocks)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"
