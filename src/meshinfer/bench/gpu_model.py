"""The random model ``bench gpu`` times: built in memory on a device, block by block, no checkpoint on disk.

Contract: ``build(spec, fmt, device, seed)`` returns a ``(ClientHead, BlockSpan)`` pair covering every block of
``spec`` in bf16 compute: matrices drawn from N(0, 0.02) on the device itself (norm weights 1), untied
embeddings; ``fmt`` ``int4`` quantizes each block as soon as it is built (``models.quant.quantize_block``, the
default int4 groups) and the LM head to int8 (as ``LocalModel`` holds an int4 model), so at most one bf16 block
exists beside the quantized ones. Any error of the quantizer (e.g. a device it does not support yet) propagates.
``weights_read`` is the bytes a decode step reads (blocks + final norm + LM head as held); ``release`` hands
the allocator's cache back. Knows nothing of timing, files or the network.
"""

from __future__ import annotations

import torch
from torch import nn

from meshinfer.models.block import TransformerBlock
from meshinfer.models.device import release_cached
from meshinfer.models.head import ClientHead
from meshinfer.models.quant import QuantConfig, quantize_block, quantize_head, weight_bytes
from meshinfer.models.span import BlockSpan
from meshinfer.models.spec import ModelSpec
from meshinfer.types import BlockRange

STD = 0.02
"""The random weights' standard deviation (the usual initialiser range of Llama configs)."""


def _fill(module: nn.Module, gen: torch.Generator) -> None:
    """Norm weights (1-D) to 1, every matrix (and bias) to N(0, STD), in place on their device."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, STD, generator=gen)


def build(spec: ModelSpec, fmt: str, device: torch.device, seed: int = 0) -> tuple[ClientHead, BlockSpan]:
    """The whole model of ``spec`` on ``device`` in format ``fmt`` (``bf16`` or ``int4``), random weights."""
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks = QuantConfig("int4") if fmt == "int4" else QuantConfig("none")
    layers = []
    for index in range(spec.num_blocks):
        layer = TransformerBlock(spec, index, dtype, device)
        _fill(layer, gen)
        layers.append(quantize_block(layer, blocks))
    span = BlockSpan(spec, BlockRange(0, spec.num_blocks), layers, dtype, device)
    head = ClientHead(spec, dtype, device)
    _fill(head, gen)
    if fmt == "int4":
        quantize_head(head, QuantConfig("int8"))
    return head, span


def weights_read(head: ClientHead, span: BlockSpan) -> int:
    """Bytes of weights one decode step reads: every block's, the final norm and the LM head, as held."""
    return weight_bytes(span) + weight_bytes(head.output) + head.norm.nbytes


def release(device: torch.device) -> None:
    """Give the device allocator's unused blocks back (between formats and configs)."""
    import gc

    gc.collect()
    release_cached(device)
