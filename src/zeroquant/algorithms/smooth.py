"""Outlier smoothing (SmoothQuant), folded into the floating-point model before it is quantized.

A source whose output channels feed only some linears (a pre-LN norm, v_proj -> o_proj, up_proj -> down_proj
in a gated MLP) can divide output channel j by s_j while those linears multiply their input channel j by s_j:
the model computes the same function, and nothing is added at inference. With
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) the few activation channels with huge values shrink and the
weights take up the difference, so token-wise INT8 activations lose less. Where the pairs are comes from the
adapter table (zeroquant.models.adapters); alpha is searched per pair on calibration tokens held apart from the
ones that gave the channel maxima, by the consumers' quantized output error, and "no smoothing" is one of
the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zeroquant.algorithms.blockwise import BlockInputs, ModelBlocks, call_block, run_pipeline
from zeroquant.algorithms.calib import Batch
from zeroquant.algorithms.job import compute_device
from zeroquant.core import quant as Q
from zeroquant.core.config import LinearRule
from zeroquant.models.adapters import blocks_name, get_arch, get_blocks, is_linear, linear_weight, smoothing_pairs

ALPHAS = tuple(round(0.05 * i, 2) for i in range(1, 20))
SAMPLE_TOKENS = 1024  # held-apart tokens per pair for the alpha search


@dataclass
class Pair:
    """One smoothing site of a block: the source module and the linears that read its output."""

    source: str  # relative to the block
    consumers: list[str]
    rules: list[LinearRule]


def block_pairs(model: nn.Module, rules: dict[str, LinearRule], allow_generic: bool = False) -> list[list[Pair]]:
    """Per block, the smoothing pairs whose consumers all quantize their input activations (`rules`: the rule
    of each quantized linear, by full name)."""
    arch = get_arch(model, allow_generic)
    blocks = get_blocks(model, allow_generic)
    prefix = blocks_name(model, blocks)
    out = []
    for i in range(len(blocks)):
        pairs = []
        for source, consumers in smoothing_pairs(model, arch):
            rs = [rules.get(f"{prefix}.{i}.{c}") for c in consumers]
            if all(r is not None and r.act is not None for r in rs):
                pairs.append(Pair(source, list(consumers), rs))
        out.append(pairs)
    return out


def smooth_scales(amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = amax.clamp_min(Q.EPS).pow(alpha) / wmax.clamp_min(Q.EPS).pow(1 - alpha)
    return s.clamp(1e-4, 1e4)


def _fake_act(x: torch.Tensor, rule: LinearRule) -> torch.Tensor:
    a = rule.act
    if a.dynamic:
        return Q.fake_quantize_per_token(x, a.bits)
    s, z = Q.scale_zero_from_range(x.min(), x.max(), a.bits, a.symmetric)
    return Q.fake_quantize(x, s, z, a.bits, a.symmetric)


def _fake_weight(w: torch.Tensor, rule: LinearRule) -> torch.Tensor:
    wq = rule.weight
    q, s, z = Q.quantize_weight(w, wq.bits, wq.group_size, wq.symmetric, wq.per_tensor, wq.progressive)
    return Q.dequantize_weight(q, s, z, Q.group_len(w.shape[1], wq.group_size))


def quantized_error(x: torch.Tensor, weights: list[torch.Tensor], rules: list[LinearRule],
                    s: torch.Tensor | None) -> float:
    """Squared error of the consumers' outputs when their input is divided by s and their weights multiplied
    by it, both quantized by the consumers' rules, against the float outputs."""
    err = 0.0
    for w, rule in zip(weights, rules, strict=True):
        ref = x @ w.t()
        xs, ws = (x, w) if s is None else (x / s, w * s)
        err += (_fake_act(xs, rule) @ _fake_weight(ws, rule).t() - ref).pow(2).sum().item()
    return err


def weight_max(weights: list[torch.Tensor]) -> torch.Tensor:
    """max |W_j| per input channel j over the consumers' [N, K] weights."""
    return torch.stack([w.abs().amax(0) for w in weights]).amax(0)


def choose_alpha(x: torch.Tensor, amax: torch.Tensor, wmax: torch.Tensor, weights: list[torch.Tensor],
                 rules: list[LinearRule], alpha: float | None) -> float | None:
    """The fixed alpha, or the searched one (None: smoothing does not help this pair)."""
    if alpha is not None:
        return alpha
    best, best_err = None, quantized_error(x, weights, rules, None)
    for a in ALPHAS:
        e = quantized_error(x, weights, rules, smooth_scales(amax, wmax, a))
        if e < best_err:
            best, best_err = a, e
    return best


