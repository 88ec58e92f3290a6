"""The GEMV: one token (M = 1) on CUDA cores, for every format the small-M INT4 GEMM does not take."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import act_code
from .gemm_common import _chunk, _exact_float, _gpu_time
from .launch import pdl_flags, wait_for_producer
from .rowwise import apply_act
from .weight_format import KernelWeight

_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
    for bn, bk, w in [(16, 256, 4), (32, 256, 4), (16, 512, 4), (32, 512, 4), (16, 1024, 4), (32, 1024, 8),
                      (8, 1024, 4)]
]


def _prune_gemv(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    k = args["K"]
    keep = [c for c in configs if k % c.kwargs["BLOCK_K"] == 0]
    return keep or [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128 if k % 128 == 0 else 64}, num_warps=4)]


@triton.autotune(
    configs=_GEMV_CONFIGS,
    key=["N", "K", "A_INT8", "W_BITS", "HAS_ZERO", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": _prune_gemv},
    do_bench=_gpu_time,
)
@triton.heuristics({"CH": _chunk})
@triton.jit
def _gemv_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, z_ptr, b_ptr, c_ptr, N, K, stride_wn,
    A_INT8: tl.constexpr, W_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, CH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """One token (M = 1): y = x @ W^T on CUDA cores, weights streamed in wide K-contiguous rows.

    No tensor cores (a single row would waste 15/16 of an MMA) and no shared memory: each program reads
    a [BLOCK_N, BLOCK_K] slab, multiplies by x in float32 (exact for int8 x), reduces each chunk, and
    applies the chunk's group scale to the chunk's sum rather than to every weight.
    """
    wait_for_producer(PDL)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    NCH: tl.constexpr = BLOCK_K // CH
    HALF: tl.constexpr = CH // 2
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if GROUP_SIZE == 0:
        s = tl.load(s_ptr + rn)
        z = tl.load(z_ptr + rn) if HAS_ZERO else s
    for k0 in range(0, K, BLOCK_K):
        if W_BITS == 4:
            wb = tl.load(w_rows + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :])
            wb = tl.reshape(wb, (BLOCK_N, NCH, HALF))
            ch = k0 + tl.arange(0, NCH)[:, None] * CH + tl.arange(0, HALF)[None, :]  # [NCH, HALF] channels
            x_lo = tl.load(a_ptr + ch).to(tl.float32)
            x_hi = tl.load(a_ptr + ch + HALF).to(tl.float32)
            q_lo = ((wb & 0xF).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q
            q_hi = ((wb >> 4).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
            if GROUP_SIZE > 0:
                g = (k0 + tl.arange(0, NCH) * CH) // GROUP_SIZE
                s = tl.load(s_ptr + g[None, :] * N + rn[:, None])  # [BLOCK_N, NCH]
                z = tl.load(z_ptr + g[None, :] * N + rn[:, None]) if HAS_ZERO else s
                off = (z + 8388608.0) if HAS_ZERO else 8388616.0
                part = tl.sum((q_lo - off[:, :, None]) * x_lo[None] + (q_hi - off[:, :, None]) * x_hi[None], 2)
                acc += tl.sum(part * s, 1)
            else:
                off = (z + 8388608.0)[:, None, None] if HAS_ZERO else 8388616.0
                acc += tl.sum(tl.sum((q_lo - off) * x_lo[None] + (q_hi - off) * x_hi[None], 2), 1)
        else:
            w = tl.load(w_rows + (k0 + tl.arange(0, BLOCK_K))[None, :])
            wf = tl.reshape(_exact_float(w.to(tl.int32)), (BLOCK_N, NCH, CH))
            x = tl.reshape(tl.load(a_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32), (NCH, CH))
            part = tl.sum(wf * x[None], 2)  # [BLOCK_N, NCH]
            if GROUP_SIZE > 0:
                g = (k0 + tl.arange(0, NCH) * CH) // GROUP_SIZE
                acc += tl.sum(part * tl.load(s_ptr + g[None, :] * N + rn[:, None]), 1)
            else:
                acc += tl.sum(part, 1)
    if GROUP_SIZE == 0:
        acc = acc * s
    if A_INT8:
        acc = acc * tl.load(as_ptr)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)
    acc = apply_act(acc, ACT)
    tl.store(c_ptr + offs_n, acc.to(c_ptr.dtype.element_ty), mask=offs_n < N)




def gemv(a, xs, w: KernelWeight, bias, act, c) -> None:
    """Launch _gemv_kernel on one token a [1, K] (int8 with its float32 scale xs, or fp16/bf16 with xs = c)."""
    n, k = w.out_features, a.shape[1]
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        a, xs, w.qweight, w.scale, w.zero if w.zero is not None else w.scale, bias if bias is not None else c, c,
        n, k, w.qweight.stride(0), A_INT8=a.dtype == torch.int8, W_BITS=w.bits, HAS_ZERO=w.zero is not None,
        GROUP_SIZE=w.kernel_group, HAS_BIAS=bias is not None, ACT=act_code(act), **pdl_flags(a, graph_only=True),
    )
