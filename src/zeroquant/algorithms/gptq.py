"""GPTQ weight rounding (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2023), written from the paper's algorithm.

A linear's output error over calibration inputs X is ||W X - Q X||^2, whose Hessian in W's rows is
H = 2 X X^T (the same for every row). Columns are rounded left to right; each column's rounding error,
divided by the matching diagonal entry of the upper Cholesky factor U of H^-1, is subtracted from the
columns not yet rounded along that row of U (the optimal-brain-surgeon update). Updates are applied
lazily: within a block of columns at once, to the rest of the matrix once per block. Group scales (and
zero points) are taken from the updated weights when rounding reaches a group's first column, as the
paper's group-wise variant does; one scale per row (or per tensor) is taken from the original weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from zeroquant.algorithms.blockwise import call_block
from zeroquant.algorithms.job import Job
from zeroquant.algorithms.ranks import Ranks
from zeroquant.core import quant as Q
from zeroquant.core.config import WeightQuant
from zeroquant.models.adapters import linear_weight
from zeroquant.nn.qlinear import QuantLinear

DAMP = 0.01  # fraction of H's mean diagonal added to it, so the inverse exists and is well conditioned
BLOCK = 128  # columns per lazy update


class InputHessians:
    """Accumulates H = 2 X^T X / n of each named module's input through forward pre-hooks. The sums are float64:
    several processes add their shares in another order than one process adds the batches, and in float64 that
    difference does not survive the cast to the float32 Hessian GPTQ rounds with. Modules called on the same
    tensor (a block's query, key and value projections; a gated MLP's gate and up) share one sum.

    with InputHessians(modules) as hs: run the model (calling hs.only(mask) before each batch that has padding);
    then hs.take(name) is [K, K], float32 (a sum is freed once every module sharing it took its Hessian)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.owner: dict[str, str] = {}  # module -> the module whose sum it shares (itself when it owns one)
        self.handles: list = []
        self.keep: torch.Tensor | None = None
        self._inputs: dict[str, torch.Tensor] = {}  # this forward's inputs so far: which tensor each module saw

    def only(self, mask: torch.Tensor | None) -> None:
        """Count only the tokens where `mask` ([batch, seq], the batch's attention mask) is set in the next
        forward: padding is not data, and its hidden states would bend the Hessian toward them."""
        self.keep = None if mask is None else mask.reshape(-1).bool()

    def _hook(self, name: str):
        def fn(_m, args):
            x = args[0]
            if name in self._inputs:  # a module runs once a forward: this is the next batch
                self._inputs.clear()
            # Identity, not equal values: a reference is held until the next forward, so no other tensor can take
            # the same object's place within this one.
            shared = next((n for n, t in self._inputs.items() if t is x), name)
            self._inputs[name] = x
            owner = self.owner.setdefault(name, shared)
            if owner != shared:  # its Hessian would be another module's, or miss batches
                raise RuntimeError(f"GPTQ: {name} read {owner}'s input in one batch, {shared}'s in another")
            if owner != name:
                return
            x = x.detach().reshape(-1, x.shape[-1]).double()
            if self.keep is not None and self.keep.numel() == x.shape[0]:
                x = x[self.keep.to(x.device)]
            prev = self.sums.get(name)
            self.sums[name] = x.t() @ x if prev is None else prev.addmm_(x.t(), x)
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]

        return fn

    def __enter__(self) -> InputHessians:
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self._inputs.clear()

    def reduce(self, ranks: Ranks) -> None:
        """Add up every process's sums and token counts."""
        for n in sorted(self.sums):
            ranks.reduce(self.sums[n], "sum")
            self.rows[n] = int(ranks.reduce(torch.tensor([self.rows[n]], device=self.sums[n].device), "sum"))

    def take(self, names: str | list[str]) -> torch.Tensor:
        """The float32 Hessian of the inputs of `names` (one module, or several sharing one input); the float64
        sum is freed once no module left needs it."""
        names = [names] if isinstance(names, str) else names
        owner = self.owner[names[0]]
        if any(self.owner[n] != owner for n in names):
            raise ValueError(f"{names} do not share one input")
        for n in names:
            del self.owner[n]
        if owner in self.owner.values():  # another module still needs the sum
            return (2 * self.sums[owner] / self.rows[owner]).float()
        # The last reader scales the float64 sum in place (the same two roundings as above): two float64
        # temporaries of a down projection's [K, K] sum would be most of the GPU's peak (2 GB at Llama-7B width).
        return self.sums.pop(owner).mul_(2).div_(self.rows[owner]).float()


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; more damping if H is too ill-conditioned."""
    mean = h.diagonal().mean().clamp_min(1e-12)
    added = 0.0
    for _ in range(5):  # damping added on h's diagonal in place: no identity matrix, no damped copy
        h.diagonal().add_(damp * mean - added)
        added = damp * mean
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u
        damp *= 10
    raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even with heavy damping")


class GPTQResult(NamedTuple):
    q: torch.Tensor  # [N, K] integers, quant.storage_dtype: the layout of quant.quantize_weight
    scale: torch.Tensor  # [N, G]
    zero: torch.Tensor  # [N, G]
    # [N, K] float: each column as it stood when rounded (the original plus the compensation it received),
    # so round-to-nearest on (scale, zero) gives q; distillation starts from it, not from q's grid points.
    # None unless asked for (keep_weight): a float32 copy of the weight.
    weight: torch.Tensor | None


@torch.no_grad()
def gptq_round(
    w: torch.Tensor, hessian: torch.Tensor, wq: WeightQuant, damp: float = DAMP, block: int = BLOCK,
    overwrite: bool = False, keep_weight: bool = True,
) -> GPTQResult:
    """GPTQ rounding of an [N, K] weight with the Hessian [K, K] of its inputs (overwrite: the Hessian may be
    used as scratch space, which saves a copy of it)."""
    n, k = w.shape
    W = w.detach().float().clone()
    H = hessian.detach().float().to(W.device)
    if not overwrite and H.data_ptr() == hessian.data_ptr():
        H = H.clone()
    dead = H.diagonal() == 0  # channels the calibration data never excites: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_cholesky(H, damp)
    del H

    qmin, qmax = Q.qrange(wq.bits, wq.symmetric)
    gs = k if wq.per_tensor else Q.group_len(k, wq.group_size)
    groups = 1 if wq.per_tensor else Q.num_groups(k, wq.group_size)
    sdtype = wq.float_scale_dtype  # rounding with the scale as stored keeps q consistent with it
    scale = torch.empty(n, groups, device=W.device)
    zero = torch.empty(n, groups, device=W.device)
    # progressive: the row scale of the weight as given, the one QuantLinear.set_weight takes from it
    s1 = Q.progressive_row_scale(w).to(W.device)[:, 0] if wq.progressive else None
    if groups == 1:  # one scale per row (or tensor): from the original weights, before any update
        s, z = Q.weight_scale_zero(w.float().to(W.device) if wq.progressive else W, wq.bits, -1, wq.symmetric,
                                   wq.per_tensor, wq.progressive)
        scale.copy_(Q.stored_scale(s, sdtype))
        zero.copy_(z)
    else:  # blocks hold whole groups, so a group's columns are all current when its scale is taken
        block = gs * max(1, block // gs)
    q = torch.empty(n, k, device=W.device)
    before = torch.empty(n, k, device=W.device) if keep_weight else None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1 = W[:, b0:b1].clone()
        err = torch.empty_like(W1)
        for i in range(b1 - b0):
            c = b0 + i
            g = c // gs
            if groups > 1 and c % gs == 0:
                end = min(i + gs, b1 - b0)
                if s1 is not None:
                    s2, z = Q.progressive_group(W1[:, i:end] / s1[:, None])
                    s = s1 * s2
                else:
                    s, z = Q.scale_zero_from_range(W1[:, i:end].amin(1), W1[:, i:end].amax(1), wq.bits,
                                                   wq.symmetric)
                scale[:, g], zero[:, g] = Q.stored_scale(s, sdtype), z
            s, z = scale[:, g], zero[:, g]
            col = W1[:, i]
            if before is not None:
                before[:, c] = col
            qc = (torch.round(col / s) + z).clamp(qmin, qmax)
            q[:, c] = qc
            e = (col - (qc - z) * s) / U[c, c]
            W1[:, i:] -= e[:, None] * U[c, c:b1][None, :]
            err[:, i] = e
        W[:, b1:] -= err @ U[b0:b1, b1:]
    return GPTQResult(q.to(Q.storage_dtype(wq.bits, wq.symmetric)), scale, zero, before)


def gptq_starts(targets: list, block: nn.Module, inputs, stream, keep_weights: bool = True) -> dict:
    """GPTQ's rounding of the GPTQ-rule linears among `targets` (Targets of one block), from the Hessians
    of their inputs when `block` runs on `stream` (a blockwise.Hidden); name in the block -> GPTQResult (its
    weight None unless keep_weights: distillation starts from it, plain GPTQ does not need it)."""
    mods = {t.local: block.get_submodule(t.local) for t in targets if t.rule.rounding == "gptq"}
    rules = {t.local: t.rule for t in targets}
    out = {}
    # One forward pass per input width, widest first: only that width's float64 sums live at a time, so the
    # peak is the widest input's (a down projection's) rather than every sum of the block together. Rounding
    # writes copies, never the block, so every pass sees the same block and the sums are the same.
    width = {n: linear_weight(m).shape[1] for n, m in mods.items()}
    for w in sorted(set(width.values()), reverse=True):
        part = {n: m for n, m in mods.items() if width[n] == w}
        with torch.no_grad(), InputHessians(part) as hs:
            for i, mask in enumerate(inputs.masks):
                hs.only(mask)
                call_block(block, stream.get(i), *inputs.ctx[i])
        hs.reduce(inputs.ranks)
        # Linears sharing a Hessian and a rule are rounded as one matrix (GPTQ treats rows alone, given the
        # Hessian): one Cholesky factorisation and one column sweep for q/k/v, whose Python loop is most of
        # GPTQ's time. One Hessian at a time.
        together: dict[tuple, list[str]] = {}
        for n in part:
            together.setdefault((hs.owner[n], rules[n].weight), []).append(n)
        for (_, wq), names in together.items():
            weights = [linear_weight(part[n]) for n in names]
            res = gptq_round(torch.cat(weights), hs.take(names), wq, overwrite=True, keep_weight=keep_weights)
            rows = [w.shape[0] for w in weights]
            parts = [t.split(rows) if t is not None else [None] * len(names) for t in res]
            for n, *fields in zip(names, *parts, strict=True):
                out[n] = GPTQResult(*fields)
    return out


def gptq_step(by_block: dict[int, list], ranges: dict):
    """A blockwise.Step that replaces each block's targets (Targets, grouped by block index) with
    QuantLinear: GPTQ-rule linears rounded with the Hessian of the quantized model's inputs to them (so later
    blocks correct what earlier ones lost), the others to nearest."""
    @torch.no_grad()
    def step(block: nn.Module, inputs, _fp_out) -> nn.Module:
        ts = by_block.get(inputs.index, [])
        rounded = gptq_starts(ts, block, inputs, inputs.quant, keep_weights=False)
        for t in ts:
            ql = QuantLinear.from_weight(linear_weight(t.module), t.module.bias, t.rule, ranges.get(t.name))
            if t.local in rounded:
                ql.set_int_weight(*rounded[t.local][:3])
            block.set_submodule(t.local, ql)
        return block

    return step


class GPTQ:
    """The GPTQ step: each block's targets rounded by gptq_step on the quantized model's inputs."""

    phase = "swap"
    streams = frozenset({"quant"})

    def __init__(self, job: Job) -> None:
        self.step = gptq_step(job.by_block(), job.ranges)

    def block(self, k: int, block: nn.Module, inputs, fp_out) -> nn.Module:
        return self.step(block, inputs, fp_out)
