"""The hub path's argument handling and shard selection (the hub itself is not reachable here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshinfer.errors import CheckpointError, ConfigError
from meshinfer.testing.checkpoints import tiny_config
from meshinfer.types import BlockRange
from meshinfer.weights.hub import is_hub_ref, needed_tensors, parse_hub_ref, shards_for


@pytest.mark.parametrize(("text", "repo", "revision"), [
    ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B", None),
    ("Qwen/Qwen2.5-0.5B-Instruct@main", "Qwen/Qwen2.5-0.5B-Instruct", "main"),
    ("org/name@refs/pr/12", "org/name", "refs/pr/12"),
    ("a/b.c_d-e", "a/b.c_d-e", None),
])
def test_hub_refs(text: str, repo: str, revision: str | None) -> None:
    assert is_hub_ref(text)
    assert parse_hub_ref(text) == (repo, revision)


@pytest.mark.parametrize("text", ["", "name", "/abs/path", "org/", "/name", "a/b/c", "org/na me", "../x",
                                  "org/..", "0123456789abcdef0123456789abcdef"])
def test_not_hub_refs(text: str) -> None:
    assert not is_hub_ref(text)
    with pytest.raises(ConfigError, match="not a hub model name"):
        parse_hub_ref(text)


def test_an_existing_directory_is_not_a_hub_ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_ref("org/name")


@pytest.mark.parametrize(("blocks", "client", "count"), [
    (BlockRange(0, 1), False, 9), (BlockRange(1, 3), False, 18), (None, True, 3), (BlockRange(3, 4), True, 12),
])
def test_needed_tensors(blocks: BlockRange | None, client: bool, count: int) -> None:
    names = needed_tensors(tiny_config("llama"), blocks, client)
    assert len(names) == count
    if blocks is not None:
        assert all(f"model.layers.{i}.input_layernorm.weight" in names for i in blocks.blocks())
    assert ("lm_head.weight" in names) is client


def test_shards_for_picks_only_the_shards_holding_the_span() -> None:
    weight_map = {"model.embed_tokens.weight": "s1", "model.layers.0.x": "s1", "model.layers.1.x": "s2",
                  "model.layers.2.x": "s3", "lm_head.weight": "s3"}
    assert shards_for(weight_map, {"model.layers.1.x"}) == ["s2"]
    assert shards_for(weight_map, {"model.layers.0.x", "model.layers.2.x"}) == ["s1", "s3"]
    assert shards_for(weight_map, set()) == []
    with pytest.raises(CheckpointError, match="lacks 1 needed tensor"):
        shards_for(weight_map, {"model.layers.9.x"})
    with pytest.raises(Exception, match="exceeds"):
        needed_tensors(tiny_config("llama"), BlockRange(2, 8), False)


def test_without_huggingface_hub_a_hub_name_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import sys

    from meshinfer.weights.fetch import ensure_local

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="needs the huggingface_hub package"):
        asyncio.run(ensure_local(None, "org/name", blocks=BlockRange(0, 1), client_part=False))
