"""The page's audits column in real headless Chromium (issue 19): audit windows passed / failed per server summed
over clients' tallies, labelled as unverified claims of N clients, and inside ``meshinfer api`` the gateway's own
audits. A fixed payload (``StaticSource``): no swarm needed."""

from __future__ import annotations

import time
from typing import Any

import pytest

from meshinfer.client.audit import AuditCounters
from meshinfer.dashboard.app import StaticSource, create_app
from meshinfer.dashboard.doc import dashboard_payload
from meshinfer.gateway.serving import ApiServer

pytestmark = pytest.mark.slow


def server(peer: str, audits: dict[str, int] | None) -> dict[str, Any]:
    return {"peer_id": peer, "span": "0:2", "state": "online", "throughput": 4.0, "cache_tokens_left": 10,
            "sessions": 0, "queued_steps": 0, "software_version": "0.1.0", "public_name": None, "addresses": [],
            "direct_addresses": [], "reports": [], "audits": audits}


def doc() -> dict[str, Any]:
    servers = [server("QmHonest", {"passed": 6, "failed": 0, "positions": 96, "clients": 2}),
               server("QmLiar", {"passed": 1, "failed": 2, "positions": 16, "clients": 1}),
               server("QmUnseen", None)]
    model = {"model_id": "m" * 32, "name": "tiny", "family": "llama", "num_blocks": 2, "hidden_size": 8,
             "dtype": "float32", "manifest_hash": None, "announced_by": 3, "block_servers": [3, 3],
             "block_throughput": [12.0, 12.0], "missing_blocks": [], "complete": True, "servers": servers,
             "audit_clients": 2}
    return {"models": [model], "complete": True}


def audits_index(page: Any) -> int:
    """The audits column's index, found by its header (columns are added over time)."""
    headers: list[str] = page.eval_on_selector_all("#servers thead th", "ths => ths.map(t => t.textContent)")
    (index,) = [i for i, h in enumerate(headers) if h.startswith("audits")]
    return index


def cells(page: Any) -> dict[str, Any]:
    return page.eval_on_selector_all(
        "#servers tbody tr", """(rows, i) => Object.fromEntries(rows.map(r => [r.dataset.peerId, {
            text: r.children[i].textContent,
            title: (r.children[i].querySelector('.audits') || {}).title || null,
            own: (r.children[i].querySelector('.own-audits') || {}).textContent || null}]))""", audits_index(page))


def test_audits_column_shows_claimed_tallies(page: Any) -> None:
    payload = dashboard_payload(doc(), updated_at=time.time(), checked_at=time.time())
    with ApiServer(create_app(StaticSource(payload))) as srv:
        page.goto(srv.url)
        page.wait_for_function("document.body.dataset.state === 'ok'", timeout=10_000)
        assert page.inner_text(f"#servers thead th:nth-child({audits_index(page) + 1})").startswith("audits ✓/✗")
        got = cells(page)
    assert got["QmHonest"] == {"text": "6 / 0", "title": "as reported by 2 clients; unverified claims", "own": None}
    assert got["QmLiar"] == {"text": "1 / 2", "title": "as reported by 1 client; unverified claims", "own": None}
    assert got["QmUnseen"] == {"text": "", "title": None, "own": None}


def test_inside_a_gateway_its_own_audits_are_shown_too(page: Any) -> None:
    own = AuditCounters()
    own.peer("QmLiar").failed = 1
    own.peer("QmUnseen").passed = 3
    payload = dashboard_payload(doc(), updated_at=time.time(), checked_at=time.time(), gateway_audits=own.as_dict())
    with ApiServer(create_app(StaticSource(payload))) as srv:
        page.goto(srv.url)
        page.wait_for_function("document.body.dataset.state === 'ok'", timeout=10_000)
        got = cells(page)
    assert got["QmHonest"]["own"] is None
    assert got["QmLiar"]["own"] == "0 / 1 (this gateway)" and got["QmLiar"]["title"] is not None
    assert got["QmUnseen"] == {"text": "3 / 0 (this gateway)", "title": None, "own": "3 / 0 (this gateway)"}


def test_credits_panel_shows_receipts_totals_per_peer(page: Any) -> None:
    """Issue 23: the credits panel, from a credits document (``ledger.report.credits_doc``) in the payload."""
    from meshinfer.ledger.report import credits_doc
    from meshinfer.wire.receipts import Receipt

    now = time.time()
    receipts = [Receipt(model="0" * 32, client="QmClientAAAAAAAAAAAAAAAA", server="QmServerBBBBBBBBBBBBBBBB",
                        session="ab" * 12, seq=3, tokens=40, blocks=2, started=now - 60, issued=now - 5)]
    credits = credits_doc(receipts, {"QmServerBBBBBBBBBBBBBBBB": 1, "QmGoneCCCCCCCCCCCCCCCCCC": "timed out"},
                          {"QmServerBBBBBBBBBBBBBBBB": "lent-laptop"}, now)
    payload = dashboard_payload({**doc(), "credits": credits}, updated_at=now, checked_at=now)
    with ApiServer(create_app(StaticSource(payload))) as srv:
        page.goto(srv.url)
        page.wait_for_function("document.body.dataset.state === 'ok'", timeout=10_000)
        page.wait_for_selector("#credits-section:not([hidden])", timeout=10_000)
        rows = page.eval_on_selector_all("#credits tbody tr",
                                         "rows => rows.map(r => Array.from(r.children).map(c => c.textContent))")
        hint = page.inner_text("#credits-hint")
    assert rows == [["QmServ…BBBBBB", "lent-laptop", "80", "0", "80", "1 / 0", "80"],
                    ["QmClie…AAAAAA", "", "0", "80", "-80", "0 / 1", "0"]]
    assert "1 verified receipts of 1 of 2 servers" in hint
