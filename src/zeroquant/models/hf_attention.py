"""Decoder attention on zeroquant's kernel inside Hugging Face models, through transformers' AttentionInterface.

A decode step asks attention for one query per head against the whole KV cache. torch's SDPA runs that as a
flash kernel built for many queries (docs/history.md); kernels.triton.attention has a one-query kernel
that reads the cache and the model's mask in place. `use_kernel_attention` registers `kernel_attention`
under ATTENTION and points the model's config at it; transformers then calls it in every attention module
that goes through the interface, with the mask SDPA would get (the mask function is SDPA's). It sends one
query on CUDA to ops.attention and everything else (prompts, CPU, training with dropout, attention sinks,
position biases) to transformers' own SDPA function, unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from zeroquant import kernels
from zeroquant.kernels import ops
from zeroquant.models.adapters import get_arch, is_encoder

ATTENTION = "zeroquant"
_DTYPES = (torch.float16, torch.bfloat16)


def _takes(module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: object, dropout: float,
           kwargs: dict) -> bool:
    """Whether the kernel computes exactly what SDPA would here."""
    return (query.shape[2] == 1 and kernels.runs_on(query) and query.dtype in _DTYPES
            and query.shape[-1] <= 256 and query.shape[1] % key.shape[1] == 0
            and not (module.training and dropout > 0)
            and (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4))
            and kwargs.get("s_aux") is None and kwargs.get("position_bias") is None)


def kernel_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q [B, H, Sq, D], k/v [B, HK, Sk, D] -> ([B, Sq, H, D], None)."""
    if _takes(module, query, key, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return ops.attention(query, key, value, attention_mask, scale).transpose(1, 2), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def use_kernel_attention(model: nn.Module) -> bool:
    """Point a decoder that runs SDPA through transformers' attention interface at kernel_attention (registered
    with transformers under ATTENTION, here and nowhere else). Encoders, models on another implementation (eager,
    flash attention) and models with their own attention code are left as they are.
    Returns whether the model changed."""
    config = getattr(model, "config", None)
    arch = get_arch(model, allow_generic=True)
    if arch is not None and is_encoder(model, arch):
        return False  # encoder self-attention has its own kernel (models.encoder_attention, placed by fuse)
    if (getattr(config, "_attn_implementation", None) != "sdpa"
            or not getattr(type(model), "_supports_attention_backend", False)):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, kernel_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
    return True
