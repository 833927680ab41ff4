"""``meshinfer api --model auto``'s pure decisions (``gateway.auto``): names, the bound, what a refresh opens;
and ``ModelTable.add``."""

from __future__ import annotations

import pytest

from meshinfer.errors import ConfigError
from meshinfer.gateway.auto import Announced, check_auto_flags, plan_auto, readable_name, served_name

A = "a" * 32
B = "b" * 32
C = "c" * 32


@pytest.mark.parametrize(("name", "want"), [
    ("smollm2", "smollm2"), ("  tiny-llama_3.1  ", "tiny-llama_3.1"), ("", ""), ("has space", ""),
    (A, ""), ("x" * 65, ""), ("-dash", ""), ("name\n", "name"), ("név", ""),
])
def test_readable_name(name: str, want: str) -> None:
    assert readable_name(name, B) == want


def test_served_name_is_readable_then_unique() -> None:
    assert served_name(Announced(A, "smollm2"), ()) == "smollm2"
    assert served_name(Announced(A, ""), ()) == A[:12]
    assert served_name(Announced(A, A), ()) == A[:12]  # a model fetched by id: its card's name is the id
    assert served_name(Announced(A, "smollm2"), {"smollm2"}) == f"smollm2-{A[:12]}"
    assert served_name(Announced(A, "smollm2"), {"smollm2", f"smollm2-{A[:12]}"}) == A[:12]
    assert served_name(Announced(A, ""), {A[:12]}) == A
    assert served_name(Announced(A, ""), {A[:12], A, f"{A}-2"}) == f"{A}-3"


def test_plan_opens_new_models_up_to_the_bound_in_a_stable_order() -> None:
    listing = [Announced(C, "zeta"), Announced(A, "alpha"), Announced(B, ""), Announced(A, "again")]
    plan = plan_auto(listing, (), 0, 8)
    assert [m.model_id for m in plan.open] == [A, B, C] and not plan.over  # alpha, bbbb..., zeta; A once
    plan = plan_auto(listing, {A}, 1, 2)  # A served already and counted: room for one more
    assert [m.model_id for m in plan.open] == [B] and [m.model_id for m in plan.over] == [C]
    assert plan_auto(listing, {A, B, C}, 3, 2) == plan_auto([], (), 0, 8)  # nothing new, nothing over
    assert plan_auto(listing, (), 5, 2).over == plan_auto(listing, (), 0, 8).open  # over the bound: all listed


def test_auto_flags() -> None:
    check_auto_flags(1, 0.5)
    with pytest.raises(ConfigError, match="--auto-max-models must be >= 1"):
        check_auto_flags(0, 60)
    with pytest.raises(ConfigError, match="--auto-refresh-s must be > 0"):
        check_auto_flags(8, 0)


def test_model_table_add() -> None:
    from types import SimpleNamespace
    from typing import Any

    from meshinfer.gateway.registry import ModelTable

    first: Any = SimpleNamespace(name="first")
    table = ModelTable({"one": first})
    second: Any = SimpleNamespace(name="second")
    table.add("two", second)
    assert table.names == ["one", "two"] and table.get("two") is second and table.primary is first
    with pytest.raises(ValueError, match="served already"):
        table.add("one", second)
