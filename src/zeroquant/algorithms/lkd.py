"""Layer-by-layer knowledge distillation (ZeroQuant's LKD), with block reconstruction's later refinements.

For block k the target is the FP block's output on the FP model's input to it; the student is block k with
fake-quantized linears, fed (LKDConfig.inputs) the same FP input as in the paper, the quantized model's own
input (the outputs of the blocks already quantized, so the block learns to correct the error built up before
it), or an element-wise random mix of the two (QDrop). What trains (LKDConfig.train):
- "rounding": a rounding offset in [-0.5, 0.5] per weight and a clipping factor for each group's range, moved
  by the sign of their gradient (AutoRound's rule); the integers never leave their range;
- "weights": the master weights through the straight-through estimator (the paper), with Adam, and the
  clipping factors;
- "all": both.
The best iterate on held-apart calibration batches is kept, so a block never ends worse than it started (from
round-to-nearest, or from the integers a `start` function such as GPTQ hands over). Only the current block and
the cached hidden states live on the training device; zeroquant.algorithms.blockwise runs the blocks.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zeroquant.algorithms.blockwise import BlockInputs, Hidden, call_block, to_device
from zeroquant.algorithms.job import Job, compute_device
from zeroquant.core import quant as Q
from zeroquant.core.config import LinearRule
from zeroquant.core.errors import ZeroQuantError
from zeroquant.models.adapters import linear_weight
from zeroquant.nn.qlinear import QuantLinear

INPUTS = ("fp", "quantized", "mixed")
TRAIN = ("rounding", "weights", "all")
CLIP_MIN = 0.5  # a group's range may shrink to half its extent, never grow (its extreme weights then clamp)
MAX_SIGN_LR = 0.005  # AutoRound's step at its 200 steps


@dataclass
class LKDConfig:
    steps: int = 200  # optimizer steps per block, one calibration batch a step
    lr: float | None = None  # rounding offsets and clipping factors (sign steps); None: 1 / steps, at most 0.005
    weight_lr: float = 3e-5  # master weights and biases (Adam), with train="weights" or "all"
    inputs: str = "quantized"  # fp | quantized | mixed
    train: str = "rounding"  # rounding | weights | all
    clip: bool = True  # learn each group's clipping (with the rounding or the weights)
    mix: float = 0.5  # inputs="mixed": the chance that an element of the input takes its FP value
    holdout: float = 0.125  # share of the calibration batches held apart to choose the best iterate
    eval_every: int = 10  # steps between judgements on the held-apart batches
    amp: bool = True  # on CUDA, the student's forward in bfloat16 autocast (weights and integers stay exact)
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ZeroQuantError(f"LKD inputs must be one of {INPUTS}, got {self.inputs!r}")
        if self.train not in TRAIN:
            raise ZeroQuantError(f"LKD train must be one of {TRAIN}, got {self.train!r}")
        if self.steps < 0 or self.eval_every < 1 or not 0 <= self.holdout < 1 or not 0 <= self.mix <= 1:
            raise ZeroQuantError("LKD needs steps >= 0, eval_every >= 1, 0 <= holdout < 1 and 0 <= mix <= 1")

    @property
    def sign_lr(self) -> float:
        """Long runs take smaller steps (their sum stays about half a level); short ones keep 0.005: at 1/steps
        a 20-step run moved every clipping factor 5% a step and wrecked SmolLM2 (docs/lkd.md)."""
        return self.lr if self.lr is not None else min(1.0 / max(self.steps, 1), MAX_SIGN_LR)


class Start(NamedTuple):
    """Where a linear's distillation starts: weights that round to nearest onto the given integers with
    (scale, zero) [N, G] (GPTQ's compensated weights; round-to-nearest's are the module's own)."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def rtn_start(module: nn.Module, rule: LinearRule) -> Start:
    """Round-to-nearest's starting point: the module's weights and their range's scale as it will be stored."""
    wq = rule.weight
    w = linear_weight(module).detach().float()
    s, z = Q.weight_scale_zero(w, wq.bits, wq.group_size, wq.symmetric, wq.per_tensor, wq.progressive)
    return Start(w, Q.stored_scale(s, wq.float_scale_dtype), z)


def _stored(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale as stored, with an identity gradient: training sees exactly the integers the model keeps."""
    return s + (Q.stored_scale(s.detach(), dtype) - s).detach()


class FakeQuantLinear(nn.Module):
    """Trainable stand-in for a linear during distillation; `to_quant_linear` freezes it into the QuantLinear
    whose integers, scales and zero points are exactly those of its last forward."""

    def __init__(self, module: nn.Module, rule: LinearRule, act_range=None, start: Start | None = None,
                 train: str = "rounding", clip: bool = True) -> None:
        super().__init__()
        wq = rule.weight
        self.rule = rule
        start = start or rtn_start(module, rule)
        device = linear_weight(module).device
        w, s0, z0 = (t.detach().float().clone().to(device) for t in start)
        self.in_features = w.shape[1]
        self.qmin, self.qmax = Q.qrange(wq.bits, wq.symmetric)
        self.scale_dtype = wq.float_scale_dtype
        self.weight = nn.Parameter(w, requires_grad=train in ("weights", "all"))
        bias = module.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=self.weight.requires_grad)
        self.register_buffer("s0", s0)
        self.register_buffer("z0", z0)
        self.offset = nn.Parameter(torch.zeros_like(w), requires_grad=train in ("rounding", "all"))
        # a per-tensor baseline keeps one shared scale: clipping it per row would change the scheme
        shape = (1, 1) if wq.per_tensor else s0.shape
        self.clip_hi = nn.Parameter(torch.ones(shape, device=device), requires_grad=clip)
        self.clip_lo = nn.Parameter(torch.ones(shape, device=device), requires_grad=clip and not wq.symmetric)
        # The final QuantLinear, built now: the student quantizes activations exactly as it will, and
        # freezing fills its integer weights in place.
        self.quant = QuantLinear.from_weight(linear_weight(module), module.bias, rule, act_range)

    def sign_params(self) -> list[nn.Parameter]:
        return [p for p in (self.offset, self.clip_hi, self.clip_lo) if p.requires_grad]

    def adam_params(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]

    @torch.no_grad()
    def project(self) -> None:
        """Keep the trained values where they mean something: offsets within half a level, clipping in range."""
        self.offset.clamp_(-0.5, 0.5)
        self.clip_hi.clamp_(CLIP_MIN, 1.0)
        self.clip_lo.clamp_(CLIP_MIN, 1.0)

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, G] scale and zero point of the clipped range. At clip factors of 1 they are exactly the start's:
        the start's range is [(qmin - z0) s0, (qmax - z0) s0], scaled by clip_lo and clip_hi."""
        s0, z0, span = self.s0, self.z0, self.qmax - self.qmin
        if self.rule.weight.symmetric:
            return _stored(s0 * self.clip_hi, self.scale_dtype), z0
        grow = ((self.clip_hi - 1) * (self.qmax - z0) - (self.clip_lo - 1) * (self.qmin - z0)) / span
        s = _stored(s0 * (1 + grow), self.scale_dtype).clamp_min(Q.EPS)
        row = self.quant.w_row_scale
        if row is not None:  # progressive: clipping moves in whole steps of the row scale
            s = row * torch.clamp(Q.round_ste(s / row), 1, 16)
        lo = self.clip_lo * (self.qmin - z0) * s0
        z = torch.clamp(Q.round_ste(self.qmin - lo / s), self.qmin, self.qmax)
        if row is not None:  # and keeps every level of the group inside int8 (core.quant.progressive_group)
            zlo, zhi = Q.progressive_zero_range((s / row).detach())
            z = torch.minimum(torch.maximum(z, zlo), zhi)
        return s, z

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(integers [N, K] as floats, scale [N, G], zero [N, G]) with straight-through gradients."""
        s, z = self.scale_zero()
        k, gs = self.in_features, self.quant.group_size
        q = Q.fake_quantize_int(self.weight, Q.expand_groups(s, k, gs), Q.expand_groups(z, k, gs),
                                self.rule.weight.bits, self.rule.weight.symmetric, self.offset)
        return q, s, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s, z = self.quantized()
        k, gs = self.in_features, self.quant.group_size
        w = (q - Q.expand_groups(z, k, gs)) * Q.expand_groups(s, k, gs)
        x = self.quant.fake_quant_input(x)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """Freeze the integers, scales, zero points and bias into the QuantLinear."""
        q, s, z = self.quantized()
        wq = self.rule.weight
        self.quant.set_int_weight(q.to(Q.storage_dtype(wq.bits, wq.symmetric)), s, z)
        if self.bias is not None:
            self.quant.bias.copy_(self.bias)
        return self.quant


def _split(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """(training, held-apart) batch indices: the last share held apart; with one batch it does both jobs."""
    held = min(n - 1, max(1, round(n * holdout))) if n > 1 and holdout > 0 else 0
    train = list(range(n - held))
    return train, (list(range(n - held, n)) if held else train)


class _Student:
    """The block being distilled: its fake-quantized copy, what feeds it and what it must match."""

    def __init__(self, block: nn.Module, inputs: BlockInputs, targets: Hidden, cfg: LKDConfig,
                 fq: dict[str, FakeQuantLinear], device: torch.device) -> None:
        self.block, self.inputs, self.targets, self.cfg, self.fq = block, inputs, targets, cfg, fq
        self.ctx = [to_device(c, device, torch.float32) for c in inputs.ctx]
        self.amp = torch.autocast("cuda", torch.bfloat16) if cfg.amp and device.type == "cuda" else nullcontext()
        self.gen = torch.Generator(device).manual_seed(cfg.seed * 7919 + inputs.index)
        self.stream = inputs.fp if cfg.inputs == "fp" else inputs.quant
        self.ranks = inputs.ranks
        self.here = {g: j for j, g in enumerate(inputs.ids)}  # global batch index -> position in this process
        if self.ranks.world > 1 and cfg.inputs == "mixed":
            raise ZeroQuantError("LKD inputs='mixed' runs in one process only (its random mask follows one stream)")

    def input(self, j: int, train: bool) -> torch.Tensor:
        x = self.stream.get(j).float()
        if train and self.cfg.inputs == "mixed":
            keep_fp = torch.rand(x.shape, device=x.device, generator=self.gen) < self.cfg.mix
            x = torch.where(keep_fp, self.inputs.fp.get(j).float(), x)
        return x

    def loss(self, i: int, train: bool) -> torch.Tensor:
        """The loss on global batch i (held by this process)."""
        j = self.here[i]
        with self.amp:
            out = call_block(self.block, self.input(j, train), *self.ctx[j])
        return F.mse_loss(out.float(), self.targets.get(j).float())

    @torch.no_grad()
    def judge(self, batches: list[int]) -> float:
        """Mean loss over the global batches `batches`, each computed by its holder and added in their order."""
        mine = {i: self.loss(i, False).item() for i in batches if i in self.here}
        losses = {i: v for part in self.ranks.gather(mine) for i, v in part.items()}
        return sum(losses[i] for i in batches) / len(batches)

    def snapshot(self) -> dict:
        return {name: {n: t.detach().clone() for n, t in m.named_parameters()} for name, m in self.fq.items()}

    @torch.no_grad()
    def restore(self, snap: dict) -> None:
        for name, m in self.fq.items():
            for n, t in m.named_parameters():
                t.copy_(snap[name][n])


def _train(student: _Student, cfg: LKDConfig, desc: str, progress: bool) -> dict:
    """Sign steps on offsets and clipping, Adam on master weights, both decayed linearly to zero; returns the
    block's report row. The best iterate on the held-apart batches is restored at the end."""
    train_idx, held = _split(student.inputs.total, cfg.holdout)
    sign = [p for m in student.fq.values() for p in m.sign_params()]
    adam_params = [p for m in student.fq.values() for p in m.adam_params()]
    adam = torch.optim.Adam(adam_params, lr=cfg.weight_lr) if adam_params else None
    order = torch.Generator().manual_seed(cfg.seed + 104729 * student.inputs.index)
    start = best = student.judge(held)
    best_step, snap = 0, student.snapshot()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    perm: list[int] = []
    for step in bar:
        if not perm:
            perm = [train_idx[j] for j in torch.randperm(len(train_idx), generator=order).tolist()]
        decay = 1 - step / cfg.steps
        i = perm.pop()
        for p in sign + adam_params:
            p.grad = None
        if i in student.here:
            with torch.enable_grad():  # callers may hold no_grad; training needs autograd
                student.loss(i, True).backward()
        student.ranks.share_grads(sign + adam_params, student.ranks.holder(i))
        with torch.no_grad():
            for p in sign:
                if p.grad is not None:  # None: the block never called this linear
                    p.add_(p.grad.sign(), alpha=-cfg.sign_lr * decay)
        if adam is not None:
            adam.param_groups[0]["lr"] = cfg.weight_lr * decay
            adam.step()
        for m in student.fq.values():
            m.project()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            now = student.judge(held)
            if now < best:
                best, best_step, snap = now, step + 1, student.snapshot()
            bar.set_postfix(held=f"{now:.3e}", best=f"{best:.3e}")
    student.restore(snap)
    return {"block": student.inputs.index, "mse_before": start, "mse_after": best, "best_step": best_step,
            "recovered": 0.0 if start == 0 else 1 - best / start, "kept_start": best_step == 0,
            "judged_on": "held-apart" if held != train_idx else "training"}


# A start function: given block k on the device, its inputs and the stream the student reads, the starting
# points of some of its linears (name in the block -> Start); the others start from round-to-nearest.
StartFn = Callable[[nn.Module, BlockInputs, Hidden], dict[str, Start]]


def lkd_step(by_block: dict[int, list], cfg: LKDConfig, ranges: dict, device: torch.device, table: list[dict],
             start: StartFn | None = None, progress: bool = True, n_blocks: int | None = None):
    """A blockwise.Step that distills each block's targets (Targets, grouped by block index) and appends its
    row to `table`.

    The student trains in float32 (or bfloat16 autocast on CUDA); the finished block is cast back to the
    teacher's dtype, its QuantLinear scales keeping their own."""

    def step(teacher: nn.Module, inputs: BlockInputs, fp_out: Hidden) -> nn.Module:
        t0 = time.perf_counter()
        ts = by_block.get(inputs.index, [])
        stream = inputs.fp if cfg.inputs == "fp" else inputs.quant
        starts = start(teacher, inputs, stream) if start is not None and ts else {}
        dtype = next(teacher.parameters()).dtype
        block = copy.deepcopy(teacher).float()
        fq = {}
        for t in ts:
            mod = block.get_submodule(t.local)
            fq[t.local] = FakeQuantLinear(mod, t.rule, ranges.get(t.name), starts.get(t.local), cfg.train,
                                          cfg.clip).to(device)
            block.set_submodule(t.local, fq[t.local])
        block.train(False)  # no dropout: the target is the deterministic FP block
        if fq:
            desc = f"LKD block {inputs.index + 1}/{n_blocks or '?'}"
            row = _train(_Student(block, inputs, fp_out, cfg, fq, device), cfg, desc, progress)
            for name, m in fq.items():
                block.set_submodule(name, m.to_quant_linear())
            row["seconds"] = time.perf_counter() - t0
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            table.append(row)
        return block.to(dtype).requires_grad_(False)  # QuantLinear keeps its scales' dtype through the cast

    return step


def check_finite(table: list[dict]) -> None:
    if not all(math.isfinite(r["mse_after"]) for r in table):
        raise ZeroQuantError("distillation diverged (non-finite loss); lower the learning rate")


TIMINGS = ("seconds", "peak_gib")


def report(cfg: LKDConfig, table: list[dict]) -> dict:
    """What a checkpoint records of its distillation: the settings and each block's held-apart error (not its
    time or memory, so that seeded runs write identical files)."""
    return {"config": asdict(cfg), "blocks": [{k: v for k, v in r.items() if k not in TIMINGS} for r in table]}


class LKD:
    """The distillation step: each block's targets trained toward the FP block (lkd_step), starting from
    `start`'s integers where given (e.g. GPTQ's), else from round-to-nearest; its table goes to job.state.lkd.
    The pipeline runs on `device` (LKDConfig.device, else the GPU when there is one)."""

    phase = "swap"

    def __init__(self, job: Job, config: LKDConfig, start: StartFn | None = None, n_blocks: int | None = None) -> None:
        self.streams = frozenset({"fp"} if config.inputs == "fp" else {"fp", "quant"})
        self.device = torch.device(config.device) if config.device else compute_device()
        job.state.lkd = self.table = []
        job.model.requires_grad_(False)
        self.step = lkd_step(job.by_block(), config, job.ranges, self.device, self.table, start, job.progress,
                             n_blocks)

    def block(self, k: int, block: nn.Module, inputs: BlockInputs, fp_out: Hidden) -> nn.Module:
        return self.step(block, inputs, fp_out)

    def record(self, k: int) -> dict | None:
        """What a block store keeps of block k: its row of the table."""
        return next((r for r in self.table if r["block"] == k), None)

    def restore(self, k: int, row: dict | None) -> None:
        if row is not None:
            self.table.append(row)

    def finish(self) -> None:
        check_finite(self.table)
