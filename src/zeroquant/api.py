"""zeroquant.quantize: swap a model's block linears for QuantLinear according to a QuantConfig, as a list of
steps (smoothing, static ranges, GPTQ or distillation, round-to-nearest) over one block runner."""

from __future__ import annotations

import copy

import torch
from torch import nn

from zeroquant.algorithms.block_store import BlockStore
from zeroquant.algorithms.blockwise import BlockSource, BlockStep, ModelBlocks, run_pipeline
from zeroquant.algorithms.calib import model_device, split_batch, to_batches
from zeroquant.algorithms.gptq import GPTQ, gptq_starts
from zeroquant.algorithms.job import Job, compute_device
from zeroquant.algorithms.lkd import LKD, LKDConfig, Start, StartFn
from zeroquant.algorithms.ranks import ONE, Ranks
from zeroquant.algorithms.rtn import RoundToNearest
from zeroquant.algorithms.smooth import Smooth
from zeroquant.algorithms.static_ranges import StaticRanges
from zeroquant.algorithms.targets import Target, block_linears_of, by_block, find_targets, validate_targets
from zeroquant.core.config import QuantConfig, resolve_config
from zeroquant.core.errors import ZeroQuantError
from zeroquant.core.state import QuantState
from zeroquant.models.adapters import get_blocks
from zeroquant.models.fusion import fuse as fuse_ops
from zeroquant.models.hf_attention import use_kernel_attention
from zeroquant.nn.qlinear import QuantLinear


def linear_kinds(model: nn.Module, allow_generic: bool = False) -> dict[str, str]:
    """Full name -> module kind ("attention" or "mlp") of every quantizable linear of the blocks."""
    return {name: kind for name, _, _, kind, _ in block_linears_of(model, allow_generic)}


def check_config(model: nn.Module, config: QuantConfig | str, allow_generic: bool = False) -> QuantConfig:
    """The resolved config, after checking that it can quantize `model` (nothing is changed); raises
    ZeroQuantError naming the first layer it cannot."""
    cfg = resolve_config(config)
    validate_targets(find_targets(model, cfg, allow_generic))
    return cfg


def gptq_start(grouped: dict[int, list[Target]]) -> StartFn:
    """Distillation's start from GPTQ's integers, rounded on the inputs the student reads."""
    def start(block: nn.Module, inputs, stream) -> dict[str, Start]:
        ts = grouped.get(inputs.index, [])
        return {n: Start(r.weight, r.scale, r.zero) for n, r in gptq_starts(ts, block, inputs, stream).items()}

    return start


def plan(job: Job, lkd: LKDConfig | None) -> list[BlockStep]:
    """The steps quantize() runs block by block for the job's config: smoothing changes float weights only, so
    every step after it sees an equivalent FP model; static ranges are watched on that model; then one step swaps
    the block's linears."""
    cfg, targets = job.state.config, job.targets
    steps: list[BlockStep] = []
    if cfg.uses_smoothing:
        smooth = Smooth(job.model, {t.name: t.rule for t in targets}, job.batches,
                        None if cfg.smooth == "auto" else float(cfg.smooth), job.allow_generic)
        job.state.smooth = smooth.report
        steps.append(smooth)
    if any(t.rule.act is not None and not t.rule.act.dynamic for t in targets):
        steps.append(StaticRanges(targets, job.ranges))
    if lkd is not None:
        n_blocks = len(get_blocks(job.model, job.allow_generic))
        steps.append(LKD(job, lkd, gptq_start(by_block(targets)) if cfg.uses_gptq else None, n_blocks))
    elif cfg.uses_gptq:
        steps.append(GPTQ(job))
    else:
        steps.append(RoundToNearest(job))
    return steps


def run_steps(job: Job, lkd: LKDConfig | None, source: BlockSource, store: BlockStore | None = None) -> None:
    """quantize()'s one pass over the blocks, from `source` (the model's own blocks, or blocks read from
    shards one at a time), writing finished blocks to `store` when given."""
    steps = plan(job, lkd)
    if job.batches is None:  # data-free: each block quantized where it lives
        device = model_device(job.model) if isinstance(source, ModelBlocks) else torch.device("cpu")
    else:
        device = next((s.device for s in steps if isinstance(s, LKD)), compute_device())
    rtn = RoundToNearest(job)
    run_pipeline(job.model, source, job.batches, steps, device, f"quantizing ({job.state.config.name})",
                 job.progress, store, lambda k, block: rtn.block(k, block, None, None), job.ranks)
    for s in steps:
        if hasattr(s, "finish"):
            s.finish()


