"""zeroquant.quantize: swap a model's block linears for QuantLinear according to a QuantConfig."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from zeroquant.algorithms.calib import Batch, model_device, split_batch, to_batches
from zeroquant.core.config import LinearRule, QuantConfig, resolve_config
from zeroquant.core.errors import ZeroQuantError
from zeroquant.models.adapters import block_linears, get_arch, get_blocks
from zeroquant.nn.fusion import fuse as fuse_ops
from zeroquant.nn.qlinear import QuantLinear, linear_weight


@dataclass
class Target:
    """One linear to quantize: where it is and which rule applies."""

    name: str  # full dotted name in the model
    block: int
    local: str  # name relative to its block
    kind: str
    rule: LinearRule
    module: nn.Module


def block_linears_of(model: nn.Module, allow_generic: bool = False):
    """(full name, block index, name in the block, kind, module) of every quantizable linear of the blocks."""
    arch = get_arch(model, allow_generic)
    blocks = get_blocks(model, allow_generic)
    prefix = {id(m): n for n, m in model.named_modules()}[id(blocks)]
    for i, block in enumerate(blocks):
        for local, kind, module in block_linears(block, arch):
            yield f"{prefix}.{i}.{local}", i, local, kind, module


def by_block(targets: list[Target]) -> dict[int, list[Target]]:
    """Targets grouped by the index of their block, for the block runner's steps."""
    out: dict[int, list[Target]] = {}
    for t in targets:
        out.setdefault(t.block, []).append(t)
    return out


def linear_kinds(model: nn.Module, allow_generic: bool = False) -> dict[str, str]:
    """Full name -> module kind ("attention" or "mlp") of every quantizable linear of the blocks."""
    return {name: kind for name, _, _, kind, _ in block_linears_of(model, allow_generic)}


def find_targets(model: nn.Module, config: QuantConfig, allow_generic: bool = False) -> list[Target]:
    targets = [Target(name, i, local, kind, config.rule(kind), module)
               for name, i, local, kind, module in block_linears_of(model, allow_generic)
               if config.rule(kind).weight is not None]
    if not targets:
        raise ZeroQuantError("the config quantizes no linear layer of this model")
    return targets


def check_config(model: nn.Module, config: QuantConfig | str, allow_generic: bool = False) -> QuantConfig:
    """The resolved config, after checking that it can quantize `model` (nothing is changed); raises
    ZeroQuantError naming the first layer it cannot."""
    cfg = resolve_config(config)
    validate_targets(find_targets(model, cfg, allow_generic))
    return cfg


def validate_targets(targets: list[Target]) -> None:
    """Fail before touching the model on shapes the config cannot quantize."""
    for t in targets:
        w = t.rule.weight
        k = linear_weight(t.module).shape[1]
        if w.bits <= 4 and k % 2:
            raise ZeroQuantError(f"{t.name}: INT4 packing needs an even input size, got {k}")


