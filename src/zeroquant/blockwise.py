"""Running a model block by block: capture the inputs the model hands its first block, then feed them
through each block in turn (layer-by-layer distillation and GPTQ both work this way, one block in memory)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .calib import Batch, model_device, move
from .errors import ZeroQuantError


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
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "layer_past")}
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


def hidden_of(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def call_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    return hidden_of(block(hidden, *args[1:], **kwargs))
