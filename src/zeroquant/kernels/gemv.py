"""The GEMV: one token (M = 1) on CUDA cores, for every format the small-M INT4 GEMM does not take."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import act_code
from .gemm_common import _chunk, _exact_float, _gpu_time, _k_slice, _split_k_sum, split_counters
from .launch import device_index, device_info, pdl_flags, wait_for_producer
from .rowwise import apply_act
from .weight_format import KernelWeight

# X_TILE (INT8 weights; the INT4 path ignores it): load the token as a [BLOCK_N, BLOCK_K] tile, every row the
# same K slice, so it arrives in the weight slab's layout; otherwise it is loaded once a step and the compiler
# moves it into that layout through shared memory, with barriers. Neither won at every shape (bench/NOTES.md,
# session 15), so the autotuner measures both.
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "X_TILE": xt}, num_warps=w)
    for bn, bk, w in [(16, 256, 4), (32, 256, 4), (8, 256, 4), (16, 512, 4), (8, 512, 4), (4, 1024, 4),
                      (8, 1024, 4)] for xt in (False, True)
]
MAX_SPLIT = 16  # the most K slices _gemv_split picks


def _prune_gemv(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    k = args["K"]
    keep = [c for c in configs if k % c.kwargs["BLOCK_K"] == 0 and (args["W_BITS"] == 8 or not c.kwargs["X_TILE"])]
    return keep or [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128 if k % 128 == 0 else 64, "X_TILE": True}, num_warps=4)]


def _gemv_split(args: dict) -> int:
    """K slices per tile of rows: up to 8 programs per SM, so enough weight loads are in flight when N alone
    gives few tiles (11008 x 4096 read at half the bandwidth without; bench/NOTES.md, kernel choices)."""
    tiles = triton.cdiv(args["N"], args["BLOCK_N"])
    sms = device_info(device_index(args["a_ptr"]))[1]
    return max(1, min(8 * sms // tiles, args["K"] // args["BLOCK_K"], MAX_SPLIT))


@triton.autotune(
    configs=_GEMV_CONFIGS,
    key=["N", "K", "A_INT8", "W_BITS", "HAS_ZERO", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": _prune_gemv},
    do_bench=_gpu_time,
)
@triton.heuristics({"CH": _chunk, "SPLIT": _gemv_split})
@triton.jit
def _gemv_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, z_ptr, b_ptr, c_ptr, ws_ptr, cnt_ptr, N, K, stride_wn,
    A_INT8: tl.constexpr, W_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, CH: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PDL: tl.constexpr, X_TILE: tl.constexpr,
):
    """One token (M = 1): y = x @ W^T on CUDA cores, weights streamed in wide K-contiguous rows.

    No tensor cores (a single row would waste 15/16 of an MMA): program (n, s) reads [BLOCK_N, BLOCK_K] slabs
    of the s-th of SPLIT slices of K and multiplies them by x in float32 (exact for int8 x) into a
    per-element accumulator, each chunk's products scaled by the chunk's group scale; one sum at the end, and
    _split_k_sum adds the slices. With X_TILE the loop uses no shared memory at all.
    """
    wait_for_producer(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    NCH: tl.constexpr = BLOCK_K // CH
    WIDTH: tl.constexpr = CH // 2 if W_BITS == 4 else CH  # channels of a chunk one byte column covers
    acc = tl.zeros((BLOCK_N, NCH, WIDTH), dtype=tl.float32)
    if GROUP_SIZE == 0:
        s = tl.load(s_ptr + rn).to(tl.float32)
        z = tl.load(z_ptr + rn).to(tl.float32) if HAS_ZERO else s
    k_beg, k_end = _k_slice(K, pid_k, SPLIT, BLOCK_K)
    for k0 in range(k_beg, k_end, BLOCK_K):
        if GROUP_SIZE > 0:
            g = (k0 + tl.arange(0, NCH) * CH) // GROUP_SIZE
            sg = tl.load(s_ptr + g[None, :] * N + rn[:, None]).to(tl.float32)[:, :, None]  # [BLOCK_N, NCH, 1]
        if W_BITS == 4:
            wb = tl.reshape(tl.load(w_rows + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :]), (BLOCK_N, NCH, WIDTH))
            ch = k0 + tl.arange(0, NCH)[:, None] * CH + tl.arange(0, WIDTH)[None, :]  # [NCH, WIDTH] channels
            x_lo = tl.load(a_ptr + ch).to(tl.float32)
            x_hi = tl.load(a_ptr + ch + WIDTH).to(tl.float32)
            q_lo = ((wb & 0xF).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q
            q_hi = ((wb >> 4).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
            if GROUP_SIZE > 0:
                if HAS_ZERO:
                    off = (tl.load(z_ptr + g[None, :] * N + rn[:, None]).to(tl.float32) + 8388608.0)[:, :, None]
                else:
                    off = 8388616.0
                acc = tl.fma((q_lo - off) * x_lo[None] + (q_hi - off) * x_hi[None], sg, acc)
            else:
                off = (z + 8388608.0)[:, None, None] if HAS_ZERO else 8388616.0  # 2^23 + 8: symmetric
                acc += (q_lo - off) * x_lo[None] + (q_hi - off) * x_hi[None]
        else:
            w = tl.load(w_rows + (k0 + tl.arange(0, BLOCK_K))[None, :])
            wf = tl.reshape(_exact_float(w.to(tl.int32)), (BLOCK_N, NCH, CH))
            if X_TILE:
                x = tl.load(a_ptr + k0 + tl.zeros((BLOCK_N, 1), tl.int32) + tl.arange(0, BLOCK_K)[None, :])
                x = tl.reshape(x.to(tl.float32), (BLOCK_N, NCH, CH))
            else:
                x = tl.reshape(tl.load(a_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32), (NCH, CH))[None]
            if GROUP_SIZE > 0:
                acc = tl.fma(wf * x, sg, acc)
            else:
                acc = tl.fma(wf, x, acc)
    out = tl.sum(tl.sum(acc, 2), 1)
    if GROUP_SIZE == 0:
        out = out * s
    last = True
    if SPLIT > 1:
        out, last = _split_k_sum(out, ws_ptr, cnt_ptr, offs_n, tl.num_programs(0) * BLOCK_N, pid_n, pid_k, SPLIT)
    if last:
        if A_INT8:
            out = out * tl.load(as_ptr)
        if HAS_BIAS:
            out += tl.load(b_ptr + rn).to(tl.float32)
        out = apply_act(out, ACT)
        tl.store(c_ptr + offs_n, out.to(c_ptr.dtype.element_ty), mask=offs_n < N)


def gemv(a, xs, w: KernelWeight, bias, act, c) -> None:
    """Launch _gemv_kernel on one token a [1, K] (int8 with its float32 scale xs, or fp16/bf16 with xs = c)."""
    n, k = w.out_features, a.shape[1]
    # Room for any configuration's split: at most MAX_SPLIT slices of at most n rounded up to a tile.
    ws = torch.empty(MAX_SPLIT * triton.cdiv(n, 32) * 32, dtype=torch.float32, device=a.device)
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])](
        a, xs, w.qweight, w.scale, w.zero if w.zero is not None else w.scale, bias if bias is not None else c, c,
        ws, split_counters(a.device, triton.cdiv(n, 4)), n, k, w.qweight.stride(0), A_INT8=a.dtype == torch.int8,
        W_BITS=w.bits, HAS_ZERO=w.zero is not None, GROUP_SIZE=w.kernel_group, HAS_BIAS=bias is not None,
        ACT=act_code(act), **pdl_flags(a, graph_only=True),
    )
