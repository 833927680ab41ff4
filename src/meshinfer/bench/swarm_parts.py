"""Where a swarm token's time goes: the parts ``meshinfer bench swarm`` reports beside its ratio.

Contract: three measurements and one pure split.

- ``server_decode_seconds(url)``: a block server's cumulative ``meshinfer_decode_step_seconds`` (sum,
  count) from its Prometheus endpoint (``meshinfer serve --metrics-port``): seconds from each one-token
  step's arrival at the server to its result, compute included, socket reads and writes not.
- ``local_parts(model, ...)``: the local engine's own decode step split in two, in this process, as
  its generation loop runs them (blocks, then LM head, alternately): ms per token in the blocks and in
  the head.
- ``pause_penalty(model, blocks, pause_s, ...)``: what a pause costs a stage: the blocks of one server
  run on one token back to back, and again each after ``pause_s`` without running them (a server in a
  chain waits most of every token while the others compute). On a machine whose caches and cores keep
  nothing warm across such a pause the second figure is larger; the difference is paid by every stage
  of every token, and no transport change can remove it.
- ``breakdown(...)``: the gap between swarm and local ms per token, split exactly into the servers'
  steps over the same blocks run locally, the time between servers (the network's share: transfers,
  waking each process, reading and writing messages) and the client's part over the local engine's
  head and sampling.

Imports torch only inside the measurements; knows nothing of the swarm's processes (callers pass URLs
and models).
"""

from __future__ import annotations

import statistics
import time
import urllib.request
from typing import Any

from meshinfer.errors import ConfigError
from meshinfer.types import BlockRange

DECODE_METRIC = "meshinfer_decode_step_seconds"


def server_decode_seconds(url: str, timeout: float = 5.0) -> tuple[float, int]:
    """(sum of seconds, count) of the one-token steps a server has finished, from its ``/metrics`` URL."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    total, count = 0.0, 0
    for family in text_string_to_metric_families(text):
        if family.name != DECODE_METRIC:
            continue
        for sample in family.samples:
            if sample.name == DECODE_METRIC + "_sum":
                total = float(sample.value)
            elif sample.name == DECODE_METRIC + "_count":
                count = int(sample.value)
        return total, count
    raise ConfigError(f"{url} reports no {DECODE_METRIC} (a server older than this client?)")


def per_step_ms(before: tuple[float, int], after: tuple[float, int]) -> float | None:
    """Mean ms per step between two ``server_decode_seconds`` readings (None: no step in between)."""
    steps = after[1] - before[1]
    return (after[0] - before[0]) * 1000 / steps if steps > 0 else None


def local_parts(model: Any, prompt: list[int], tokens: int) -> dict[str, float]:
    """The local engine's decode step in its two parts (ms per token, medians over ``tokens`` steps):
    all blocks on one token, and the LM head on its output, alternating as the generation loop does."""
    import torch

    blocks, head = [], []
    with torch.inference_mode():
        cache = model.span.new_cache(len(prompt) + tokens)
        hidden = model.span(model.head.embed(torch.tensor([prompt])), cache)  # [1, T, H]
        token = int(model.head.logits(hidden[0, -1]).argmax())
        for _ in range(tokens):
            x = model.head.embed(torch.tensor([[token]]))  # [1, 1, H]
            t0 = time.perf_counter()
            hidden = model.span(x, cache)
            t1 = time.perf_counter()
            logits = model.head.logits(hidden[0, -1])  # [V]
            t2 = time.perf_counter()
            blocks.append(t1 - t0)
            head.append(t2 - t1)
            token = int(logits.argmax())
    return {"blocks_ms": statistics.median(blocks) * 1000, "head_ms": statistics.median(head) * 1000}


def pause_penalty(model: Any, blocks: BlockRange, pause_s: float, reps: int = 24) -> dict[str, float]:
    """One token through ``blocks`` of ``model`` (a ``LocalModel``): median ms back to back and median ms
    after ``pause_s`` of not running them, and the difference (what each pause costs a stage)."""
    import torch

    if reps < 2 or pause_s < 0:
        raise ConfigError("need reps >= 2 and pause_s >= 0")
    span = model.span.sub(blocks)
    with torch.inference_mode():
        x = torch.randn(1, 1, span.spec.hidden_size, generator=torch.Generator().manual_seed(0)).to(span.dtype)

        def timed(pause: float) -> float:
            cache = span.new_cache(2 * reps + 2)
            span(x, cache)
            times = []
            for _ in range(reps):
                if pause > 0:
                    time.sleep(pause)
                t0 = time.perf_counter()
                span(x, cache)
                times.append(time.perf_counter() - t0)
            return statistics.median(times[1:]) * 1000

        warm = timed(0.0)
        paused = timed(pause_s)
    return {"pause_ms": pause_s * 1000, "back_to_back_ms": warm, "after_pause_ms": paused,
            "penalty_ms": paused - warm}


def breakdown(*, swarm_ms: float, local_ms: float, route_ms: float, server_ms: list[float],
              local_blocks_ms: float, penalty_ms: float | None = None) -> dict[str, Any]:
    """Where the swarm's extra ms per token over the local engine (``swarm_ms - local_ms``) goes.

    Measured in the same swarm runs: ``route_ms``, a decode step's time from the client sending it to the
    last server's output (``DistributedModel.decode_route_s_total``), and ``server_ms``, each server's
    mean decode step (arrival to result, ``server_decode_seconds``). So the swarm's token is
    ``sum(server_ms)`` in the servers' steps, ``route_ms - sum(server_ms)`` between them (transfers, waking
    each process, reading and writing messages: the network's share) and ``swarm_ms - route_ms`` in the
    client (embedding, LM head, sampling, its bookkeeping). The gap splits exactly into
    ``gap_servers_ms`` (servers' steps minus the same blocks in the local engine, ``local_blocks_ms``),
    ``gap_network_ms`` (all of the time between servers) and ``gap_client_ms`` (the client's part minus the
    local engine's own head and sampling, ``local_ms - local_blocks_ms``). ``penalty_ms`` (from
    ``pause_penalty``) times the hops is what pauses alone predict for ``gap_servers_ms``."""
    if not server_ms:
        raise ConfigError("need at least one server's decode step time")
    in_servers = sum(server_ms)
    local_client = local_ms - local_blocks_ms
    client = swarm_ms - route_ms
    between = route_ms - in_servers
    out: dict[str, Any] = {
        "swarm_ms_per_token": swarm_ms,
        "local_ms_per_token": local_ms,
        "gap_ms_per_token": swarm_ms - local_ms,
        "route_ms_per_token": route_ms,
        "server_step_ms": server_ms,
        "in_servers_ms_per_token": in_servers,
        "between_servers_ms_per_token": between,
        "client_ms_per_token": client,
        "local_blocks_ms_per_token": local_blocks_ms,
        "local_head_and_sampling_ms_per_token": local_client,
        "gap_servers_ms": in_servers - local_blocks_ms,
        "gap_network_ms": between,
        "gap_client_ms": client - local_client,
    }
    if penalty_ms is not None:
        out["pauses_predict_ms"] = penalty_ms * len(server_ms)
    return out
