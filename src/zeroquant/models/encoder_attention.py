"""BERT-family self-attention on zeroquant's attention kernel: the module keeps Hugging Face's BERT attention
interface (forward(hidden_states, attention_mask, ...) -> (output, weights); num_attention_heads,
attention_head_size) and runs softmax(q k^T * scale + mask) v in one Triton kernel on CUDA at inference."""

from __future__ import annotations

import torch
from torch import nn

from zeroquant import kernels
from zeroquant.kernels import ops
from zeroquant.nn import packing
from zeroquant.nn.fused import inference, packed_linears
from zeroquant.nn.qlinear import QuantLinear


class EncoderAttention(nn.Module):
    """A bidirectional self-attention whose softmax(q k^T * scale + mask) v runs on zeroquant's attention
    kernel (kernels.triton.attention) on CUDA at inference. Holds the original module's children under their own
    names; anything the kernel does not cover takes the original module's forward, on the same children."""

    def __init__(self, attn: nn.Module, query: str, key: str, value: str) -> None:
        super().__init__()
        self.names = (query, key, value)
        for n, m in attn.named_children():
            self.add_module(n, m)
        self.heads, self.head_dim = attn.num_attention_heads, attn.attention_head_size
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.original = (attn,)  # a tuple: not a submodule, so parameter names stay the same
        self.train(attn.training)

    def _kernel_mask(self, mask: object) -> tuple[bool, torch.Tensor | None]:
        """(whether the kernel takes this mask, the mask in a form it reads)."""
        if mask is None:
            return True, None
        if not isinstance(mask, torch.Tensor):
            return False, None  # e.g. flex attention's BlockMask
        if mask.dim() == 2:  # [B, Sk] padding mask (flash-attention implementations pass it as it is)
            return True, mask.bool()[:, None, None, :]
        return mask.dim() == 4, mask

    def forward(self, hidden_states: torch.Tensor, attention_mask: object = None, past_key_values: object = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        # set_mode(model, "ref"|"fake") on the projections sends the whole attention to the reference path
        ref = any(isinstance(getattr(self, n), QuantLinear) and getattr(self, n).mode != "int" for n in self.names)
        fast = (not ref and inference(hidden_states) and kernels.runs_on(hidden_states)
                and hidden_states.dtype in (torch.float16, torch.bfloat16) and past_key_values is None
                and kwargs.get("encoder_hidden_states") is None and not kwargs.get("output_attentions"))
        ok, mask = self._kernel_mask(attention_mask) if fast else (False, None)
        if not ok:
            (orig,) = self.original
            for n, m in self.named_children():  # the original forward must see this module's children
                orig._modules[n] = m
            orig.train(self.training)
            return orig(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        lead = hidden_states.shape[:-1]
        proj = self._packed_projection(hidden_states)
        if proj is None:
            proj = [getattr(self, n)(hidden_states) for n in self.names]
        q, k, v = (p.view(*lead, -1, self.head_dim).transpose(1, 2) for p in proj)
        out = ops.attention(q, k, v, mask, self.scaling)
        return out.transpose(1, 2).reshape(*lead, -1), None

    def _apply(self, fn, recurse=True):
        packing.drop_pack(self)
        return super()._apply(fn, recurse)

    def _packed_projection(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """q, k and v from one GEMM over their packed weights (zeroquant.nn.packing; faster than three GEMMs:
        docs/history.md, kernel choices), packing them on first use; None where the kernels cannot."""
        lins = [getattr(self, n) for n in self.names]
        packed = packing.cached_pack(self, lins, x)
        return None if packed is None else packed_linears(packed, lins, x)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, on the attention kernel where it applies"
