"""Static per-tensor activation ranges (the PTQ baseline): min/max of each static-rule target's input over the
calibration batches, watched while the FP block computes its outputs on the FP stream."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from zeroquant.algorithms.ranks import ONE, Ranks
from zeroquant.algorithms.targets import Target, by_block


class StaticRanges:
    """Writes full name -> (min, max) of each static-rule target's input into `ranges` (the job's)."""

    phase = "observe"
    streams = frozenset({"fp"})

    def __init__(self, targets: list[Target], ranges: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.by_block = by_block([t for t in targets if t.rule.act is not None and not t.rule.act.dynamic])
        self.ranges = ranges

    def _hook(self, name: str):
        def fn(_mod, args):
            x = args[0].detach().float()
            lo, hi = x.min(), x.max()
            if name in self.ranges:
                lo, hi = torch.minimum(lo, self.ranges[name][0]), torch.maximum(hi, self.ranges[name][1])
            self.ranges[name] = (lo, hi)

        return fn

    @contextmanager
    def watch(self, k: int, block: nn.Module, ranks: Ranks = ONE) -> Iterator[None]:
        """Hooks on block k's static-rule targets while the block runs; then the ranges are reduced over the
        processes (min and max are exact in any order)."""
        targets = self.by_block.get(k, [])
        handles = [block.get_submodule(t.local).register_forward_pre_hook(self._hook(t.name)) for t in targets]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        for t in targets:
            lo, hi = self.ranges[t.name]
            self.ranges[t.name] = (ranks.reduce(lo.clone(), "min"), ranks.reduce(hi.clone(), "max"))
