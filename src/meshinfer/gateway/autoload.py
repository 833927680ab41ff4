"""``meshinfer api --model auto`` at run time: read the swarm's model directory, open the models it announces,
add them to the gateway's ``ModelTable``, and keep doing so every ``refresh_s`` seconds.

Contract: ``announced(node)`` reads the directory (``p2p.directory.list_models``) as ``gateway.auto.Announced``s;
``wait_announced`` re-reads it for up to ``wait`` seconds until it lists a model. ``AutoLoader`` runs on the app's
event loop (the client's loop: ``model.loop``): ``refresh()`` reads the directory once, asks ``gateway.auto
.plan_auto`` what to open, opens each with ``open_model(model_id, name)`` (blocking: fetching the client part from the
swarm's seeders and loading the head; run in a worker thread, never on the loop) and ``ModelTable.add``s the
``Gateway`` it returns. A model that cannot be opened (no seeder, a broken tokenizer...) is skipped with a warning
and tried again on the next refresh; models over the bound get one log line each (``/v1/models`` lists them as
not loaded); a model that disappears from the swarm stays served (its requests get the usual 503, ``/v1/models``
shows it ``covered: false``). ``start()`` runs ``refresh`` every ``refresh_s`` until ``aclose``. A failed read of
the directory is a warning, never an error. Knows nothing of HTTP or of how a model is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from meshinfer.gateway.auto import Announced, plan_auto, served_name
from meshinfer.tasks import stop_task

if TYPE_CHECKING:
    from meshinfer.gateway.app import Gateway
    from meshinfer.gateway.registry import ModelTable
    from meshinfer.p2p.node import PeerNode

log = logging.getLogger(__name__)

LISTING_POLL_S = 0.5
"""How often ``wait_announced`` re-reads an empty directory."""


async def announced(node: PeerNode, timeout: float = 5.0) -> list[Announced]:
    """Every model some live server of the swarm announces now, with the name on its card."""
    from meshinfer.p2p.directory import list_models

    return [Announced(e.card.model_id, e.card.name) for e in await list_models(node, timeout=timeout)]


async def wait_announced(node: PeerNode, wait: float, timeout: float = 5.0) -> list[Announced]:
    """``announced(node)``, re-read every ``LISTING_POLL_S`` for up to ``wait`` seconds while it is empty."""
    deadline = time.monotonic() + wait
    while True:
        with contextlib.suppress(Exception):  # a failed read counts as an empty one
            if found := await announced(node, timeout):
                return found
        if time.monotonic() >= deadline:
            return []
        await asyncio.sleep(LISTING_POLL_S)


class AutoLoader:
    """Opens the swarm's models into ``table`` (see the module docstring)."""

    def __init__(self, table: ModelTable, open_model: Callable[[str, str], Gateway],
                 listing: Callable[[], Awaitable[list[Announced]]], *, loaded: Iterable[str] = (),
                 opened: Iterable[str] = (), max_models: int, refresh_s: float) -> None:
        self.table = table
        self.open_model = open_model
        """``(model_id, served name) -> Gateway``; blocking, run in a worker thread."""
        self.listing = listing
        self.loaded: set[str] = set(loaded)
        """Model ids served already (the explicit ``--model``s, and those this loader opened)."""
        self.opened: list[str] = list(opened)
        """Served names of the models opened for ``auto``, in order (they count against ``max_models``; the first
        model of a gateway with no explicit ``--model`` too)."""
        self.max_models = max_models
        self.refresh_s = refresh_s
        self._over: set[str] = set()  # model ids already logged as over the bound
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> list[str]:
        """Read the directory once and open the models that appeared (see the module docstring); returns the
        names added."""
        try:
            listing = await self.listing()
        except Exception as err:
            log.warning("--model auto: reading the swarm's model directory failed: %s", err)
            return []
        plan = plan_auto(listing, self.loaded, len(self.opened), self.max_models)
        for model in plan.over:
            if model.model_id not in self._over:
                self._over.add(model.model_id)
                log.warning("--model auto: not loading %s (%s): --auto-max-models %d reached", model.model_id,
                            model.name or "no name", self.max_models)
        added: list[str] = []
        for model in plan.open:
            name = served_name(model, self.table.names)
            try:
                gateway = await asyncio.to_thread(self.open_model, model.model_id, name)
            except Exception as err:
                log.warning("--model auto: cannot open %s (%s) now, retried on the next refresh: %s",
                            model.model_id, model.name or "no name", err)
                continue
            name = served_name(model, self.table.names) if name in self.table.names else name
            gateway.model_name = name
            self.table.add(name, gateway)
            self.loaded.add(model.model_id)
            self.opened.append(name)
            added.append(name)
            log.info("--model auto: serving %s as %r", model.model_id, name)
        return added

    def start(self) -> AutoLoader:
        """Refresh every ``refresh_s`` in the background (call on the app's loop)."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(self.refresh_s)
                await self.refresh()

        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(loop(), name="meshinfer-api-auto-models")
        return self

    async def aclose(self) -> None:
        """Stop the background refresh (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task, errors=(BaseException,))
