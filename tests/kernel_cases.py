"""Shared builders for kernel tests: quantized weights in QuantLinear format and their kernel twins, and the GPU
tests' poisoned allocations and error measure."""

from __future__ import annotations

import torch

from zeroquant.core.config import ActQuant, LinearRule, WeightQuant
from zeroquant.nn.qlinear import QuantLinear

# (name, bits, group_size, symmetric, int8 activations)
VARIANTS = [
    ("w8a8-g128", 8, 128, True, True),
    ("w8a8-channel", 8, -1, True, True),
    ("w4a8-g128", 4, 128, False, True),
    ("w4a16-g128", 4, 128, False, False),
    ("w4a16-channel-sym", 4, -1, True, False),
    ("w8a16-g128", 8, 128, True, False),
]

# BERT-base, GPT-2, Llama-7B linears, SmolLM2's (576 = 4.5 groups of 128: a short last group), and sizes
# that are not multiples of any block (200: group-wise formats are refused, per-channel ones run).
SHAPES = [(768, 768), (768, 3072), (3072, 768), (768, 2304), (4096, 4096), (4096, 11008), (11008, 4096),
          (576, 1536), (1536, 576), (384, 1000), (200, 300)]


def quant_linear(k: int, n: int, bits: int, group: int, sym: bool, a8: bool, device, bias=True,
                 scale_dtype: str = "float32") -> QuantLinear:
    lin = torch.nn.Linear(k, n, bias=bias, device=device)
    torch.nn.init.normal_(lin.weight, std=k**-0.5)
    if bias:
        torch.nn.init.normal_(lin.bias, std=0.1)
    rule = LinearRule(WeightQuant(bits, group, sym, scale_dtype=scale_dtype), ActQuant(8) if a8 else None)
    return QuantLinear.from_float(lin, rule)


def poison_cuda_cache() -> None:
    """Fill freed blocks of the caching allocator (small and large pools) with 0xFF."""
    blocks = [torch.empty(2**19, dtype=torch.uint8, device="cuda").fill_(255) for _ in range(64)]
    blocks.append(torch.empty(2**28, dtype=torch.uint8, device="cuda").fill_(255))
    del blocks


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite output (unwritten or overflowed elements)"
    return ((got.float() - want.float()).norm() / want.float().norm()).item()
