"""INT4 weights unpacked whole, for prompts and batches large enough that their GEMM is compute-bound.

There the weights' bytes no longer set the time, and an INT4 GEMM's unpacking inside its K loop costs more
than unpacking the weight once per forward into a scratch tensor and running the fastest dense GEMM on it:
progressive INT4 becomes the INT8 weight s2 * (q - z) with one float scale a row, exactly a per-channel W8A8
weight (the ping-pong GEMM), and any INT4 weight becomes its tokens' dtype (cuBLAS). Writing the scratch costs
about one pass over a 16-bit weight. gemm.quant_linear decides from how many tokens on (docs/kernels.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from zeroquant.kernels import reference
from zeroquant.kernels.triton.gemm_common import PACK_C
from zeroquant.kernels.weight_format import KernelWeight

BLOCK_N, NUM_WARPS = 32, 4  # weight rows a program, and its warps (bench/unpack_configs.py)


@triton.jit
def _unpack_kernel(w_ptr, s_ptr, z_ptr, r_ptr, o_ptr, N, K, stride_wn, stride_sg, stride_sn,
                   GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, PROG: tl.constexpr, OUT_INT8: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """Program (n, b): weight rows n * BLOCK_N.. and their bytes b * BLOCK_B..; byte j of a half-split chunk
    holds the chunk's channel j (low nibble) and j + PACK_C / 2 (high nibble). A program's bytes lie in one
    group (the launch makes 2 * BLOCK_B divide the group), so its scales and zero points are one per row: a
    vector load, where a per-element gather of them cost more than the weights' own load."""
    HALF: tl.constexpr = PACK_C // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    byte = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rn < N
    mask = row_ok[:, None] & (byte < K // 2)[None, :]
    wb = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + byte[None, :], mask=mask, other=0).to(tl.int32)
    ch = (byte // HALF) * PACK_C + byte % HALF  # the low nibbles' channels
    g = (tl.program_id(1) * BLOCK_B * 2) // GROUP_SIZE if GROUP_SIZE > 0 else 0
    sz = g * stride_sg + rn * stride_sn
    s = tl.load(s_ptr + sz, mask=row_ok, other=0)[:, None]
    z = tl.load(z_ptr + sz, mask=row_ok, other=0).to(tl.int32)[:, None] if HAS_ZERO else 8
    if not OUT_INT8:  # the reference's rounding: (q - z) times the float32 scale (s1 * s2 when progressive)
        scale = s.to(tl.float32) * tl.load(r_ptr + rn, mask=row_ok, other=0)[:, None] if PROG else s.to(tl.float32)
    out = o_ptr + rn[:, None].to(tl.int64) * K + ch[None, :]
    for plane in tl.static_range(2):
        q = (wb >> (4 * plane)) & 0xF
        if OUT_INT8:  # progressive: s2 * (q - z) is int8 by the format's own check
            w = (s.to(tl.int32) * (q - z)).to(tl.int8)
        else:
            w = ((q - z).to(tl.float32) * scale).to(o_ptr.dtype.element_ty)
        tl.store(out + plane * HALF, w, mask=mask)


def unpack_int4(w: KernelWeight, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] in dtype from INT4 w: int8 gives s2 * (q - z) of progressive weights (their row scales apply
    after the GEMM); float16 / bfloat16 the dequantized weight. Twin: reference.unpacked_weight."""
    if w.bits != 4:
        raise ValueError(f"unpack_int4 takes INT4 weights, got {w.bits}-bit")
    if dtype == torch.int8 and w.row_scale is None:
        raise ValueError("only progressive INT4 (integer group scales) unpacks to INT8")
    n, k = w.out_features, w.in_features
    out = torch.empty(n, k, dtype=dtype, device=w.qweight.device)
    _launch(w, out, BLOCK_N, NUM_WARPS)
    return out


def block_bytes(group: int) -> int:
    """Bytes of a row a program unpacks for the kernels' GROUP_SIZE `group`: 2 x them must divide the group
    (groups are whole 64-channel chunks, so 32 bytes or more)."""
    return math.gcd(128, group // 2) if group else 128


def _launch(w: KernelWeight, out: torch.Tensor, block_n: int, num_warps: int) -> None:
    n, k = w.out_features, w.in_features
    group = w.kernel_group
    block_b = block_bytes(group)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // 2, block_b))
    _unpack_kernel[grid](
        w.qweight, w.scale, w.zero if w.zero is not None else w.scale,
        w.row_scale if w.row_scale is not None else w.scale, out, n, k, w.qweight.stride(0), w.scale.stride(0),
        w.scale.stride(1), GROUP_SIZE=group, HAS_ZERO=w.zero is not None, PROG=w.row_scale is not None,
        OUT_INT8=out.dtype == torch.int8, BLOCK_N=block_n, BLOCK_B=block_b, num_warps=num_warps)


def as_int8_weight(w: KernelWeight, w8: torch.Tensor) -> KernelWeight:
    """The per-channel W8A8 weight that progressive INT4 w is once unpacked to w8: the row scales per channel."""
    return KernelWeight(w8, w.row_scale.reshape(1, -1), None, 8, w.in_features, w.out_features, w.in_features)


def dense_unpacked(a: torch.Tensor, xs: torch.Tensor | None, w: KernelWeight, bias: torch.Tensor | None,
                   act: str | None, c: torch.Tensor) -> None:
    """c = act(a [* xs] @ W^T + bias) by cuBLAS on INT4 w unpacked to c's dtype, bias in its epilogue: a fp16/bf16
    with xs None, or int8 with float32 per-token scales xs [M], then dequantized to c's dtype first."""
    a16 = a if xs is None else (a.float() * xs[:, None]).to(c.dtype)
    w16 = unpack_int4(w, a16.dtype)
    if bias is not None:
        torch.addmm(bias.to(c.dtype), a16, w16.t(), out=c)
    else:
        torch.mm(a16, w16.t(), out=c)
    reference.apply_act_(c, act)
