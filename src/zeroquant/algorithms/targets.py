"""The linears a config quantizes in a model (Target), found through the adapter table."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from zeroquant.core.config import LinearRule, QuantConfig
from zeroquant.core.errors import ZeroQuantError
from zeroquant.models.adapters import block_linears, blocks_name, get_arch, get_blocks, linear_weight


@dataclass
class Target:
    """One linear to quantize: where it is and which rule applies."""

    name: str  # full dotted name in the model
    block: int
    local: str  # name relative to its block
    kind: str
    rule: LinearRule
    module: nn.Module


def block_linears_of(model: nn.Module, allow_generic: bool = False) -> Iterator[tuple[str, int, str, str, nn.Module]]:
    """(full name, block index, name in the block, kind, module) of every quantizable linear of the blocks."""
    arch = get_arch(model, allow_generic)
    blocks = get_blocks(model, allow_generic)
    prefix = blocks_name(model, blocks)
    for i, block in enumerate(blocks):
        for local, kind, module in block_linears(block, arch):
            yield f"{prefix}.{i}.{local}", i, local, kind, module


def find_targets(model: nn.Module, config: QuantConfig, allow_generic: bool = False) -> list[Target]:
    targets = [Target(name, i, local, kind, config.rule(kind), module)
               for name, i, local, kind, module in block_linears_of(model, allow_generic)
               if config.rule(kind).weight is not None]
    if not targets:
        raise ZeroQuantError("the config quantizes no linear layer of this model")
    return targets


def by_block(targets: list[Target]) -> dict[int, list[Target]]:
    """Targets grouped by the index of their block, for the block runner's steps."""
    out: dict[int, list[Target]] = {}
    for t in targets:
        out.setdefault(t.block, []).append(t)
    return out


def validate_targets(targets: list[Target]) -> None:
    """Fail before touching the model on shapes the config cannot quantize."""
    for t in targets:
        k = linear_weight(t.module).shape[1]
        if t.rule.weight.bits <= 4 and k % 2:
            raise ZeroQuantError(f"{t.name}: INT4 packing needs an even input size, got {k}")
