"""The lies of ``meshinfer.testing.dishonest`` as functions: deterministic per input, the documented sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meshinfer.errors import ConfigError
from meshinfer.testing.dishonest import DishonestConfig, lie, parse_args


def rel_err(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # [P, H] -> [P]
    return (c - r).norm(dim=-1) / r.norm(dim=-1)


def test_noise_is_deterministic_per_input_and_sized_by_sigma() -> None:
    config = DishonestConfig("noise", rate=1.0, sigma=0.05, seed=4)
    x, out = torch.randn(16, 512), 3 * torch.randn(16, 512)
    a, b = lie(out, x, config), lie(out, x, config)
    assert torch.equal(a, b)  # the same input, the same lie
    assert not torch.equal(a, lie(out, x + 1, config))  # another input, other draws
    assert not torch.equal(a, lie(out, x, DishonestConfig("noise", rate=1.0, sigma=0.05, seed=5)))
    assert torch.allclose(rel_err(a, out), torch.full((16,), 0.05), rtol=0.15)


def test_noise_rate_is_the_fraction_of_positions_that_lie() -> None:
    config = DishonestConfig("noise", rate=0.25)
    x = torch.randn(1, 8).expand(400, 8).contiguous()  # the SAME input at 400 positions: drawn per position
    out = torch.randn(400, 8)
    lied = int((lie(out, x, config, session=b"s") != out).any(-1).sum())
    assert 60 < lied < 140
    # a replay of positions 100:200 alone lies exactly as the whole call did there
    whole = lie(out, x, config, session=b"s")
    assert torch.equal(lie(out[100:200], x[100:200], config, session=b"s", start=100), whole[100:200])
    assert DishonestConfig("noise").effective_rate == 0.25 and DishonestConfig("load").effective_rate == 1.0


def test_scale_and_wrong() -> None:
    x, out = torch.randn(4, 256), torch.randn(4, 256, dtype=torch.bfloat16)
    scaled = lie(out, x, DishonestConfig("scale", scale=0.02))
    assert scaled.dtype == torch.bfloat16
    assert torch.allclose(scaled.float(), out.float() * 1.02, rtol=1e-2)
    wrong = lie(out, x, DishonestConfig("wrong")).float()
    ratio = wrong.pow(2).mean(-1).sqrt() / out.float().pow(2).mean(-1).sqrt()
    assert torch.allclose(ratio, torch.ones(4), rtol=0.2) and rel_err(wrong, out.float()).min() > 1.0


def test_parse_args_splits_at_the_double_dash() -> None:
    config, serve = parse_args(["--mode", "skip-block", "--skip-block", "3", "--seed", "2", "--", "--model", "m"])
    assert config == DishonestConfig("skip-block", skip_block=3, seed=2) and serve == ["serve", "--model", "m"]
    assert parse_args([*config.flags(), "--", "serve", "-h"]) == (config, ["serve", "-h"])
    with pytest.raises(ConfigError, match="usage"):
        parse_args(["--mode", "noise"])
    with pytest.raises(ConfigError, match="--rate"):
        DishonestConfig("noise", rate=1.5)
    with pytest.raises(ConfigError, match="--mode"):
        DishonestConfig("honest")


def test_local_swarm_starts_liars_through_the_dishonest_entry_point(tmp_path: Path) -> None:
    from meshinfer.testing.swarm import LocalSwarm

    liar = DishonestConfig("scale", scale=0.05)
    swarm = LocalSwarm(tmp_path, [(0, 2), (2, 4)], dishonest={1: liar})
    assert swarm.dishonest == {1: liar}
    with pytest.raises(ConfigError, match="dishonest= keys"):
        LocalSwarm(tmp_path, [(0, 2)], dishonest={1: liar})
