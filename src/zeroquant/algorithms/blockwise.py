"""Running a model block by block: capture the inputs the model hands its first block, then feed them
through each block in turn, one block on the compute device at a time. Smoothing, static ranges, GPTQ and
distillation all work this way, as steps of one pass (`run_pipeline`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from zeroquant.algorithms.calib import Batch, model_device, move
from zeroquant.algorithms.ranks import ONE, Ranks
from zeroquant.core.errors import ZeroQuantError
from zeroquant.models.hf import CACHE_KWARGS


class _Stop(Exception):
    pass


def to_device(obj, device, dtype: torch.dtype | None = None):
    """Move tensors in nested args to `device`; floating ones also cast to `dtype` when given."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype=dtype if dtype is not None and obj.is_floating_point() else None)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[Batch]) -> list[tuple[tuple, dict]]:
    """The exact (args, kwargs) the model passes to its first block, per batch.

    Hooking the real call keeps attention masks, position ids and rotary embeddings exactly as the
    model's own forward builds them; the forward stops at the first block.
    """
    captured = []

    def hook(_m, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
        captured.append((args, kwargs))
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = model_device(model)
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    try:
        for b in batches:
            try:
                model(**move(b, device), **extra)
            except _Stop:
                pass
    finally:
        h.remove()
    if len(captured) != len(batches):
        raise ZeroQuantError("could not capture the first block's inputs")
    return captured


def batch_masks(batches: list[Batch]) -> list[torch.Tensor | None]:
    """Each calibration batch's attention mask (None where it has none: every token counts)."""
    return [b.get("attention_mask") if isinstance(b, dict) else None for b in batches]


def hidden_of(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def call_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    return hidden_of(block(hidden, *args[1:], **kwargs))


class Hidden:
    """One hidden state per calibration batch, kept where it fits: on the compute device, or in host memory
    (pinned, so the copy back overlaps) when the device has too little free memory for every stream the
    pipeline carries. `get(i)` always answers on the compute device."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device, on_host: bool) -> None:
        self.device = device
        self.on_host = on_host
        self.items = [self._keep(t) for t in tensors]

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        if not self.on_host:
            return t.to(self.device)
        t = t.to("cpu")
        return t.pin_memory() if self.device.type == "cuda" else t

    def get(self, i: int) -> torch.Tensor:
        return self.items[i].to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.items)

    def map(self, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> Hidden:
        """A new store of fn(i, hidden_i) for every batch, kept where this one is."""
        return Hidden([fn(i, self.get(i)) for i in range(len(self.items))], self.device, self.on_host)


def hidden_fits(example: torch.Tensor, n: int, streams: int, device: torch.device, fraction: float = 0.5) -> bool:
    """Whether `streams` stores of `n` tensors like `example` fit in `fraction` of the device's free memory
    (the rest is for the block, its activations and, in distillation, its gradients)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return example.numel() * example.element_size() * n * streams <= fraction * free


def memory_in_use(device: torch.device) -> str:
    """The process's peak host memory and, on a GPU, the memory allocated there now: for progress bars."""
    import resource

    text = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB"
    return text


@dataclass
class BlockInputs:
    """What a step sees of block k: per batch, the block's other arguments (masks, positions, rotary
    embeddings), the FP model's input to the block and the quantized model's input (the outputs of the blocks
    already quantized); either is None when the pipeline does not carry it."""

    index: int
    ctx: list[tuple[tuple, dict]]
    fp: Hidden | None
    quant: Hidden | None
    masks: list[torch.Tensor | None]
    ids: list[int] | None = None  # the global index of each batch held here (several processes: a share)
    total: int | None = None  # how many batches all processes hold together
    ranks: Ranks = ONE

    def __post_init__(self) -> None:
        if self.ids is None:
            self.ids = list(range(len(self.ctx)))
        if self.total is None:
            self.total = len(self.ctx)

    def outputs(self, block: nn.Module, hidden: Hidden) -> Hidden:
        """`block`'s output for every batch of `hidden` (no autograd)."""
        with torch.no_grad():
            return hidden.map(lambda i, h: call_block(block, h, *self.ctx[i]))


class BlockStep(Protocol):
    """One stage of the pipeline, applied to each block in turn.

    phase "fold" changes the FP block's float weights before anything reads its outputs (smoothing); "observe"
    watches the FP block compute its outputs on the FP stream (static ranges); "swap" returns the block that
    takes the FP block's place (round-to-nearest, GPTQ, distillation). `streams` names the hidden states it
    reads: "fp" (the FP model's) and/or "quant" (the quantized model's)."""

    phase: str
    streams: frozenset[str]

    def block(self, k: int, block: nn.Module, inputs: BlockInputs | None, fp_out: Hidden | None) -> nn.Module: ...

    def watch(self, k: int, block: nn.Module, ranks: Ranks) -> AbstractContextManager: ...


class ModelBlocks:
    """The blocks of an in-memory model: each moves to the compute device for its turn and back after."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def take(self, k: int, device: torch.device) -> nn.Module:
        self.home = next(self.blocks[k].parameters()).device
        return self.blocks[k].to(device)

    def give(self, k: int, old: nn.Module, new: nn.Module) -> None:
        self.blocks[k] = new.to(self.home)
        if new is not old:
            old.to(self.home)


class BlockSource(Protocol):
    """Where the pipeline gets each FP block and puts each finished one (ModelBlocks, or blocks read from a
    checkpoint's shards one at a time: zeroquant.models.lazy)."""

    blocks: nn.ModuleList

    def __len__(self) -> int: ...

    def take(self, k: int, device: torch.device) -> nn.Module: ...

    def give(self, k: int, old: nn.Module, new: nn.Module) -> None: ...


def _swap(swap: BlockStep | None, store, rebuild, k: int, block: nn.Module, inputs: BlockInputs | None,
          targets: Hidden | None) -> nn.Module:
    """The swap step's block, or the one a store holds from a run that died after finishing it."""
    if swap is None:
        return block
    if store is not None and k < store.done:
        new, record = store.load(k, block, rebuild)
        if hasattr(swap, "restore"):
            swap.restore(k, record)
        return new
    new = swap.block(k, block, inputs, targets)
    if store is not None:
        store.save(k, new, swap.record(k) if hasattr(swap, "record") else None)
    return new


def run_pipeline(model: nn.Module, source: BlockSource, batches: list[Batch] | None, steps: list[BlockStep],
                 device: torch.device, desc: str = "quantizing", progress: bool = True, store=None,
                 rebuild: Callable[[int, nn.Module], nn.Module] | None = None, ranks: Ranks = ONE) -> None:
    """Every block once, in order, on `device`: the fold steps, then the FP block's outputs on the FP stream
    (the observe steps watching), then the swap step; the quantized stream advances through the block the
    swap step returned, the FP stream through the FP block. With a `store` (block_store.BlockStore) each finished
    block is written as it finishes, and blocks a dead run finished are read back instead of swapped again
    (built by `rebuild(k, fp_block)`, then given the saved values).

    Two streams of hidden states can flow, each only when a step reads it: the FP model's (each FP block's
    output feeds the next and is the swap step's target) and the quantized model's (each finished block's output
    feeds the next, so a later block sees, and can correct, the error built up before it). Steps that read no
    stream need no data: each block is swapped where it stands. With several processes (`ranks`) each holds a
    share of the batches and their hidden states; the steps reduce what they measure across processes."""
    fold = [s for s in steps if s.phase == "fold"]
    observe = [s for s in steps if s.phase == "observe"]
    swap = next((s for s in steps if s.phase == "swap"), None)
    reads = frozenset().union(*(s.streams for s in steps))
    bar = tqdm(range(len(source)), desc=desc, disable=not progress, leave=False, unit="block")
    if not reads:
        for k in bar:
            block = source.take(k, device)
            source.give(k, block, _swap(swap, store, rebuild, k, block, None, None))
        return
    carry_fp, carry_quantized = "fp" in reads, "quant" in reads
    ids = ranks.mine(len(batches))
    batches, total = [batches[i] for i in ids], len(batches)
    captured = capture_block_inputs(model, source.blocks[0], batches)
    ctx = [(to_device(a, device), to_device(k, device)) for a, k in captured]
    first = [a[0] for a, _ in captured]
    del captured
    masks = batch_masks(batches)
    on_host = not hidden_fits(first[0], len(first), 2 * carry_fp + carry_quantized, device)
    fp = Hidden(first, device, on_host) if carry_fp else None
    quant = Hidden(first, device, on_host) if carry_quantized else None
    del first
    for k in bar:
        block = source.take(k, device)
        inputs = BlockInputs(k, ctx, fp, quant, masks, ids, total, ranks)
        for s in fold:
            s.block(k, block, inputs, None)
        targets = None
        if fp is not None:
            with ExitStack() as watching:
                for s in observe:
                    watching.enter_context(s.watch(k, block, ranks))
                targets = inputs.outputs(block, fp)
        new = _swap(swap, store, rebuild, k, block, inputs, targets)
        if quant is not None:
            quant = inputs.outputs(new, quant)
        fp = targets
        source.give(k, block, new)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if progress:
            bar.set_postfix_str(memory_in_use(device), refresh=False)
