"""Quantized linear layers on the GPU: which GEMM family takes which shape (one dispatch).

- gemv: one token (decode at batch 1), every format, and two fp16/int8 tokens with INT4 weights, on CUDA cores,
  split-K;
- skinny_mma: INT4 weights at 3..16 fp16 tokens on Hopper (batched decode) in Gluon, the weights unpacked straight
  into mma.sync's register operand, split-K; group sizes that are multiples of 128, separate scale buffers;
- skinny_gemm: INT4 weights at 3..16 tokens (2..16 bf16) on Hopper, the other formats and token types (progressive
  INT4 among them), the weights as the MMA's M side, split-K;
- tma_pingpong: prefill W8A8 (512 tokens and more) with per-channel weights and 16-bit outputs on Hopper in
  Gluon, warp-specialized (one TMA producer warp, two consumer warpgroups on alternate tiles, each one's epilogue
  under the other's MMAs);
- tma_gemm: prefill W8A8 with per-channel weights on Hopper from 257 tokens where tma_pingpong does not take it
  (fewer tokens, float32 outputs, a Triton without Gluon), operands by TMA;
- w4_gemm: INT4 weights at 17 to UNPACK_TOKENS - 1 tokens on Hopper against 16-bit tokens, and progressive ones
  against INT8 tokens, the weights unpacked into the warpgroup MMA's register operand, split over K where the
  tiles are too few for the SMs;
- tile_gemm: everything else, every format, with a fused dequantizing epilogue (INT4 with float group scales
  against INT8 tokens from 17 tokens to UNPACK_TOKENS among them, and every INT4 format before Hopper);
- unpack: from UNPACK_TOKENS tokens on, INT4 weights unpacked whole first: progressive ones against INT8 tokens
  to an INT8 per-channel weight for the W8A8 GEMMs, the others to 16 bits for cuBLAS (INT8 tokens dequantized
  first). The dense GEMMs beat any INT4 main loop there by more than the unpacking costs.
(gluon/progressive_gemm, w4_gemm's Gluon form for progressive INT4 against INT8 tokens, is not dispatched to:
it trails w4_gemm or the unpack path at every size but one.)
All of them apply the per-token activation scale, bias and activation in their epilogue. Why each shape
goes where it goes: docs/kernels.md (measurements: docs/history.md).
"""

from __future__ import annotations

import torch

from zeroquant.kernels import reference
from zeroquant.kernels.triton.gemv import gemv, gemv_ok
from zeroquant.kernels.triton.skinny_gemm import skinny_ok, w4_skinny
from zeroquant.kernels.triton.tile_gemm import tile_gemm
from zeroquant.kernels.triton.tma_gemm import tma_ok, w8a8_tma
from zeroquant.kernels.triton.unpack import as_int8_weight, dense_unpacked, unpack_int4
from zeroquant.kernels.triton.w4_gemm import w4_gemm, w4_gemm_ok
from zeroquant.kernels.weight_format import KernelWeight

try:  # Gluon as in Triton 3.6; with an older Triton, fp16 tokens take skinny_gemm like every other format
    from zeroquant.kernels.gluon.skinny_mma import mma_ok, w4a16_mma
except (ImportError, AttributeError):
    mma_ok = w4a16_mma = None
try:  # Gluon's Hopper warp specialization (Triton 3.6); without it prefill W8A8 takes the TMA GEMM alone
    from zeroquant.kernels.gluon.tma_pingpong import pingpong_ok, w8a8_pingpong
except (ImportError, AttributeError):
    pingpong_ok = w8a8_pingpong = None

__all__ = ["KernelWeight", "quant_linear"]

UNPACK_TOKENS = 256  # where unpacking INT4 weights whole overtook the INT4 GEMMs (docs/kernels.md)


def quant_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    w: KernelWeight,
    bias: torch.Tensor | None = None,
    act: str | None = None,
    out_dtype: torch.dtype = torch.float16,
    glu: bool = False,
) -> torch.Tensor:
    """act(x [* x_scale] @ W^T + bias) -> [..., N] in out_dtype; twin: reference.quant_linear.

    x: int8 [..., K] with float32 per-token x_scale [..., 1] (W8A8/W4A8), or fp16/bf16 with x_scale None.
    glu: W is a gated MLP's gate rows then its up rows, and the result is act(gate) * up [..., N / 2]
    (twin: reference.gated_linear); the GEMV (one token, or two fp16/int8 with INT4 weights) runs it in its epilogue,
    more tokens after the GEMM.
    """
    k = x.shape[-1]
    if k != w.in_features:
        raise ValueError(f"input has {k} features, weight expects {w.in_features}")
    a_int8 = x_scale is not None
    if a_int8 != (x.dtype == torch.int8):
        raise ValueError("pass x_scale exactly when x is int8")
    lead = x.shape[:-1]
    a = x.reshape(-1, k)
    if a.stride(-1) != 1:
        a = a.contiguous()
    m = a.shape[0]
    on_gemv = gemv_ok(a, w)
    dtype = out_dtype if a_int8 else x.dtype
    if glu and not on_gemv:  # the product after the GEMM
        return reference.glu(quant_linear(x, x_scale, w, bias, None, out_dtype), act, dtype)
    n = w.out_features // 2 if glu else w.out_features
    c = torch.empty((m, n), dtype=dtype, device=x.device)
    if m == 0:
        return c.reshape(*lead, n)
    xs = x_scale.reshape(-1).float().contiguous() if a_int8 else c
    if w.bits == 4 and m >= UNPACK_TOKENS:
        if a_int8 and w.row_scale is not None:
            w = as_int8_weight(w, unpack_int4(w, torch.int8))  # then a per-channel W8A8 GEMM below
        else:  # 16-bit tokens, or INT8 ones against float group scales
            dense_unpacked(a, xs if a_int8 else None, w, bias, act, c)
            return c.reshape(*lead, n)
    if on_gemv:
        gemv(a, xs, w, bias, act, c, glu)
    elif (not a_int8 or w.row_scale is not None) and w4_gemm_ok(a, w):
        w4_gemm(a, xs if a_int8 else None, w, bias, act, c)
    elif w.row_scale is None and mma_ok is not None and mma_ok(a, w):
        w4a16_mma(a, w, bias, act, c)
    elif skinny_ok(a, w):
        w4_skinny(a, xs if a_int8 else None, w, bias, act, c)
    elif a_int8 and tma_ok(a, w):
        if pingpong_ok is not None and pingpong_ok(a, c):
            w8a8_pingpong(a, xs, w, bias, act, c)
        else:
            w8a8_tma(a, xs, w, bias, act, c)
    else:
        tile_gemm(a, xs, w, bias, act, c)
    return c.reshape(*lead, n)
