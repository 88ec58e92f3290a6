"""What the steps of quantize() share (a Job). Each step (blockwise.BlockStep) lives in its own module and
reads and writes only the job: none imports another."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from zeroquant.algorithms.calib import Batch
from zeroquant.algorithms.ranks import ONE, Ranks
from zeroquant.algorithms.targets import Target, by_block
from zeroquant.core.state import QuantState


@dataclass
class Job:
    """The model being quantized (quantize()'s copy), the linears to quantize, the calibration batches (None
    for presets that need no data), the static input ranges a step found (full name -> (min, max)) and the
    state that reports go to."""

    model: nn.Module
    targets: list[Target]
    batches: list[Batch] | None
    state: QuantState
    allow_generic: bool = False
    progress: bool = True
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    ranks: Ranks = ONE  # the processes quantizing together (each holds a share of the batches)

    def by_block(self) -> dict[int, list[Target]]:
        return by_block(self.targets)


def compute_device() -> torch.device:
    """Where block-wise steps run a block: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
