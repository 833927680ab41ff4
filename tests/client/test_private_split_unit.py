"""The private split's pieces without a swarm: the middle range and its one-line errors, the flag, and the local
blocks composed with the middle ones equal to the whole model (real tiny checkpoint, no network)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
import torch

from meshinfer.cli.generate import add_client_flags, client_config
from meshinfer.client.config import ClientConfig
from meshinfer.client.private_split import PrivateBlocks, ensure_private_blocks, private_middle
from meshinfer.errors import ConfigError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.types import BlockRange


@pytest.mark.parametrize(("k", "n", "middle"), [(1, 4, BlockRange(1, 3)), (2, 5, BlockRange(2, 3)),
                                                (1, 3, BlockRange(1, 2)), (15, 32, BlockRange(15, 17))])
def test_middle_is_what_servers_run(k: int, n: int, middle: BlockRange) -> None:
    assert private_middle(k, n) == middle


@pytest.mark.parametrize(("k", "n", "message"), [
    (2, 4, "--private-blocks 2 would keep all 4 blocks of this model on the client (2 x 2 >= 4): use at most 1"),
    (1, 2, "--private-blocks 1 would keep all 2 blocks of this model on the client (2 x 1 >= 2): use at most 0"),
    (0, 4, "--private-blocks must be >= 1 for a private split, got 0"),
])
def test_a_split_that_leaves_servers_nothing_is_a_one_line_config_error(k: int, n: int, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        private_middle(k, n)
    assert str(err.value) == message


def test_the_flag_reaches_the_config_and_negative_values_are_refused() -> None:
    parser = argparse.ArgumentParser()
    add_client_flags(parser)
    assert client_config(parser.parse_args(["--private-blocks", "2"])).private_blocks == 2
    assert client_config(parser.parse_args([])).private_blocks == 0
    with pytest.raises(ConfigError, match=r"^--private-blocks must be >= 0 \(0: off\), got -1$"):
        ClientConfig(private_blocks=-1)


def test_too_many_private_blocks_fail_before_any_fetch(tiny_checkpoints: dict[tuple[str, str], Path]) -> None:
    path = tiny_checkpoints[("llama", "default")]
    with pytest.raises(ConfigError, match=r"^--private-blocks 2 would keep all 4 blocks"):
        asyncio.run(ensure_private_blocks(None, str(path), path, 2))  # no node: a fetch would be a UsageError
    assert asyncio.run(ensure_private_blocks(None, str(path), path, 1)) == path  # a directory: as is


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_local_blocks_around_the_middle_are_the_whole_model(family: str,
                                                            tiny_checkpoints: dict[tuple[str, str], Path]) -> None:
    ckpt = Checkpoint(tiny_checkpoints[(family, "default")])
    blocks = PrivateBlocks.load(ckpt, 1, torch.float32, torch.device("cpu"))
    assert (blocks.front.range, blocks.middle, blocks.back.range) == (BlockRange(0, 1), BlockRange(1, 3),
                                                                      BlockRange(3, 4))
    assert blocks.k == 1 and blocks.weight_bytes() > 0 and blocks.cache_bytes(16) > 0
    middle, whole = ckpt.load_span(blocks.middle), ckpt.load_span(BlockRange(0, 4))
    x = torch.randn(1, 7, ckpt.spec.hidden_size, generator=torch.Generator().manual_seed(0))  # [1, T, H]
    caches = [span.new_cache(8) for span in (blocks.front, middle, blocks.back)]
    y = x
    for span, cache in zip((blocks.front, middle, blocks.back), caches, strict=True):
        y = span(y, cache)
    torch.testing.assert_close(y, whole(x, whole.new_cache(8)))


def test_a_server_with_the_public_weights_inverts_k1_states_to_the_prompt(
        tiny_checkpoints: dict[tuple[str, str], Path]) -> None:
    """The limit the privacy table must state: what a K=1 split's first server receives (block 0's outputs) gives
    the prompt back to anyone holding block 0's weights (every server can fetch them by the model id): token by
    token, the vocabulary entry whose exact block-0 output, after the tokens found so far, is the one received.
    (On SmolLM2-135M, with a 64-candidate prefilter, the same search recovered 66 of 67 tokens of a real prompt.)"""
    ckpt = Checkpoint(tiny_checkpoints[("llama", "default")])
    blocks = PrivateBlocks.load(ckpt, 1, torch.float32, torch.device("cpu"))
    head = ckpt.load_head()
    prompt = [5, 17, 42, 7, 99, 3, 17, 42, 250, 11]
    front = blocks.front
    with torch.inference_mode():
        seen = front(head.embed(torch.tensor([prompt])), front.new_cache(len(prompt)))[0]  # [T, H] on the wire
        vocab = torch.arange(ckpt.spec.vocab_size)
        found: list[int] = []
        for i in range(len(prompt)):
            seqs = torch.cat([torch.tensor(found, dtype=torch.long).expand(len(vocab), i), vocab[:, None]], dim=1)
            out = front(head.embed(seqs), front.new_cache(i + 1, batch=len(vocab)))[:, -1]  # [V, H]
            found.append(int((out - seen[i]).norm(dim=-1).argmin()))
    assert found == prompt
