"""Triton kernels for Hopper (sm_90) and their pure-PyTorch reference twins.

`reference` imports everywhere (CPU included); the Triton modules import only where Triton and CUDA
exist, which `available()` reports. Nothing here keeps state: callers pass tensors in, get tensors out.
"""

from __future__ import annotations

import importlib.util

import torch

# Whether Triton is importable, decided once at import: a plain constant that torch.compile reads without
# tracing an import statement.
HAS_TRITON = importlib.util.find_spec("triton") is not None

ACTS = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}


def act_code(act: str | None) -> int:
    """Map an activation name (None, gelu, gelu_tanh, relu, silu) to the kernels' constexpr code."""
    if act not in ACTS:
        raise ValueError(f"unsupported fused activation {act!r}; choose one of {[a for a in ACTS if a]}")
    return ACTS[act]


def available() -> bool:
    """True where the Triton kernels can run: CUDA present and Triton importable."""
    return HAS_TRITON and torch.cuda.is_available()


def runs_on(x: torch.Tensor) -> bool:
    """Whether the model code sends x to the kernel ops (zeroquant.kernels.ops) rather than the reference path:
    a CUDA tensor where the kernels can run. (The ops themselves run anywhere: their CPU implementation is
    the reference twin, which is how the CPU tests drive the kernel path's plumbing.)"""
    return x.is_cuda and available()
