"""Round-to-nearest: a block's targets become QuantLinears from their float weights (no data; static
activation rules take the ranges an earlier step found)."""

from __future__ import annotations

from torch import nn

from zeroquant.algorithms.job import Job
from zeroquant.models.adapters import linear_weight
from zeroquant.nn.qlinear import QuantLinear


class RoundToNearest:
    phase = "swap"
    streams = frozenset()

    def __init__(self, job: Job) -> None:
        self.by_block, self.ranges = job.by_block(), job.ranges

    def block(self, k: int, block: nn.Module, _inputs, _fp_out) -> nn.Module:
        for t in self.by_block.get(k, []):
            m = block.get_submodule(t.local)
            block.set_submodule(t.local, QuantLinear.from_weight(linear_weight(m), m.bias, t.rule,
                                                                 self.ranges.get(t.name)))
        return block
