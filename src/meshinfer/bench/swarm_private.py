"""What a private split costs: ``meshinfer bench swarm --private-blocks K``'s figures beside the plain split's.

Contract: ``open_private`` joins the bench's swarm with a second ``DistributedModel`` holding ``K`` first and last
blocks itself (``client.private_split``; same checkpoint, dtype and push setting as the plain client), which the
bench times in the same rounds as the plain split and the local engine. ``local_blocks_ms`` times the private
client's own blocks apart (one token through blocks [0, K) and [n - K, n) with their caches, as a decode step runs
them; median ms). ``compare`` (pure) puts the two clients' figures side by side: decode tokens/s, time to first
token, ms per token in the route (from sending a decode step to the last server's output) and on the client
(the rest: embeddings, the private client's own blocks, LM head, sampling), and their ratios (also the median of
each round's ratio) and differences.
Imports torch and the network only inside ``open_private`` and ``local_blocks_ms``; never asserts a timing.
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def open_private(path: Any, initial_peers: list[str], dtype: str, k: int, push: bool) -> Any:
    """A ``DistributedModel`` of ``path`` keeping ``k`` first and last blocks on this machine."""
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel

    return DistributedModel.from_pretrained(path, initial_peers, dtype=dtype,
                                            config=ClientConfig(push=push, private_blocks=k))


def local_blocks_ms(model: Any, tokens: int = 32) -> float:
    """Median ms of one token through the private client's own blocks (front then back, with caches)."""
    import torch

    blocks = model.private
    front, back = blocks.front, blocks.back
    times = []
    with torch.inference_mode():
        caches = (front.new_cache(tokens + 1), back.new_cache(tokens + 1))
        x = torch.randn(1, 1, front.spec.hidden_size, generator=torch.Generator().manual_seed(0)).to(front.dtype)
        for _ in range(tokens):
            t0 = time.perf_counter()
            back(front(x, caches[0]), caches[1])
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1000


def compare(*, k: int, plain: dict[str, Any], private: dict[str, Any], plain_route_ms: float | None,
            private_route_ms: float | None, local_blocks: float, identical: bool,
            private_route: list[str], weight_bytes: int, cache_bytes: int,
            paired: list[float] | None = None) -> dict[str, Any]:
    """The plain and the private split side by side (``plain``/``private``: ``bench.swarm.summarise`` results;
    ``*_route_ms``: mean ms per decode step in the route; ``paired``: each round's private over plain decode
    tokens/s, the two runs of a round being the least apart in time)."""
    def side(figures: dict[str, Any], route_ms: float | None) -> dict[str, Any]:
        out = {"decode_tokens_per_s": figures["decode_tokens_per_s"],
               "time_to_first_token_ms": figures["time_to_first_token_ms"],
               "decode_ms_per_token": figures["decode_ms_per_token_mean"]}
        if route_ms is not None:
            out["route_ms_per_token"] = route_ms
            out["client_ms_per_token"] = figures["decode_ms_per_token_mean"] - route_ms
        return out

    a, b = side(plain, plain_route_ms), side(private, private_route_ms)
    out: dict[str, Any] = {
        "private_blocks": k,
        "plain": a,
        "private": b,
        "private_over_plain": {
            "decode_tokens_per_s": b["decode_tokens_per_s"] / a["decode_tokens_per_s"],
            "time_to_first_token": b["time_to_first_token_ms"] / a["time_to_first_token_ms"],
            **({"decode_paired_median": statistics.median(paired)} if paired else {}),
        },
        "extra_ms_per_token": b["decode_ms_per_token"] - a["decode_ms_per_token"],
        "local_blocks_ms_per_token": local_blocks,
        "private_route": private_route,
        "client_block_weight_bytes": weight_bytes,
        "client_block_kv_bytes_per_session": cache_bytes,
        "greedy_tokens_identical": identical,
    }
    if "client_ms_per_token" in a and "client_ms_per_token" in b:
        out["extra_client_ms_per_token"] = b["client_ms_per_token"] - a["client_ms_per_token"]
        out["route_ms_saved_per_token"] = a["route_ms_per_token"] - b["route_ms_per_token"]
    return out
