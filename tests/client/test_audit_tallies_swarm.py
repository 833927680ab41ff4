"""Audit tallies and report checks through real processes (issue 19): a client audits a swarm with a liar, reports
it, and publishes its audit tally (``client.upkeep``); ``meshinfer swarm --json`` (a subprocess) then shows audits
passed for the honest servers, failed for the liar, and the reporter; a second client's upkeep verifies the report
on its own and stops routing to the liar.

Three servers of the tiny llama's blocks 0:4 as separate processes; index 0 lies (``wrong``: every output noise,
``meshinfer.testing.dishonest``). The first generation's main route is steered to the liar (its shadows and
failovers are not), so the audit catches it; the second goes through honest servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from typing import Any, TypeVar

import pytest
from report_helpers import accuse, on

from meshinfer.client.model import DistributedModel
from meshinfer.client.routing import RouteHop
from meshinfer.client.swarm import ModelRef
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import meshinfer_argv
from meshinfer.testing.swarm import LocalSwarm
from meshinfer.types import BlockRange

pytestmark = pytest.mark.slow
T = TypeVar("T")
PROMPT = [1, 17, 42, 99, 7, 23, 5, 61]


def steer_to(model: DistributedModel, peer: str, others: list[str]) -> None:
    """Whole-model plans of ``model`` avoid ``others`` (so the route is ``peer``); span plans are untouched."""
    view = model.view
    plan = view.plan

    async def steered(ref: ModelRef, *, blocks: BlockRange | None = None, exclude: Any = (),
                      **kw: Any) -> list[RouteHop]:
        if blocks is None:
            exclude = {*exclude, *others}
        return await plan(ref, blocks=blocks, exclude=exclude, **kw)

    view.plan = steered  # type: ignore[method-assign]


def swarm_json(peers: list[str]) -> dict[str, Any]:
    out = subprocess.run(meshinfer_argv("swarm", "--json", "--initial-peers", *peers, "--timeout", "5"),
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_swarm_shows_audits_and_reports_and_another_client_verifies_the_report(liar_trio: LocalSwarm) -> None:
    liar, honest = liar_trio.servers[0].peer_id, [s.peer_id for s in liar_trio.servers[1:]]
    model_dir = tiny_checkpoint("llama")
    with contextlib.ExitStack() as stack:
        auditor = stack.enter_context(DistributedModel.from_pretrained(
            model_dir, liar_trio.initial_peers, route_wait=5.0, report_check_s=1.0))
        steer_to(auditor, liar, honest)
        auditor.generate(PROMPT, 24, stop_token_ids=())
        del auditor.view.plan  # type: ignore[misc]  # back to the view's own planner: the liar is banned
        auditor.generate(PROMPT, 24, stop_token_ids=())
        counters = auditor.audits
        assert counters.peer(liar).failed >= 1, counters
        assert any(counters.peer(p).passed > 0 for p in honest), counters
        report = on(auditor, accuse(auditor, liar))

        other = stack.enter_context(DistributedModel.from_pretrained(
            model_dir, liar_trio.initial_peers, route_wait=5.0, report_check_s=1.0))
        deadline = time.monotonic() + 180  # the other client's upkeep: first round after 1 s, then every second
        while other.view.report_outcomes.get(report.blob_sha256) != "verified":
            assert time.monotonic() < deadline, other.view.report_outcomes
            time.sleep(1.0)
        assert liar in other.view.reputation.reported()
        assert other.upkeep.rounds >= 1 and other.upkeep.tallies_published == 0  # it audited nothing

        expected = {p: a for p, a in counters.peers.items() if a.passed or a.failed}
        deadline = time.monotonic() + 180
        while True:
            doc = swarm_json(liar_trio.initial_peers)
            (model,) = [m for m in doc["models"] if m["model_id"] == auditor.model_id]
            servers = {s["peer_id"]: s for s in model["servers"]}
            shown = {p: s["audits"] for p, s in servers.items() if s["audits"]}
            want = {p: {"passed": a.passed, "failed": a.failed, "positions": a.positions, "clients": 1}
                    for p, a in expected.items() if p in servers}
            if shown == want and servers[liar]["reports"]:
                break
            assert time.monotonic() < deadline, (shown, want, servers[liar]["reports"])
            time.sleep(2.0)
        assert auditor.upkeep.tallies_published >= 1
    assert model["audit_clients"] == 1
    assert servers[liar]["audits"]["failed"] >= 1
    assert any(servers[p]["audits"] and servers[p]["audits"]["passed"] > 0 for p in honest)
    assert servers[liar]["reports"] == [auditor.view.peer_id]
