"""Which receipts count, and the balances they add up to (issue 23). Pure: no I/O, no clock, no keys.

Contract: a ``Book`` holds verified receipts (``ledger.receipts.verify_receipt`` ran before), at most one per
(client, server, session): the one with the highest ``seq``. ``Book.offer(receipt)`` returns ``"new"`` or
``"newer"`` when it counts, or a refusal naming why:

- ``"replay"``: a receipt of that session with this ``seq`` or a higher one is already held (a copy sent again,
  or an older receipt shown after a newer one);
- ``"shrunk"``: a higher ``seq`` that claims fewer tokens than the one held (receipts are cumulative);
- ``"changed"``: the same session with another model, span length or start time.

``balances(receipts)`` sums, per peer, the work it **served** (block-tokens of receipts naming it as server) and
**used** (as client); ``Balance.credit = served - used``. Anyone holding the same receipts computes the same
balances: two peers that collected the same set agree exactly, whatever the order they saw them in (the newest
receipt of each session wins either way).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from meshinfer.wire.receipts import Receipt

Offer = Literal["new", "newer", "replay", "shrunk", "changed"]
COUNTED: frozenset[Offer] = frozenset({"new", "newer"})


@dataclass(frozen=True)
class Balance:
    """One peer's work in block-tokens, from receipts only."""

    served: int = 0
    used: int = 0
    sessions_served: int = 0
    sessions_used: int = 0

    @property
    def credit(self) -> int:
        return self.served - self.used


def judge(held: Receipt | None, receipt: Receipt) -> Offer:
    """Whether ``receipt`` replaces ``held``, the receipt of the same session held so far (None: none)."""
    if held is None:
        return "new"
    if receipt.seq <= held.seq:
        return "replay"
    if (receipt.model, receipt.blocks, receipt.started) != (held.model, held.blocks, held.started):
        return "changed"
    if receipt.tokens < held.tokens:
        return "shrunk"
    return "newer"


class Book:
    """The newest receipt of each (client, server, session) offered so far."""

    def __init__(self, receipts: Iterable[Receipt] = ()) -> None:
        self._latest: dict[tuple[str, str, str], Receipt] = {}
        for receipt in receipts:
            self.offer(receipt)

    def offer(self, receipt: Receipt) -> Offer:
        verdict = judge(self._latest.get(receipt.key), receipt)
        if verdict in COUNTED:
            self._latest[receipt.key] = receipt
        return verdict

    def held(self, key: tuple[str, str, str]) -> Receipt | None:
        return self._latest.get(key)

    def receipts(self) -> list[Receipt]:
        """The counted receipts, in a stable order (client, server, session)."""
        return [self._latest[key] for key in sorted(self._latest)]

    def __len__(self) -> int:
        return len(self._latest)

    def balances(self) -> dict[str, Balance]:
        return balances(self._latest.values())


def balances(receipts: Iterable[Receipt]) -> dict[str, Balance]:
    """Per peer id: block-tokens served and used over ``receipts`` (one per session: pass a ``Book``'s)."""
    served: dict[str, list[int]] = {}
    used: dict[str, list[int]] = {}
    for receipt in receipts:
        s = served.setdefault(receipt.server, [0, 0])
        s[0] += receipt.work
        s[1] += 1
        u = used.setdefault(receipt.client, [0, 0])
        u[0] += receipt.work
        u[1] += 1
    out: dict[str, Balance] = {}
    for peer in sorted(served.keys() | used.keys()):
        s = served.get(peer, [0, 0])
        u = used.get(peer, [0, 0])
        out[peer] = Balance(served=s[0], used=u[0], sessions_served=s[1], sessions_used=u[1])
    return out
