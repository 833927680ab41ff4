"""The client's prompt-cache counters in the gateway's ``/metrics``: a Prometheus collector over a ``ModelTable``.

Contract: ``PromptCacheCollector(table)`` is registered in the registry ``/metrics`` renders (the primary
generator's ``SessionMetrics.registry``: ``gateway.app.create_app`` does it). At each scrape it reads, for every
served model whose generator has ``prompt_cache_stats()`` (``SwarmGenerator``: ``client.prefix_cache
.PromptCacheStats`` of its ``DistributedModel`` plus ``held``, the sessions held now), the counters
``meshinfer_prompt_cache_{hits,misses,tokens_reused,evictions,expirations,fallbacks}_total`` and the gauge
``meshinfer_prompt_cache_held``, one sample per model with the label ``model`` (its served name; models added
later, ``--model auto``, appear from the next scrape). Reading is a plain attribute read: scrapes run on the app's
loop, where the counters change. Knows nothing of HTTP or sessions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from meshinfer.gateway.registry import ModelTable

PREFIX = "meshinfer_prompt_cache"
COUNTERS: dict[str, str] = {
    "hits": "Generations that continued a held session (a chat's next turn)",
    "misses": "Generations with the prompt cache on that opened a fresh session",
    "tokens_reused": "Prompt tokens not sent again thanks to hits",
    "evictions": "Held sessions closed to make room (least recently used)",
    "expirations": "Held sessions closed after idling past the TTL",
    "fallbacks": "Hits whose session failed before its first token (a fresh one took over)",
    "room_closes": "Held sessions closed because a server refused a fresh session for room",
    "open_retries": "Fresh sessions opened again at once after a refusal for room",
}
HELD = "held"
"""The gauge's key in ``prompt_cache_stats()``: sessions held now."""


class PromptCacheCollector(Collector):
    """Prompt-cache counters of every served model, read at scrape time (see the module docstring)."""

    def __init__(self, table: ModelTable) -> None:
        self.table = table

    def collect(self) -> Iterator[Metric]:
        counters = {key: CounterMetricFamily(f"{PREFIX}_{key}", doc, labels=["model"])
                    for key, doc in COUNTERS.items()}
        held = GaugeMetricFamily(f"{PREFIX}_{HELD}", "Idle sessions held for a later prompt now", labels=["model"])
        for name, gateway in list(self.table.gateways.items()):
            read = getattr(gateway.generator, "prompt_cache_stats", None)
            if read is None:
                continue
            stats: dict[str, Any] = read()
            for key, family in counters.items():
                family.add_metric([name], float(stats.get(key, 0)))
            held.add_metric([name], float(stats.get(HELD, 0)))
        yield from counters.values()
        yield held

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no description at registration: collect() is only called at scrape time
