""""No independent server to audit" is said once per server and span, not once per session (``AuditCounters
.say_unaudited``): a 3-server swarm with 16 sessions printed it 48 times per burst before."""

from __future__ import annotations

from meshinfer.client.audit import UNAUDITED_LOG_KEYS, UNAUDITED_LOG_S, AuditCounters


def test_said_once_per_server_and_span_then_again_after_the_quiet_time() -> None:
    counters = AuditCounters()
    said = [counters.say_unaudited(peer, span, 100.0 + i * 0.01)
            for i in range(16) for peer, span in (("A", "0:4"), ("B", "4:8"), ("C", "8:12"))]
    assert said.count(True) == 3 and said[:3] == [True, True, True]
    assert counters.say_unaudited("A", "4:8", 101.0)  # the same server on another span: said
    assert not counters.say_unaudited("A", "0:4", 100.0 + UNAUDITED_LOG_S - 1)
    assert counters.say_unaudited("A", "0:4", 100.0 + UNAUDITED_LOG_S)
    assert not counters.say_unaudited("A", "0:4", 100.0 + UNAUDITED_LOG_S + 1)


def test_memory_is_bounded_and_forgets_the_stalest() -> None:
    counters = AuditCounters()
    for i in range(UNAUDITED_LOG_KEYS + 50):
        assert counters.say_unaudited(f"peer{i}", "0:4", float(i))
    assert len(counters._quiet) == UNAUDITED_LOG_KEYS  # pyright: ignore[reportPrivateUsage]
    assert counters.say_unaudited("peer0", "0:4", float(UNAUDITED_LOG_KEYS + 60))  # forgotten: said again
    assert not counters.say_unaudited(f"peer{UNAUDITED_LOG_KEYS + 49}", "0:4", float(UNAUDITED_LOG_KEYS + 60))
    assert counters.as_dict()["peers"] == {}  # the log memory is not an audit figure
