"""Triton kernels for Hopper (sm_90) and their pure-PyTorch reference twins.

`reference` imports everywhere (CPU included); the Triton modules import only where Triton and CUDA
exist, which `available()` reports. Nothing here keeps state: callers pass tensors in, get tensors out.
"""

from __future__ import annotations

import functools

import torch

ACTS = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}


def act_code(act: str | None) -> int:
    """Map an activation name (None, gelu, gelu_tanh, relu, silu) to the kernels' constexpr code."""
    if act not in ACTS:
        raise ValueError(f"unsupported fused activation {act!r}; choose one of {[a for a in ACTS if a]}")
    return ACTS[act]


@functools.cache
def available() -> bool:
    """True where the Triton kernels can run: CUDA present and Triton importable."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
