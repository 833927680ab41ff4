"""Several models behind one gateway (``gateway.registry``), with scripted generators: ``model`` routes each
request, an unknown name is a 404 listing the served ones, ``/v1/models`` lists coverage and the swarm's
other models."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from gateway_helpers import FakeGenerator, ids

from meshinfer.gateway.app import create_app


class ListingGenerator(FakeGenerator):
    """A fake that also lists the swarm's models, as ``SwarmGenerator.swarm_models`` does."""

    async def swarm_models(self) -> list[tuple[str, int]]:
        return [("org/a", 4), ("org/elsewhere", 30)]


def _run(app: Any, requests: list[tuple[str, str, dict[str, Any] | None]]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return [await (client.post(path, json=body) if method == "POST" else client.get(path))
                    for method, path, body in requests]

    return asyncio.run(main())


def test_two_models_route_by_name() -> None:
    a = ListingGenerator(ids("from a"), health={"ok": True, "model_id": "org/a", "num_blocks": 4, "servers": 2})
    b = FakeGenerator(ids("from b"), health={"ok": False, "reason": "no server holds blocks 2:3"})
    app = create_app(a, "a", more={"b": b})

    def completion(model: str) -> tuple[str, str, dict[str, Any]]:
        return "POST", "/v1/completions", {"model": model, "prompt": "p", "max_tokens": 6}

    ra, rb, unknown, models, card_b = _run(app, [completion("a"), completion("b"), completion("c"),
                                                  ("GET", "/v1/models", None), ("GET", "/v1/models/b", None)])
    assert (ra.json()["choices"][0]["text"], ra.json()["model"]) == ("from a", "a")
    assert (rb.json()["choices"][0]["text"], rb.json()["model"]) == ("from b", "b")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert "'a', 'b'" in unknown.json()["error"]["message"]
    data = models.json()["data"]
    assert [m["id"] for m in data] == ["a", "b", "org/elsewhere"]  # org/a is served here as "a"
    assert data[0]["meshinfer"] == {"loaded": True, "model_id": "org/a", "blocks": 4, "servers": 2,
                                    "covered": True, "route_ok": True}
    assert data[1]["meshinfer"]["covered"] is False and "2:3" in data[1]["meshinfer"]["reason"]
    assert data[2]["meshinfer"] == {"loaded": False, "model_id": "org/elsewhere", "blocks": 30}
    assert card_b.json() == data[1]
    stats = app.state.gateway.stats  # one set of counters for all models
    assert (stats["requests"], stats["completed"], stats["failed"]) == (3, 2, 1)
