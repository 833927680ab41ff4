"""``SyncInferenceSession``: an ``InferenceSession`` (``client.session``; or a private split's
``client.private_split.PrivateSplitSession``) for synchronous callers.

Contract: every call runs the async session's coroutine on the client's ``LoopThread`` and waits for it;
``close`` never raises. Knows nothing beyond the session's own interface.
"""

from __future__ import annotations

import contextlib

import torch

from meshinfer.client.hops import Failover
from meshinfer.client.private_split import ClientSession
from meshinfer.client.routing import RouteHop
from meshinfer.loopthread import LoopThread


class SyncInferenceSession:
    """An ``InferenceSession`` for synchronous callers: each call runs on the node's ``LoopThread``."""

    def __init__(self, runner: LoopThread, session: ClientSession) -> None:
        self._runner = runner
        self.session = session

    @property
    def position(self) -> int:
        return self.session.position

    @property
    def route(self) -> list[RouteHop]:
        return self.session.route

    @property
    def failovers(self) -> list[Failover]:
        return self.session.failovers

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self._runner.run(self.session.forward(hidden))

    def step(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self._runner.run(self.session.step(hidden))

    def span_inputs(self, i: int) -> torch.Tensor:
        return self.session.span_inputs(i)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._runner.run(self.session.close(), timeout=10.0)

    def __enter__(self) -> SyncInferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
