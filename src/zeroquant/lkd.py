"""Layer-by-layer knowledge distillation (ZeroQuant's LKD).

For block k: the input is the FP teacher's output of blocks 1..k-1 (cached and carried forward), the
loss is MSE(teacher_k(x), student_k(x)) where student_k is block k with fake-quantized linears, and only
student_k trains (weights through the straight-through estimator, optionally the weight scales too).
Only the current block (teacher + student) and the cached hidden states live on the training device.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import quant as Q
from .adapters import get_blocks
from .blockwise import call_block, capture_block_inputs, to_device
from .calib import Batch
from .config import LinearRule
from .errors import ZeroQuantError
from .gptq import GPTQResult, InputHessians, batch_masks, gptq_round
from .qlinear import QuantLinear, linear_weight


@dataclass
class LKDConfig:
    steps: int = 400  # optimizer steps per block
    lr: float = 3e-5  # weights and biases; scales use lr * scale_lr_mult
    train_scales: bool = True
    scale_lr_mult: float = 1.0
    optimizer: str = "adam"  # adam | sgd
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0


class FakeQuantLinear(nn.Module):
    """Trainable stand-in for a linear during distillation: float master weight, STE-quantized forward."""

    def __init__(self, module: nn.Module, rule: LinearRule, act_range=None, train_scales: bool = True,
                 init: GPTQResult | None = None) -> None:
        """init: GPTQ's rounding to start from (its grid and its compensated weights); default: round-to-nearest
        of the module's own weights."""
        super().__init__()
        wq = rule.weight
        self.rule = rule
        w = linear_weight(module).detach().float().clone()
        self.in_features = w.shape[1]
        if init is None:
            s, z = Q.weight_scale_zero(w, wq.bits, wq.group_size, wq.symmetric, wq.per_tensor)
        else:  # compensated weights: the first forward rounds them to GPTQ's integers, and each keeps its
            # distance to a rounding boundary, which distillation moves it across
            s, z, w = (t.to(w.device).float() for t in init[1:])
        self.weight = nn.Parameter(w)
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().float().clone())
        # A per-tensor baseline keeps one shared scale: training it per row would change the scheme.
        self.w_scale = nn.Parameter(s, requires_grad=train_scales and not wq.per_tensor)
        self.register_buffer("w_zero", z)
        # The final QuantLinear, built now: the student quantizes activations exactly as it will, and
        # freezing fills its integer weights in place.
        self.quant = QuantLinear.from_float(module, rule, act_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wq = self.rule.weight
        k = self.in_features
        scale = self.w_scale.abs().clamp_min(Q.EPS)
        gs = self.quant.group_size
        w = Q.fake_quantize(self.weight, Q.expand_groups(scale, k, gs), Q.expand_groups(self.w_zero, k, gs), wq.bits,
                            wq.symmetric)
        x = self.quant.fake_quant_input(x)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """Freeze the trained weight, scale and bias into the integer QuantLinear."""
        ql = self.quant
        ql.set_weight(self.weight, self.w_scale.abs().clamp_min(Q.EPS), self.w_zero)
        if self.bias is not None:
            ql.bias.copy_(self.bias)
        return ql


def _block_mse(block, inputs, targets, ctx) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for (args, kwargs), h, y in zip(ctx, inputs, targets, strict=True):
            out = call_block(block, h, args, kwargs).float()
            total += F.mse_loss(out, y.float(), reduction="sum").item()
            n += y.numel()
    return total / n


def _optimizer(fq: dict[str, FakeQuantLinear], cfg: LKDConfig) -> torch.optim.Optimizer:
    params = [p for m in fq.values() for p in (m.weight, m.bias) if p is not None]
    scales = [m.w_scale for m in fq.values() if m.w_scale.requires_grad]
    groups = [{"params": params, "lr": cfg.lr}]
    if scales:
        groups.append({"params": scales, "lr": cfg.lr * cfg.scale_lr_mult})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    raise ZeroQuantError(f"unknown optimizer {cfg.optimizer!r}; use adam or sgd")


def distill(model: nn.Module, targets, batches: list[Batch], cfg: LKDConfig, ranges: dict | None = None,
            allow_generic: bool = False, progress: bool = True) -> list[dict]:
    """Quantize `model` in place block by block with LKD; returns the per-block MSE table.
    `ranges` holds the calibrated input (min, max) of linears with static activation quantization.

    The student always trains in float32 (fp16 gradients of a small MSE underflow); the teacher runs
    in the model's dtype, and the finished block is cast back to it.
    """
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    blocks = get_blocks(model, allow_generic)
    model.requires_grad_(False)
    ranges = ranges or {}  # static activation ranges per linear, from the FP model on `batches`
    by_block: dict[int, list] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)

    captured = capture_block_inputs(model, blocks[0], batches)
    masks = batch_masks(batches)
    ctx = [(to_device(a, device), to_device(k, device)) for a, k in captured]
    del captured
    hidden = [a[0] for a, _ in ctx]
    dtype = hidden[0].dtype
    ctx32 = ctx if dtype == torch.float32 else [to_device(c, device, torch.float32) for c in ctx]

    table = []
    for k, teacher in enumerate(blocks):
        home = next(teacher.parameters()).device
        teacher.to(device)
        gptq_mods = {t.local: teacher.get_submodule(t.local) for t in by_block.get(k, []) if t.rule.rounding == "gptq"}
        outs = []
        with torch.no_grad(), InputHessians(gptq_mods) as hs:
            for (a, kw), h, mask in zip(ctx, hidden, masks, strict=True):
                hs.only(mask)
                outs.append(call_block(teacher, h, a, kw))
        hessians = hs.hessians
        student = copy.deepcopy(teacher).float()
        teacher.to(home)
        fq = {}
        for t in by_block.get(k, []):
            mod = student.get_submodule(t.local)
            init = gptq_round(linear_weight(mod), hessians[t.local], t.rule.weight) if t.local in hessians else None
            fq[t.local] = FakeQuantLinear(mod, t.rule, ranges.get(t.name), cfg.train_scales, init).to(device)
            student.set_submodule(t.local, fq[t.local])
        h32 = hidden if dtype == torch.float32 else [h.float() for h in hidden]
        before = _block_mse(student, h32, outs, ctx32)
        start = {name: {n: t.detach().clone() for n, t in m.state_dict().items()} for name, m in fq.items()}
        opt = _optimizer(fq, cfg)
        student.train(False)  # no dropout: the target is the deterministic FP block
        bar = tqdm(range(cfg.steps if fq else 0), desc=f"LKD block {k + 1}/{len(blocks)}", disable=not progress,
                   leave=False)
        for step in bar:
            i = step % len(hidden)
            a, kw = ctx32[i]
            with torch.enable_grad():  # callers may hold no_grad; training needs autograd
                loss = F.mse_loss(call_block(student, h32[i], a, kw), outs[i].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            if step % 10 == 0:  # .item() syncs the GPU: not every step
                bar.set_postfix(loss=f"{loss.item():.3e}")
        after = _block_mse(student, h32, outs, ctx32) if fq else before
        kept_start = after > before  # training made this block worse on its own data: keep where it started
        if kept_start:
            for name, m in fq.items():
                m.load_state_dict(start[name])
            after = before
        for name, m in fq.items():
            student.set_submodule(name, m.to_quant_linear())
        student.to(dtype).requires_grad_(False)  # QuantLinear keeps its scales float32 through the cast
        blocks[k] = student.to(home)
        del teacher, fq, opt, h32, start
        hidden = outs  # the teacher's output feeds the next block
        table.append({"block": k, "mse_before": before, "mse_after": after,
                      "recovered": 0.0 if before == 0 else 1 - after / before, "kept_start": kept_start})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.zeroquant_lkd = table
    if not all(math.isfinite(r["mse_after"]) for r in table):
        raise ZeroQuantError("distillation diverged (non-finite loss); lower the learning rate")
    return table


@torch.no_grad()
def blockwise_mse(fp_model: nn.Module, q_model: nn.Module, batches: list[Batch],
                  allow_generic: bool = False) -> list[float]:
    """Per-block output MSE of the quantized model's blocks against the FP blocks, each fed the FP
    model's own input to that block (the quantity LKD minimises), on `batches`."""
    fp_blocks, q_blocks = get_blocks(fp_model, allow_generic), get_blocks(q_model, allow_generic)
    ctx = capture_block_inputs(fp_model, fp_blocks[0], batches)
    hidden = [a[0] for a, _ in ctx]
    out = []
    for fb, qb in zip(fp_blocks, q_blocks, strict=True):
        targets = [call_block(fb, h, a, kw) for (a, kw), h in zip(ctx, hidden, strict=True)]
        out.append(_block_mse(qb, hidden, targets, ctx))
        hidden = targets
    return out
