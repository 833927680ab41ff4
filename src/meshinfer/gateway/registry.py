"""The models one gateway serves: ``ModelTable`` maps each served name to its ``Gateway`` (one ``Generator``
each) and builds the ``GET /v1/models`` body.

Contract: a request's ``model`` picks its entry (``get``: an unknown name is a 404 ``model_not_found`` that
lists the served names). ``catalog`` lists every served model as an OpenAI model object plus a ``meshinfer``
extension: ``{"loaded": true, "model_id", "blocks", "servers", "covered", "route_ok"}`` from the generator's
``health()`` (bounded by ``HEALTH_TIMEOUT_S``; a failure there is ``covered: false`` with the ``reason``), then
the other models the swarm announces now (from a generator's optional ``swarm_models()``: ``[(model_id,
blocks)]``, reused for ``SWARM_LISTING_TTL_S``), marked ``loaded: false`` (not servable here). ``add`` serves one
more model (``meshinfer api --model auto`` opening a model the swarm announced since; on the app's loop).
Knows nothing of HTTP, servers or sessions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from meshinfer.gateway.requests import ApiError
from meshinfer.gateway.responses import model_card

if TYPE_CHECKING:
    from meshinfer.gateway.app import Gateway

HEALTH_TIMEOUT_S = 5.0
"""How long ``catalog`` waits for one model's coverage."""
SWARM_LISTING_TTL_S = 10.0
"""How long ``catalog`` reuses the swarm's model listing (one DHT read) before reading it again."""
MAX_LISTED_OTHERS = 64
"""At most this many models the swarm serves but this gateway does not are listed."""


class ModelTable:
    """Served name -> ``Gateway``; the first entry is the primary (``/health``, ``/metrics``)."""

    def __init__(self, gateways: Mapping[str, Gateway]) -> None:
        if not gateways:
            raise ValueError("a gateway serves at least one model")
        self.gateways = dict(gateways)
        self._listing: tuple[float, list[tuple[str, int]]] | None = None  # (monotonic time read, listing)

    @property
    def names(self) -> list[str]:
        return list(self.gateways)

    @property
    def primary(self) -> Gateway:
        return next(iter(self.gateways.values()))

    def add(self, name: str, gateway: Gateway) -> None:
        """Serve ``gateway`` under ``name`` from now on (call it on the app's loop; ValueError for a name taken)."""
        if name in self.gateways:
            raise ValueError(f"the model name {name!r} is served already")
        self.gateways[name] = gateway

    def get(self, name: str) -> Gateway:
        """The entry serving ``name``; 404 ``model_not_found`` naming the served models otherwise."""
        gateway = self.gateways.get(name)
        if gateway is None:
            served = ", ".join(repr(n) for n in self.gateways)
            raise ApiError(404, f"the model {name!r} does not exist; this gateway serves {served}",
                           param="model", code="model_not_found")
        return gateway

    async def catalog(self, created: int) -> dict[str, Any]:
        """The body of ``GET /v1/models`` (see the module docstring)."""
        served = list(self.gateways.items())  # models added meanwhile (``add``) show in the next listing
        healths = await asyncio.gather(*(_health(g) for _, g in served))
        data: list[dict[str, Any]] = []
        loaded_ids: set[str] = set()
        for (name, gateway), health in zip(served, healths, strict=True):
            model_id = health.get("model_id") or name
            loaded_ids.add(str(model_id))
            ext: dict[str, Any] = {
                "loaded": True, "model_id": model_id,
                "blocks": health.get("num_blocks", getattr(gateway.generator.spec, "num_blocks", None)),
                "servers": health.get("servers"), "covered": bool(health.get("ok")), "route_ok": bool(health.get("ok")),
            }
            if not health.get("ok") and "reason" in health:
                ext["reason"] = health["reason"]
            data.append({**model_card(name, created), "meshinfer": ext})
        if self._listing is None or time.monotonic() - self._listing[0] > SWARM_LISTING_TTL_S:
            self._listing = (time.monotonic(), await _swarm_models(self.gateways.values()))
        others = self._listing[1]
        for model_id, blocks in others:
            if model_id in loaded_ids or len(data) >= len(served) + MAX_LISTED_OTHERS:
                continue
            loaded_ids.add(model_id)
            data.append({**model_card(model_id, created),
                         "meshinfer": {"loaded": False, "model_id": model_id, "blocks": blocks}})
        return {"object": "list", "data": data}


async def _health(gateway: Gateway) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(gateway.generator.health(), timeout=HEALTH_TIMEOUT_S)
    except Exception as err:  # reported in the listing, never an error of the listing itself
        return {"ok": False, "reason": f"{type(err).__name__}: {err}"}


async def _swarm_models(gateways: Sequence[Gateway] | Any) -> list[tuple[str, int]]:
    """``swarm_models()`` of the first generator that has it (they share one swarm), [] without or on failure."""
    for gateway in gateways:
        listing = getattr(gateway.generator, "swarm_models", None)
        if listing is None:
            continue
        try:
            return list(await asyncio.wait_for(listing(), timeout=HEALTH_TIMEOUT_S))
        except Exception:  # the listing is a courtesy: the served models are shown anyway
            return []
    return []
