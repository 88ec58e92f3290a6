"""Round-to-nearest: every target becomes a QuantLinear from its float weights (no data; static activation
rules take the ranges an earlier step found)."""

from __future__ import annotations

from tqdm.auto import tqdm

from zeroquant.algorithms.job import Job
from zeroquant.models.adapters import linear_weight
from zeroquant.nn.qlinear import QuantLinear


class RoundToNearest:
    def __call__(self, job: Job) -> None:
        for t in tqdm(job.targets, desc=f"quantizing ({job.state.config.name})", disable=not job.progress,
                      leave=False):
            ql = QuantLinear.from_weight(linear_weight(t.module), t.module.bias, t.rule, job.ranges.get(t.name))
            job.model.set_submodule(t.name, ql)
