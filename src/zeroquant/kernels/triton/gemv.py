"""The GEMVs on CUDA cores: one token (M = 1), INT8 weights (_gemv_kernel), and the dispatch (gemv, gemv_ok)
that also launches w4_gemv.py's INT4 GEMV (_w4_gemv_kernel, which also takes two fp16 or int8 tokens)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroquant.kernels import act_code
from zeroquant.kernels.triton.gemm_common import _chunk, _exact_float, _gpu_time, _k_slice, split_counters
from zeroquant.kernels.triton.launch import device_index, device_info, pdl_flags, wait_for_producer
from zeroquant.kernels.triton.w4_gemv import (
    MAX_SPLIT,
    W4_BLOCK_N,
    _gemv_epilogue,
    _gemv_rows,
    _w4_gemv_kernel,
    _w4_plan,
)
from zeroquant.kernels.weight_format import KernelWeight

# X_TILE: load the token as a [BLOCK_N, BLOCK_K] tile, every row the
# same K slice, so it arrives in the weight slab's layout; otherwise it is loaded once a step and the compiler
# moves it into that layout through shared memory, with barriers. Neither won at every shape (docs/history.md),
# so the autotuner measures both.
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "X_TILE": xt}, num_warps=w)
    for bn, bk, w in [(16, 256, 4), (32, 256, 4), (8, 256, 4), (16, 512, 4), (8, 512, 4), (4, 1024, 4),
                      (8, 1024, 4)] for xt in (False, True)
]


def _prune_gemv(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    k = args["K"]
    keep = [c for c in configs if k % c.kwargs["BLOCK_K"] == 0]
    return keep or [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128 if k % 128 == 0 else 64, "X_TILE": True}, num_warps=4)]


def _gemv_split(args: dict) -> int:
    """K slices per tile of rows: up to 8 programs per SM, so enough weight loads are in flight when N alone
    gives few tiles (docs/history.md, kernel choices)."""
    tiles = triton.cdiv(args["N"], args["BLOCK_N"])
    sms = device_info(device_index(args["a_ptr"]))[1]
    return max(1, min(8 * sms // tiles, args["K"] // args["BLOCK_K"], MAX_SPLIT))


@triton.autotune(
    configs=_GEMV_CONFIGS,
    key=["N", "K", "A_INT8", "GROUP_SIZE", "GLU"],
    prune_configs_by={"early_config_prune": _prune_gemv},
    do_bench=_gpu_time,
)
@triton.heuristics({"CH": lambda args: _chunk({**args, "W_BITS": 8}), "SPLIT": _gemv_split})
@triton.jit
def _gemv_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, b_ptr, c_ptr, ws_ptr, cnt_ptr, N, K, stride_wn,
    A_INT8: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    GLU: tl.constexpr, CH: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr, X_TILE: tl.constexpr,
):
    """One token (M = 1), INT8 weights: y = x @ W^T on CUDA cores, weights streamed in wide K-contiguous rows.

    No tensor cores (a single row would waste 15/16 of an MMA): program (n, s) reads [BLOCK_N, BLOCK_K] slabs
    of the s-th of SPLIT slices of K and multiplies them by x in float32 (exact for int8 x) into a
    per-element accumulator, each chunk's products scaled by the chunk's group scale; one sum at the end, and
    _split_k_sum adds the slices. With X_TILE the loop uses no shared memory at all.
    """
    wait_for_producer(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n, rn = _gemv_rows(pid_n, N, GLU, BLOCK_N)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    NCH: tl.constexpr = BLOCK_K // CH
    acc = tl.zeros((BLOCK_N, NCH, CH), dtype=tl.float32)
    if GROUP_SIZE == 0:
        s = tl.load(s_ptr + rn).to(tl.float32)
    k_beg, k_end = _k_slice(K, pid_k, SPLIT, BLOCK_K)
    for k0 in range(k_beg, k_end, BLOCK_K):
        w = tl.load(w_rows + (k0 + tl.arange(0, BLOCK_K))[None, :])
        wf = tl.reshape(_exact_float(w.to(tl.int32)), (BLOCK_N, NCH, CH))
        if X_TILE:
            x = tl.load(a_ptr + k0 + tl.zeros((BLOCK_N, 1), tl.int32) + tl.arange(0, BLOCK_K)[None, :])
            x = tl.reshape(x.to(tl.float32), (BLOCK_N, NCH, CH))
        else:
            x = tl.reshape(tl.load(a_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32), (NCH, CH))[None]
        if GROUP_SIZE > 0:
            g = (k0 + tl.arange(0, NCH) * CH) // GROUP_SIZE
            sg = tl.load(s_ptr + g[None, :] * N + rn[:, None]).to(tl.float32)[:, :, None]  # [BLOCK_N, NCH, 1]
            acc = tl.fma(wf * x, sg, acc)
        else:
            acc = tl.fma(wf, x, acc)
    out = tl.sum(tl.sum(acc, 2), 1)
    if GROUP_SIZE == 0:
        out = out * s
    _gemv_epilogue(out, out, offs_n, rn, pid_n, pid_k, as_ptr, b_ptr, c_ptr, 0, ws_ptr, cnt_ptr, N, A_INT8, HAS_BIAS,
                   ACT, GLU, SPLIT, BLOCK_N, 1)


def gemv_ok(a: torch.Tensor, w: KernelWeight) -> bool:
    """Whether the GEMVs take tokens a: one token, or two fp16/int8 tokens against INT4 weights (two bf16 tokens
    run faster on the small-M kernel: docs/kernels.md); K a whole number of chunks. Progressive weights (row
    scales) are INT4, which the INT4 GEMV reads."""
    two = a.shape[0] == 2 and w.bits == 4 and a.dtype != torch.bfloat16
    return a.shape[1] % 64 == 0 and (a.shape[0] == 1 or two)


def gemv(a, xs, w: KernelWeight, bias, act, c, glu: bool = False) -> None:
    """Tokens a [M, K] as gemv_ok takes them (int8 with float32 scales xs [M], or fp16/bf16 with xs = c) against
    INT8 or INT4 weights: _gemv_kernel or _w4_gemv_kernel. glu: w holds gate rows then up rows, c gets
    act(gate) * up."""
    m, (n, k) = a.shape[0], (w.out_features, a.shape[1])
    # Room for any configuration's split: at most MAX_SPLIT slices of at most n rounded up to a tile, per token.
    ws = torch.empty(m * MAX_SPLIT * triton.cdiv(n, 64) * 64, dtype=torch.float32, device=a.device)
    args = (a, xs, w.qweight, w.scale) + ((w.zero if w.zero is not None else w.scale,) if w.bits == 4 else ())
    args += (bias if bias is not None else c, c, ws, split_counters(a.device, triton.cdiv(n, 4)), n, k,
             w.qweight.stride(0))
    flags = dict(A_INT8=a.dtype == torch.int8, GROUP_SIZE=w.kernel_group, HAS_BIAS=bias is not None,
                 ACT=act_code(act), GLU=glu, **pdl_flags(a, graph_only=True))

    def tiles(block_n: int) -> int:  # a GLU program's BLOCK_N rows make BLOCK_N / 2 outputs
        return triton.cdiv(n // 2, block_n // 2) if glu else triton.cdiv(n, block_n)

    if w.bits == 8:
        _gemv_kernel[lambda meta: (tiles(meta["BLOCK_N"]), meta["SPLIT"])](*args, **flags)
    else:
        split, step, unroll = _w4_plan(a, n, k, w.kernel_group)
        _w4_gemv_kernel[(tiles(W4_BLOCK_N), split)](
            *args, **flags, HAS_ZERO=w.zero is not None, STEP=step, SPLIT=split, BLOCK_N=W4_BLOCK_N,
            SZ_WORD=w.sz_step == 2, UNROLL=unroll, TOKENS=m, stride_am=a.stride(0), stride_cm=c.stride(0),
            rs_ptr=w.row_scale, ROW_SCALE=w.row_scale is not None, num_warps=4)
