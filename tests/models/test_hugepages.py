"""``models.hugepages``: large weights move into huge-page-advised memory with their values, sharing and
gradients flags unchanged; small ones stay; checkpoints load that way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from meshinfer.models import hugepages
from meshinfer.models.checkpoint import open_checkpoint
from meshinfer.models.hugepages import rehome, supported, thp_mode
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.types import BlockRange


def _flags_of(address: int) -> set[str]:
    """The VmFlags of this process's mapping that holds ``address`` (``hg``: advised MADV_HUGEPAGE)."""
    current: tuple[int, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            current = (lo, hi)
        elif line.startswith("VmFlags:") and current is not None and current[0] <= address < current[1]:
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(512, 2048, bias=False)  # 4 MiB of float32
        self.small = nn.Parameter(torch.randn(16), requires_grad=False)
        self.register_buffer("table", torch.arange(1 << 20, dtype=torch.float32))  # 4 MiB buffer
        self.tied = self.big.weight  # the same parameter under two names


def test_thp_mode_reads_the_bracketed_word(tmp_path: Path) -> None:
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert thp_mode(f) == "madvise"
    f.write_text("[never] madvise always\n")
    assert thp_mode(f) == "never"
    f.write_text("garbage\n")
    assert thp_mode(f) is None
    assert thp_mode(tmp_path / "missing") is None


def test_rehome_keeps_values_and_sharing_and_moves_only_large_tensors() -> None:
    torch.manual_seed(0)
    toy = Toy()
    weight, small, table = toy.big.weight.detach().clone(), toy.small.data_ptr(), toy.table.clone()
    x = torch.randn(3, 512)
    expected = toy.big(x).detach()
    moved = rehome(toy)
    if not supported():
        assert moved == 0
        pytest.skip("transparent huge pages are off here: nothing to move")
    assert moved == 2 * 4 * 1024 * 1024  # the Linear's weight (once, though tied) and the buffer
    assert torch.equal(toy.big.weight, weight) and torch.equal(toy.table, table)
    assert toy.small.data_ptr() == small  # below one huge page: left alone
    assert toy.tied.data_ptr() == toy.big.weight.data_ptr()  # still one tensor
    assert toy.big.weight.requires_grad and isinstance(toy.big.weight, nn.Parameter)
    assert torch.equal(toy.big(x).detach(), expected)
    assert toy.big.weight.data_ptr() % 64 == 0
    assert "hg" in _flags_of(toy.big.weight.data_ptr()) and "hg" in _flags_of(toy.table.data_ptr())


def test_rehome_does_nothing_where_the_kernel_says_never(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "thp_mode", lambda path=None: "never")
    toy = Toy()
    ptr = toy.big.weight.data_ptr()
    assert rehome(toy) == 0 and toy.big.weight.data_ptr() == ptr


def test_checkpoint_weights_load_into_huge_page_advised_memory(meshinfer_cache_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if not supported():
        pytest.skip("transparent huge pages are off here")
    monkeypatch.setattr(hugepages, "MIN_BYTES", 4096)  # the tiny model's tensors are far below 2 MiB
    ckpt = open_checkpoint(tiny_checkpoint("llama"))
    span = ckpt.load_span(BlockRange(0, 1))
    head = ckpt.load_head()
    big = [t for t in [*span.parameters(), *head.parameters()] if t.numel() * t.element_size() >= 4096]
    assert big
    for t in big:
        assert "hg" in _flags_of(t.data_ptr())
