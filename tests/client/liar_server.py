"""A lying block server for routing tests: ``python liar_server.py serve ...`` runs ``meshinfer serve`` with
two changes: its records announce ``LIAR_THROUGHPUT`` tokens/s (1e12 unless set) whatever it measured, and every
step-loop iteration first sleeps ``LIAR_DELAY_S`` seconds (0.03 unless set): it claims to be the fastest server
of the swarm and is in fact the slowest. Outputs stay exact (the blocks run unchanged). Test-only: read by
tests/client/test_routing_claims.py and scripts/attacks/route_claims.py."""

from __future__ import annotations

import os
import sys
import time

import msgspec

from meshinfer.cli.main import main
from meshinfer.server import runtime, serving

CLAIM = float(os.environ.get("LIAR_THROUGHPUT", "1e12"))
DELAY_S = float(os.environ.get("LIAR_DELAY_S", "0.03"))

_record = serving.Identity.record
_execute = runtime.StepLoop.execute


def _lying_record(self, *args, **kwargs):
    record = _record(self, *args, **kwargs)
    if record.throughput <= 0:  # joining: nothing measured yet
        return record
    return msgspec.structs.replace(record, throughput=CLAIM, batch_throughput=CLAIM, sessions=0, queued_steps=0)


def _slow_execute(self, pieces):
    time.sleep(DELAY_S)
    return _execute(self, pieces)


serving.Identity.record = _lying_record  # type: ignore[method-assign]
runtime.StepLoop.execute = _slow_execute  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