@torch.no_grad()
def fold(block: nn.Module, pair: Pair, s: torch.Tensor) -> None:
    """Divide the source's output channels by s and multiply the consumers' input channels by it."""
    src = block.get_submodule(pair.source)
    if is_linear(src):  # its output rows
        w = linear_weight(src)
        w.div_(s.to(w)[:, None])
    else:  # a norm: its affine weight and bias
        src.weight.div_(s.to(src.weight))
    if getattr(src, "bias", None) is not None:
        src.bias.div_(s.to(src.bias))
    for c in pair.consumers:
        w = linear_weight(block.get_submodule(c))
        w.mul_(s.to(w)[None, :])


class _Inputs:
    """Forward pre-hooks on each pair's first consumer: channel maxima of |input| over the statistics batches'
    real tokens, and a sample of the held-apart batches' real tokens."""

    def __init__(self, block: nn.Module, pairs: list[Pair]) -> None:
        self.amax: dict[str, torch.Tensor] = {}
        self.sample: dict[str, list[torch.Tensor]] = {p.source: [] for p in pairs}
        self.mask: torch.Tensor | None = None
        self.held_apart = False
        self.batch = 0  # the global index of the batch running now
        self.handles = [block.get_submodule(p.consumers[0]).register_forward_pre_hook(self._hook(p.source))
                        for p in pairs]

    def _hook(self, key: str):
        def fn(_m, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if self.mask is not None:
                x = x[self.mask.reshape(-1).to(x.device)]
            if self.held_apart:
                self.sample[key].append((self.batch, x))
            else:
                m = x.abs().amax(0)
                self.amax[key] = m if key not in self.amax else torch.maximum(self.amax[key], m)
        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class Smooth:
    """The smoothing step: folds each block's scales into the FP block before anything reads its outputs;
    `report` lists, per pair, the alpha chosen (None: left unsmoothed). alpha: a fixed alpha for every pair, or
    None to search it per pair. The last quarter of the batches is held apart for the search (all of them when
    there is only one)."""

    phase = "fold"
    streams = frozenset({"fp"})

    def __init__(self, model: nn.Module, rules: dict[str, LinearRule], batches: list[Batch],
                 alpha: float | None = None, allow_generic: bool = False) -> None:
        self.pairs = block_pairs(model, rules, allow_generic)
        self.alpha, self.batches = alpha, len(batches)
        self.n_stat = self.batches - max(1, self.batches // 4)
        self.report: list[dict] = []
        self.g = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def block(self, i: int, block: nn.Module, inputs: BlockInputs, _fp_out) -> nn.Module:
        if not self.pairs[i]:
            return block
        seen = _Inputs(block, self.pairs[i])
        for j, (g, mask) in enumerate(zip(inputs.ids, inputs.masks, strict=True)):
            seen.mask, seen.batch = mask, g
            for held_apart in ((False, True) if self.batches == 1 else (g >= self.n_stat,)):
                seen.held_apart = held_apart
                call_block(block, inputs.fp.get(j), *inputs.ctx[j])
        seen.close()
        ranks = inputs.ranks
        for p in self.pairs[i]:
            w0 = linear_weight(block.get_submodule(p.consumers[0]))
            amax = ranks.reduce(seen.amax.get(p.source, torch.zeros(w0.shape[1], device=w0.device)), "max")
            # every process's held-apart tokens, in the batches' order, as one process would have them (through
            # the host only when there are other processes to send them to)
            mine = [(g, t if ranks.world == 1 else t.cpu()) for g, t in seen.sample[p.source]]
            rows = sorted((r for part in ranks.gather(mine) for r in part), key=lambda r: r[0])
            x = torch.cat([t for _, t in rows]).to(w0.device)
            x = x[torch.randperm(x.shape[0], generator=self.g)[:SAMPLE_TOKENS].to(x.device)]
            weights = [linear_weight(block.get_submodule(c)).detach().float() for c in p.consumers]
            wmax = weight_max(weights)
            a = choose_alpha(x, amax, wmax, weights, p.rules, self.alpha)
            if a is not None:
                fold(block, p, smooth_scales(amax, wmax, a))
            self.report.append({"block": i, "source": p.source, "alpha": a})
        return block


def smooth_model(model: nn.Module, rules: dict[str, LinearRule], batches: list[Batch], alpha: float | None = None,
                 allow_generic: bool = False, progress: bool = True) -> list[dict]:
    """Fold smoothing scales into `model` in place, block by block (one block on the compute device at a time);
    returns Smooth's report."""
    step = Smooth(model, rules, batches, alpha, allow_generic)
    run_pipeline(model, ModelBlocks(get_blocks(model, allow_generic)), batches, [step], compute_device(),
                 "smoothing", progress)
    return step.report
