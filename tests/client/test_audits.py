"""Audits through real processes: a dishonest server is caught, banned, failed over, and the output is exact.

A swarm of the tiny llama with three servers of all 4 blocks, one of them dishonest (``noise`` on half its steps,
started through ``meshinfer.testing.dishonest``). Each test steers the client's MAIN route (the plan over the
whole model; the shadows' and referees' plans are left alone) to one server by excluding the others, then
generates: the reference is a ``LocalModel`` of the same checkpoint (fp32 on both sides, as the honest swarm
gives it: see test_distributed).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from client_helpers import stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.client.routing import RouteHop
from meshinfer.client.swarm import ModelRef
from meshinfer.config import SamplingConfig
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.dishonest import DishonestConfig
from meshinfer.testing.swarm import LocalSwarm
from meshinfer.types import BlockRange

pytestmark = pytest.mark.slow

LIAR = DishonestConfig("noise", rate=0.5, sigma=1.0, seed=5)
PROMPT = [1, 17, 42, 99, 7, 23, 5, 61]
NEW = 40


class Swarm:
    def __init__(self, model_dir: Path, swarm: LocalSwarm) -> None:
        self.model_dir, self.swarm = model_dir, swarm
        self.liar = swarm.servers[0].peer_id
        self.honest = [s.peer_id for s in swarm.servers[1:]]
        self.members = [self.liar, *self.honest]
        self.local = LocalModel.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def trio(bootstrap: list[str]) -> Iterator[Swarm]:
    model_dir = tiny_checkpoint("llama")
    swarm = LocalSwarm(model_dir, [(0, 4), (0, 4), (0, 4)], initial_peers=bootstrap, startup_timeout=120,
                       dishonest={0: LIAR}).start()
    try:
        yield Swarm(model_dir, swarm)
    finally:
        stop_swarm(swarm)


def steer(model: DistributedModel, avoid: Iterable[str], first_span_avoid: Iterable[str] = (),
          members: Iterable[str] | None = None) -> None:
    """Make the whole-model plans of ``model`` avoid ``avoid``, and its first plan over a span (the first shadow's)
    avoid ``first_span_avoid``; later span plans (referees, failovers) are untouched: the route and the first
    shadow go where the test wants them. With ``members``, EVERY plan also avoids servers outside them (records
    of other modules' stopped servers of the same model may still be in the shared DHT: a route or shadow there
    would fail over or wait out an open timeout instead of testing what the test means to)."""
    view = model.view
    plan = view.plan
    avoided = frozenset(avoid)
    span_avoid = [frozenset(first_span_avoid)]
    allowed = None if members is None else frozenset(members)

    async def steered(ref: ModelRef, *, blocks: BlockRange | None = None, exclude: Iterable[str] = (),
                      **kw: Any) -> list[RouteHop]:
        if allowed is not None:
            cov = await view.coverage(ref)
            exclude = {*exclude, *(set(cov.servers) - allowed)}
        if blocks is None:
            exclude = {*exclude, *avoided}
        elif span_avoid:
            exclude = {*exclude, *span_avoid.pop()}
        return await plan(ref, blocks=blocks, exclude=exclude, **kw)

    view.plan = steered  # type: ignore[method-assign]


def client(trio: Swarm, **overrides: Any) -> DistributedModel:
    return DistributedModel.from_pretrained(trio.model_dir, trio.swarm.initial_peers, route_wait=2.0, **overrides)


def test_honest_route_passes_its_audits(trio: Swarm) -> None:
    want = trio.local.generate(PROMPT, NEW, stop_token_ids=())
    with client(trio) as model:
        steer(model, [trio.liar], members=trio.members)
        assert model.generate(PROMPT, NEW, stop_token_ids=()) == want
        route = [h.peer_id for h in model.last_route]
        counters = model.audits
    assert route[0] in trio.honest
    assert counters.detections == 0 and counters.peer(route[0]).passed >= 2, counters
    assert counters.peer(route[0]).failed == 0
    # every position verified before the end (more when the random shadow was the swarm's liar: it is caught as a
    # lying verifier and a new shadow verifies the hop's positions again)
    if counters.lying_verifiers == 0:
        assert counters.peer(route[0]).positions == len(PROMPT) + NEW - 1
    else:
        assert counters.peer(route[0]).positions >= len(PROMPT) + NEW - 1


def test_liar_caught_banned_and_greedy_output_exact(trio: Swarm) -> None:
    want = trio.local.generate(PROMPT, NEW, stop_token_ids=())
    with client(trio) as model:
        steer(model, trio.honest, members=trio.members)
        got = model.generate(PROMPT, NEW, stop_token_ids=())
        session = model.last_session
        assert session is not None
        assert trio.liar in model.view.bans.avoided(time.monotonic())
        final_route = [h.peer_id for h in session.route]
        counters = model.audits
    assert got == want
    assert counters.detections >= 1 and counters.peer(trio.liar).failed >= 1, counters
    assert trio.liar not in final_route
    assert any(f.peer_id == trio.liar for f in session.failovers)


def test_liar_caught_and_seeded_sampling_exact(trio: Swarm) -> None:
    sampling = SamplingConfig(temperature=0.9, top_k=40, seed=11)
    want = trio.local.generate(PROMPT, NEW, sampling, stop_token_ids=())
    with client(trio) as model:
        steer(model, trio.honest, members=trio.members)
        got = model.generate(PROMPT, NEW, sampling, stop_token_ids=())
        counters = model.audits
    assert counters.detections >= 1, counters
    assert got == want


def test_audit_off_gives_the_liars_output(trio: Swarm) -> None:
    want = trio.local.generate(PROMPT, NEW, stop_token_ids=())
    with client(trio, audit=False) as model:
        steer(model, trio.honest, members=trio.members)
        got = model.generate(PROMPT, NEW, stop_token_ids=())
        assert [h.peer_id for h in model.last_route] == [trio.liar]
        assert model.audits.detections == 0
    assert got != want


def test_lying_shadow_is_banned_and_nothing_rolls_back(trio: Swarm) -> None:
    want = trio.local.generate(PROMPT, NEW, stop_token_ids=())
    with client(trio) as model:
        # route: honest 0, shadow: liar
        steer(model, [trio.liar, trio.honest[1]], first_span_avoid=[trio.honest[1]], members=trio.members)
        for _ in range(4):  # the shadow serves ~4 checks per generation; the liar lies on half its calls
            got = model.generate(PROMPT, NEW, stop_token_ids=())
            assert got == want
            if model.audits.lying_verifiers:
                break
            # the next session's shadow: the liar again
            steer(model, [], first_span_avoid=[trio.honest[1]], members=trio.members)
        session = model.last_session
        assert session is not None
        assert trio.liar in model.view.bans.avoided(time.monotonic())
        counters = model.audits
    assert got == want
    assert counters.lying_verifiers >= 1 and counters.detections == 0, counters
    assert counters.peer(trio.honest[0]).failed == 0 and counters.peer(trio.honest[0]).passed >= 1, counters
    assert not session.failovers
