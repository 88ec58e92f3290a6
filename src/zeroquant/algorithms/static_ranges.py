"""Static per-tensor activation ranges (the PTQ baseline): min/max of each static-rule target's input over the
calibration batches, seen as the block runner carries the FP model's hidden states through each block."""

from __future__ import annotations

import torch
from torch import nn

from zeroquant.algorithms.blockwise import run_blocks
from zeroquant.algorithms.calib import Batch, model_device
from zeroquant.algorithms.job import Job
from zeroquant.algorithms.targets import Target
from zeroquant.models.adapters import get_blocks


@torch.no_grad()
def collect_input_ranges(model: nn.Module, targets: list[Target], batches: list[Batch], allow_generic: bool = False,
                         progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full name -> (min, max) of each target's input over `batches`."""
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().float()
            lo, hi = x.min(), x.max()
            if name in ranges:
                lo, hi = torch.minimum(lo, ranges[name][0]), torch.maximum(hi, ranges[name][1])
            ranges[name] = (lo, hi)

        return fn

    handles = [t.module.register_forward_pre_hook(hook(t.name)) for t in targets]
    try:
        run_blocks(get_blocks(model, allow_generic), model, batches, lambda block, _inputs, _targets: block,
                   model_device(model), carry_quantized=False, desc="calibrating", progress=progress)
    finally:
        for h in handles:
            h.remove()
    return ranges


class StaticRanges:
    def __call__(self, job: Job) -> None:
        static = [t for t in job.targets if t.rule.act is not None and not t.rule.act.dynamic]
        if static:
            job.ranges.update(collect_input_ranges(job.model, static, job.batches, job.allow_generic, job.progress))
