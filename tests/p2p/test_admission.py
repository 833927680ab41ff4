"""Admission bookkeeping (pure): stream caps per peer and in all, buffer caps, refusals naming the limit, and
the rate-limited refusal log."""

from __future__ import annotations

import logging

import pytest

from meshinfer.config import P2PConfig
from meshinfer.errors import ConfigError, LimitExceededError
from meshinfer.p2p.admission import MIB, Admission, AdmissionLimits, RefusalLog
from meshinfer.p2p.node import admission_limits


def test_streams_are_capped_per_peer_and_in_all() -> None:
    adm = Admission(AdmissionLimits(max_streams=3, max_streams_per_peer=2))
    assert adm.admit("a") is None and adm.admit("a") is None
    refusal = adm.admit("a")
    assert refusal is not None and "has 2 open streams" in refusal and "--max-streams-per-peer 2" in refusal
    assert adm.admit("b") is None
    refusal = adm.admit("c")
    assert refusal is not None and "3 streams are open" in refusal and "--max-streams 3" in refusal
    assert adm.streams() == 3 and adm.streams("a") == 2
    adm.release("a")
    assert adm.admit("c") is None
    for peer in ("a", "b", "c", "c", "zzz"):  # releasing more than admitted never goes negative
        adm.release(peer)
    assert adm.streams() == 0 and adm.streams("a") == 0


def test_buffers_are_capped_per_peer_and_in_all() -> None:
    adm = Admission(AdmissionLimits(max_buffer_bytes=3 * MIB, max_buffer_bytes_per_peer=2 * MIB))
    adm.reserve("a", 2 * MIB)
    with pytest.raises(LimitExceededError, match="--max-buffer-mb-per-peer 2"):
        adm.reserve("a", 1)
    assert adm.buffered("a") == 2 * MIB  # a refused reservation counts nothing
    adm.reserve("b", MIB)
    with pytest.raises(LimitExceededError, match="--max-buffer-mb 3"):
        adm.reserve("c", 1)
    adm.unreserve("a", 5 * MIB)  # clamped to what a holds
    assert adm.buffered("a") == 0 and adm.buffered() == MIB
    adm.reserve("c", 2 * MIB)
    adm.unreserve("b", MIB)
    adm.unreserve("c", 2 * MIB)
    assert adm.buffered() == 0


def test_limits_come_from_p2p_config_and_are_checked() -> None:
    lim = admission_limits(P2PConfig(max_streams=10, max_streams_per_peer=3, max_buffer_mb=8,
                                     max_buffer_mb_per_peer=2, max_handshakes=5))
    assert lim == AdmissionLimits(10, 3, 8 * MIB, 2 * MIB, 5)
    with pytest.raises(ConfigError, match="--max-streams-per-peer"):
        P2PConfig(max_streams=4, max_streams_per_peer=5)
    with pytest.raises(ConfigError, match="--max-buffer-mb"):
        P2PConfig(max_buffer_mb=0)
    with pytest.raises(ConfigError):
        AdmissionLimits(max_handshakes=0)


def test_buffer_refusals_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    refusals = RefusalLog(logging.getLogger("test.buffers"), lambda: 0.0)
    adm = Admission(AdmissionLimits(max_buffer_bytes=2 * MIB, max_buffer_bytes_per_peer=MIB), refusals)
    with caplog.at_level(logging.WARNING, logger="test.buffers"):
        for _ in range(100):
            with pytest.raises(LimitExceededError):
                adm.reserve("a", MIB + 1)
    assert len(caplog.records) == 1 and "--max-buffer-mb-per-peer 1" in caplog.records[0].getMessage()


def test_refusal_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    refusals = RefusalLog(logging.getLogger("test.refusals"), lambda: now[0], interval=10.0)
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        assert refusals.refused("streams", "one")
        for _ in range(1000):  # a flood of hostile frames: no more lines
            assert not refusals.refused("streams", "again")
        assert refusals.refused("buffers", "other kind")  # each kind has its own budget
        now[0] += 10.5
        assert refusals.refused("streams", "later")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused: one", "refused: other kind",
                     "refused: later (1000 more refusals of this kind in the last 10s)"]
