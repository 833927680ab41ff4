"""Every lie an audit catches in a signed window becomes a report that another client verifies (issue 19, D4/D5).

Three servers of the tiny llama's blocks 0:4 as separate processes; index 0 lies (``meshinfer.testing.dishonest``:
``wrong`` on every call, or ``noise`` on half of them), 1 and 2 are honest. A first client's main route is steered
to the liar (``test_audits.steer``); its audits catch it (the referee: the third server), roll the generation back
(the output equals a ``LocalModel``'s) and publish a signed report built from the liar's own commits. A second
client reads the report from the DHT, re-verifies it through the honest servers ("verified") and its plans avoid
the liar. Every check the first client ran is recorded: none reached beyond the audited hop's signed commit except
at the generation's end (``settle``) or for a hop replaced since, and no detection lacked evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from client_helpers import stop_swarm
from test_audits import PROMPT, steer

from meshinfer.client.audit import Auditor
from meshinfer.client.audit_window import Shadow
from meshinfer.client.evidence import committed_upto
from meshinfer.client.model import DistributedModel
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.dishonest import DishonestConfig
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow
NEW = 24
LIARS = {"wrong": DishonestConfig("wrong", seed=1), "noise": DishonestConfig("noise", rate=0.5, sigma=1.0, seed=5)}


@pytest.fixture(scope="module", params=sorted(LIARS))
def liar_swarm(request: pytest.FixtureRequest, bootstrap: list[str]) -> Iterator[LocalSwarm]:
    swarm = LocalSwarm(tiny_checkpoint("llama"), [(0, 4), (0, 4), (0, 4)], initial_peers=bootstrap,
                       startup_timeout=120, dishonest={0: LIARS[request.param]}).start()
    try:
        yield swarm
    finally:
        stop_swarm(swarm)


Window = tuple[int, int, bool, bool, str | None]
"""(window end, the hop's committed_upto then, in settle, the hop still in the route, why it cannot commit)."""


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> list[Window]:
    """Record every check the auditors of this process start."""
    seen: list[Window] = []
    check, settle = Auditor._check, Auditor.settle
    settling: set[int] = set()

    async def recorded_check(self: Auditor, shadow: Shadow, upto: int) -> None:
        seen.append((upto, committed_upto(shadow.audited)[0], id(self) in settling,
                     shadow.audited in self.session.hops, shadow.uncommitted))
        await check(self, shadow, upto)

    async def recorded_settle(self: Auditor) -> None:
        settling.add(id(self))
        try:
            await settle(self)
        finally:
            settling.discard(id(self))

    monkeypatch.setattr(Auditor, "_check", recorded_check)
    monkeypatch.setattr(Auditor, "settle", recorded_settle)
    return seen


def on(model: DistributedModel, coro: Any, timeout: float = 120) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, model.loop).result(timeout=timeout)


def test_a_caught_liar_is_reported_and_another_client_verifies_it(liar_swarm: LocalSwarm,
                                                                  windows: list[Window]) -> None:
    model_dir = tiny_checkpoint("llama")
    liar, honest = liar_swarm.servers[0].peer_id, [s.peer_id for s in liar_swarm.servers[1:]]
    want = LocalModel.from_pretrained(model_dir).generate(PROMPT, NEW, stop_token_ids=())
    with contextlib.ExitStack() as stack:
        reporter, other = (stack.enter_context(DistributedModel.from_pretrained(
            model_dir, liar_swarm.initial_peers, route_wait=2.0)) for _ in range(2))
        steer(reporter, honest, members=[s.peer_id for s in liar_swarm.servers])
        got = reporter.generate(PROMPT, NEW, stop_token_ids=())
        counters = reporter.audits
        deadline = time.monotonic() + 60
        while counters.reports < counters.detections and time.monotonic() < deadline:  # published in the background
            time.sleep(0.2)
        assert got == want
        assert counters.detections >= 1 and counters.peer(liar).failed >= 1, counters
        assert counters.unreportable == 0 and counters.reports == counters.detections, counters
        assert counters.peer(liar).uncommitted == 0, counters

        async def check() -> dict[str, str]:
            outcomes: dict[str, str] = {}
            for _ in range(60):  # the records take a moment to reach the DHT
                for record, outcome in await other.view.check_reports(other.ref):
                    if not outcome.startswith("unchecked"):
                        outcomes[record.accused] = outcome
                if liar in outcomes:
                    break
                await asyncio.sleep(0.5)
            return outcomes

        outcomes = on(other, check(), timeout=180)
        assert outcomes.get(liar) == "verified", outcomes  # (the DHT may hold other tests' reports too)
        assert liar in other.view.reputation.reported() and not set(honest) & other.view.reputation.reported()
        for _ in range(5):  # spread draws at random: every plan avoids the liar
            route = on(other, other.view.plan(other.ref))
            assert len(route) == 1 and route[0].peer_id != liar
    # judge only committed positions: beyond the signed commit only at the end or for a replaced hop
    assert windows, "no audit ran"
    for upto, committed, settling, active, uncommitted in windows:
        assert upto <= committed or settling or not active or uncommitted is not None, windows
    assert all(u is None or "rollback" in u for *_, u in windows), windows