@torch.no_grad()
def collect_input_ranges(model: nn.Module, targets: list[Target], batches: list[Batch], allow_generic: bool = False,
                         progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Min/max of each target's input over the calibration batches (static per-tensor baseline), seen as the
    block runner carries the FP model's hidden states through each block; full name -> (min, max)."""
    from zeroquant.algorithms.blockwise import run_blocks

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


def quantize(
    model: nn.Module,
    config: QuantConfig | str,
    calib_data=None,
    tokenizer=None,
    *,
    lkd=None,
    inplace: bool = False,
    allow_generic: bool = False,
    fuse: bool = True,
    calib_seq_len: int = 512,
    calib_batch_size: int = 8,
    progress: bool = True,
) -> nn.Module:
    """Quantize `model` the ZeroQuant way and return it.

    config: a QuantConfig or a preset name ("w8a8", "w4/8-a8", ...; see zeroquant.PRESETS).
    calib_data: a text file's path, a list of strings, a tensor of token ids, or a list of tokenized batches
        (zq.lkd_batches makes them). Needed by static activation baselines, GPTQ rounding, smoothing and
        distillation (`lkd`); other presets need none.
    lkd: an LKDConfig to distil each quantized block toward its FP self, one block at a time (zeroquant.algorithms.lkd,
        docs/lkd.md); with GPTQ rules each block's distillation starts from GPTQ's integers.
    inplace: modify and return `model` itself; by default a copy is quantized and `model` is untouched.
    allow_generic: quantize every linear inside the blocks of an architecture without an adapter.
    fuse: fold norms into token-wise quantization and MLP activations into GEMM epilogues
        (zeroquant.nn.fusion); same numbers on the reference path, fewer kernels on CUDA.
    """
    if quantized_modules(model):
        raise ZeroQuantError("the model is already quantized by zeroquant: quantize its floating-point original")
    if any(p.is_meta for p in model.parameters()):
        raise ZeroQuantError("the model's weights are on the meta device (never loaded): load them first")
    cfg = check_config(model, config, allow_generic)
    needs_data = cfg.needs_data or lkd is not None
    batches = None
    if needs_data:
        if calib_data is None:
            what = ("distillation (lkd)" if lkd is not None else "GPTQ rounding" if cfg.uses_gptq
                    else "smoothing" if cfg.uses_smoothing else f"preset {cfg.name!r} (static activations)")
            raise ZeroQuantError(f"{what} needs calib_data")
        batches = to_batches(calib_data, tokenizer, model, calib_seq_len, calib_batch_size)

    model = model if inplace else copy.deepcopy(model)
    model.eval()
    targets = find_targets(model, cfg, allow_generic)  # the copy's modules
    if cfg.uses_smoothing:  # changes float weights only: everything after sees an equivalent FP model
        from zeroquant.algorithms.smooth import smooth_model

        alpha = None if cfg.smooth == "auto" else float(cfg.smooth)
        model.zeroquant_smooth = smooth_model(model, {t.name: t.rule for t in targets}, batches, alpha,
                                              allow_generic, progress)

    static = [t for t in targets if t.rule.act is not None and not t.rule.act.dynamic]
    ranges = collect_input_ranges(model, static, batches, allow_generic, progress) if static else {}
    if lkd is not None or cfg.uses_gptq:
        _blockwise(model, targets, batches, ranges, lkd, cfg.uses_gptq, allow_generic, progress)
    else:
        for t in tqdm(targets, desc=f"quantizing ({cfg.name})", disable=not progress, leave=False):
            ql = QuantLinear.from_float(t.module, t.rule, ranges.get(t.name))
            model.set_submodule(t.name, ql)
    if fuse:
        fuse_ops(model)
    model.zeroquant_config = cfg
    model.zeroquant_generic = allow_generic
    return model


def _blockwise(model: nn.Module, targets: list[Target], batches, ranges: dict, lkd, gptq: bool,
               allow_generic: bool, progress: bool) -> None:
    """GPTQ and/or distillation, one block at a time over the shared block runner. With both, each block's
    distillation starts from GPTQ's integers, rounded on the same inputs the student reads."""
    from zeroquant.algorithms.blockwise import run_blocks
    from zeroquant.algorithms.gptq import gptq_starts, gptq_step

    blocks = get_blocks(model, allow_generic)
    grouped = by_block(targets)
    if lkd is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        run_blocks(blocks, model, batches, gptq_step(grouped, ranges), device, carry_fp=False, desc="GPTQ",
                   progress=progress)
        return
    from zeroquant.algorithms.lkd import Start, check_finite, lkd_step

    def gptq_start(block: nn.Module, inputs, stream) -> dict[str, Start]:
        ts = grouped.get(inputs.index, [])
        return {n: Start(r.weight, r.scale, r.zero) for n, r in gptq_starts(ts, block, inputs, stream).items()}

    device = torch.device(lkd.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if len(batches) == 1 and lkd.holdout > 0:  # keep sequences apart to judge the best iterate on
        batches = split_batch(batches[0])
    table: list[dict] = []
    model.requires_grad_(False)
    step = lkd_step(grouped, lkd, ranges, device, table, gptq_start if gptq else None, progress, len(blocks))
    run_blocks(blocks, model, batches, step, device, carry_quantized=lkd.inputs != "fp", desc="LKD",
               progress=progress)
    model.zeroquant_lkd = table
    check_finite(table)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every QuantLinear's forward: "int" (Triton kernels on CUDA, the integer reference path
    elsewhere), "ref" (the integer reference path everywhere) or "fake" (fake-quant)."""
    if mode not in ("int", "ref", "fake"):
        raise ZeroQuantError(f"mode must be 'int', 'ref' or 'fake', got {mode!r}")
    for m in quantized_modules(model).values():
        m.mode = mode
    return model