def quantize(
    model: nn.Module,
    config: QuantConfig | str,
    calib_data=None,
    tokenizer=None,
    *,
    lkd: LKDConfig | None = None,
    inplace: bool = False,
    allow_generic: bool = False,
    fuse: bool = True,
    calib_seq_len: int = 512,
    calib_batch_size: int = 8,
    progress: bool = True,
    blocks: BlockSource | None = None,
    store: BlockStore | None = None,
    ranks: Ranks = ONE,
) -> nn.Module:
    """Quantize `model` the ZeroQuant way and return it.

    config: a QuantConfig or a preset name ("w8a8", "w4/8-a8", ...; see zeroquant.PRESETS).
    calib_data: a text file's path, a list of strings, a tensor of token ids, or a list of tokenized batches
        (zq.lkd_batches makes them). Needed by static activation baselines, GPTQ rounding, smoothing and
        distillation (`lkd`); other presets need none.
    lkd: an LKDConfig to distil each quantized block toward its FP self, one block at a time (docs/lkd.md);
        with GPTQ rules each block's distillation starts from GPTQ's integers.
    inplace: modify and return `model` itself; by default a copy is quantized and `model` is untouched.
    allow_generic: quantize every linear inside the blocks of an architecture without an adapter.
    fuse: fold norms into token-wise quantization and MLP activations into GEMM epilogues
        (zeroquant.models.fusion), and point a decoder's attention at the one-query decode kernel
        (zeroquant.models.hf_attention); same numbers on the reference path, fewer kernels on CUDA.
    blocks: where the FP blocks come from when the model holds them only on the meta device: LazyBlocks from
        zeroquant.models.lazy.open_lazy reads each from the checkpoint's shards in its turn, so the FP model is
        never in memory whole (needs inplace=True; the result's blocks are on the CPU).
    store: a BlockStore (zeroquant.algorithms.block_store) that receives each finished block, so that a run
        that dies can resume from its last finished block; blocks it already holds are read back, not redone.
    ranks: the processes quantizing together under torchrun (zeroquant.algorithms.ranks.init_from_env): each holds
        a share of the calibration batches; every process gets the one-process result.
    The result carries `model.zeroquant`, a QuantState (config and the data steps' reports).
    """
    if quantized_modules(model):
        raise ZeroQuantError("the model is already quantized by zeroquant: quantize its floating-point original")
    if blocks is not None and not inplace:
        raise ZeroQuantError("quantizing blocks read one at a time works in place: pass inplace=True")
    lazy = {id(p) for p in blocks.blocks.parameters()} if blocks is not None else set()
    if any(p.is_meta and id(p) not in lazy for p in model.parameters()):
        raise ZeroQuantError("the model's weights are on the meta device (never loaded): load them first")
    cfg = check_config(model, config, allow_generic)
    batches = None
    if cfg.needs_data or lkd is not None:
        if calib_data is None:
            what = ("distillation (lkd)" if lkd is not None else "GPTQ rounding" if cfg.uses_gptq
                    else "smoothing" if cfg.uses_smoothing else f"preset {cfg.name!r} (static activations)")
            raise ZeroQuantError(f"{what} needs calib_data")
        batches = to_batches(calib_data, tokenizer, model, calib_seq_len, calib_batch_size)

    model = model if inplace else copy.deepcopy(model)
    model.eval()
    targets = find_targets(model, cfg, allow_generic)  # the copy's modules
    if lkd is not None and len(batches) == 1 and lkd.holdout > 0:  # sequences apart to judge LKD's best iterate on
        batches = split_batch(batches[0])
    job = Job(model, targets, batches, QuantState(cfg, allow_generic), allow_generic, progress, ranks=ranks)
    run_steps(job, lkd, blocks or ModelBlocks(get_blocks(model, allow_generic)), store)
    if fuse:
        fuse_ops(model)
        use_kernel_attention(model)
    model.zeroquant = job.state
    return model


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
