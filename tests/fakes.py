"""Stand-ins for the few collaborators that in-process server tests never exercise (importable as ``fakes`` from
every test directory, like ``fuzzing``): an outbox that fails the test if anything is sent through it."""

from __future__ import annotations


class NoOutbox:
    """A session outbox for tests that drive the step loop or scheduler directly: nothing may be sent or closed."""

    async def send(self, msg: object) -> None:
        raise AssertionError("this test's session never sends")

    def send_nowait(self, payload: bytes) -> bool:
        raise AssertionError("this test's session never sends")

    async def close(self, timeout: float = 2.0) -> None:
        raise AssertionError("this test's session never closes")
