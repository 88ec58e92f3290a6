"""The INT4 GEMM for prompts and serving batches (17 tokens and more, Hopper): C^T = W x^T, tiled over tokens.

The tile GEMM (tile_gemm.py) makes each INT4 weight tile the right-hand operand of its dot. On Hopper that
operand of the warpgroup MMA must sit in shared memory, so every unpacked weight went registers -> shared
memory -> tensor cores, and INT4 ran far below INT8 on that kernel (docs/kernels.md). Here, as in
the small-M kernel (skinny_gemm.py), the weights are the left operand, which the warpgroup MMA reads from
registers: a tile's nibbles become q - zero four at a time (_nibble_planes) and go straight into the MMA;
the tokens stream through shared memory as an INT8 GEMM's would. Against INT8 tokens each group's int32 dot
is exact and is scaled once per group (float16-scale INT4) or not at all (progressive INT4: the weight is
s2 * (q - z) in int8, one int32 accumulator for the whole K loop, the row scale in the epilogue); against
fp16/bf16 tokens each weight is (q - z) * s in the tokens' dtype, one float32 accumulator. The per-token scale,
bias and activation come last.

From 1 to SPLIT_K_TOKENS tokens a tile's K may be split over several programs (SPLIT_K), so that a few token
tiles still put enough programs on the weights. gemm.quant_linear sends 16-bit tokens, and progressive weights
against INT8 tokens, here from 17 tokens to UNPACK_TOKENS - 1 (docs/kernels.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroquant.kernels import act_code
from zeroquant.kernels.triton.gemm_common import (
    PACK_C,
    _exact_float,
    _gpu_time,
    _k_slice,
    _nibble_planes,
    _progressive_operands,
    _progressive_planes,
    _split_k_sum,
    _tile,
    split_counters,
)
from zeroquant.kernels.triton.launch import device_index, device_info
from zeroquant.kernels.triton.rowwise import apply_act
from zeroquant.kernels.triton.skinny_gemm import _word_zero_operand, _zero_operand
from zeroquant.kernels.weight_format import KernelWeight


def _cfg(bn, bt, bk, warps, stages, split=False, split_k=1):
    return triton.Config({"BLOCK_N": bn, "BLOCK_T": bt, "BLOCK_K": bk, "SPLIT": split, "SPLIT_K": split_k},
                         num_warps=warps, num_stages=stages)


# Weight rows a tile are the MMA's M side (64 a warpgroup), tokens its N side. BLOCK_K 64 serves K that is
# a whole number of 64-channel chunks but not of 128 (a short last group). Tiles of 256 weight rows by 128
# tokens fit the registers only with one accumulator: W4A8 with float16 group scales keeps a float one beside
# each group's int32 dot and spilled there when compiled for sm_90 (docs/kernels.md).
_CONFIGS = [_cfg(128, 128, 128, 8, 3), _cfg(128, 128, 128, 8, 4), _cfg(128, 64, 128, 4, 4), _cfg(64, 128, 128, 4, 4),
            _cfg(256, 64, 128, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
            _cfg(64, 64, 64, 4, 4)]
_ONE_ACC_CONFIGS = [_cfg(256, 128, 128, 8, 3), _cfg(256, 128, 64, 8, 3)]
# 16-bit tokens: one accumulator per nibble plane. Triton keeps a warpgroup MMA in flight (async) only when no
# other op in the loop reads its result and its accumulator is float32, so a plane's dot chained into the
# other's waited for its MMAs; with an accumulator each, both planes' MMAs run under the next step's unpacking.
# INT8 tokens gain nothing: their int32 accumulators are never async in Triton 3.6.
_SPLIT_CONFIGS = [_cfg(128, 128, 128, 8, 3, True), _cfg(128, 128, 128, 8, 4, True),
                  _cfg(64, 128, 128, 4, 4, True), _cfg(128, 128, 64, 8, 4, True), _cfg(64, 128, 64, 4, 4, True)]
# Split-K for up to SPLIT_K_TOKENS tokens (M_BUCKET): at 64 tokens a Llama-7B projection has 32 to 172 output tiles
# for 132 SMs, each streaming the whole of K, so the weights were read by too few programs at once; SPLIT_K
# programs a tile each take a slice of K and the last to finish adds the float32 partials (_split_k_sum).
SPLIT_K_TOKENS = 256
# (128 x 128 tiles spilled with the partials' epilogue when compiled for sm_90.)
_SPLIT_K_CONFIGS = [_cfg(128, 64, 128, 4, 4, split_k=2), _cfg(128, 64, 128, 4, 4, split_k=4),
                    _cfg(64, 64, 64, 4, 4, split_k=2), _cfg(64, 64, 64, 4, 4, split_k=4),
                    _cfg(128, 64, 128, 4, 4, True, 2), _cfg(128, 64, 128, 4, 4, True, 4)]
_EVERY_CONFIG = _CONFIGS + _ONE_ACC_CONFIGS + _SPLIT_CONFIGS + _SPLIT_K_CONFIGS


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    k, gs = args["K"], args["GROUP_SIZE"]
    one_acc = not args["A_INT8"] or gs == 0 or args["PROG"]
    bk = lambda c: c.kwargs["BLOCK_K"]
    return [c for c in configs if k % bk(c) == 0 and (not gs or gs % bk(c) == 0 or bk(c) % gs == 0)
            and (one_acc or c not in _ONE_ACC_CONFIGS) and (not args["A_INT8"] or not c.kwargs["SPLIT"])
            and (c.kwargs["SPLIT_K"] == 1 or args["M_BUCKET"] <= SPLIT_K_TOKENS)]


def _m_bucket(m: int) -> int:
    return 64 if m <= 64 else 256 if m <= 256 else 1024 if m <= 1024 else 4096


@triton.jit
def _group_operands(s_ptr, z_ptr, idx, INT_W: tl.constexpr, SZ_WORD: tl.constexpr, HAS_ZERO: tl.constexpr,
                    A_INT8: tl.constexpr, ety: tl.constexpr, BLOCK_N: tl.constexpr):
    """What the unpacking takes for rows idx of one group: (s2, s2 * z mod 256) for progressive weights against
    INT8 tokens, else (float32 scale, zero operand)."""
    if INT_W:  # one return: Triton types every return of a function alike, constexpr branches or not
        s, z = _progressive_operands(s_ptr, z_ptr, idx)
    elif SZ_WORD:
        s, z = _word_zero_operand(s_ptr, idx, A_INT8, ety)
    else:
        s = tl.load(s_ptr + idx).to(tl.float32)
        z = _zero_operand(z_ptr, idx, s, HAS_ZERO, A_INT8, ety, BLOCK_N)
    return s, z


@triton.autotune(
    configs=_EVERY_CONFIG,
    key=["M_BUCKET", "N", "K", "A_INT8", "HAS_ZERO", "GROUP_SIZE", "SZ_WORD", "PROG"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_gpu_time,
)
@triton.jit
def _w4_gemm_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, z_ptr, r_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm, M_BUCKET,
    A_INT8: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, SZ_WORD: tl.constexpr, PROG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    ws_ptr=None, cnt_ptr=None, SPLIT_K: tl.constexpr = 1,
):
    """Program (t, n) computes tokens t * BLOCK_T.. against weight rows n * BLOCK_N..; tokens past M load a
    valid token instead (wrapped) and are never stored. A sub-step of SUB channels never straddles a weight
    group; its bytes hold whole half-split chunks (quant.pack_int4: the low nibbles of a chunk's 32 bytes are
    its channels 0..31, the high nibbles 32..63), so the tokens are gathered to match each nibble plane and one
    dot covers each plane. Program (t, n)'s copy s of SPLIT_K (grid axis 1) takes the s-th slice of K; ws_ptr
    holds SPLIT_K slices of every tile's float32 partials, cnt_ptr one zeroed arrival counter a tile."""
    pid_t, pid_n = _tile(tl.program_id(0), M, N, BLOCK_T, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = offs_n % N
    rt = offs_t % M
    SUB: tl.constexpr = BLOCK_K if GROUP_SIZE == 0 or GROUP_SIZE >= BLOCK_K else GROUP_SIZE
    HALF: tl.constexpr = PACK_C // 2
    byte = tl.arange(0, SUB // 2)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn + byte[None, :]
    a_lo = a_ptr + rt[None, :].to(tl.int64) * stride_am + ((byte // HALF) * PACK_C + byte % HALF)[:, None]
    ety = a_ptr.dtype.element_ty

    # One accumulator live through the loop: int32 where no float scale enters it before the epilogue.
    INT_ACC: tl.constexpr = A_INT8 and (GROUP_SIZE == 0 or PROG)
    if INT_ACC:
        acc_i = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    if SPLIT:
        acc_hi = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    if PROG:
        row = tl.load(r_ptr + rn)
    # Against INT8 tokens a progressive weight is s2 * (q - z) in int8 (_progressive_planes); otherwise q - z
    # (_nibble_planes), scaled by the group's float scale s on the int32 dot (INT8 tokens) or on each weight
    # (16-bit tokens). A group's (scale, zero) operands load first in its step: too narrow for the asynchronous
    # copies that pipeline weights and tokens, their latency then overlaps the wait for those copies. (Loading
    # them a step ahead instead made them loop-carried, and the compiler then converted every unpacked weight
    # tile through shared memory to meet their layout.)
    INT_W: tl.constexpr = A_INT8 and PROG
    if GROUP_SIZE == 0:
        p0, p1 = _group_operands(s_ptr, z_ptr, rn, INT_W, SZ_WORD, HAS_ZERO, A_INT8, ety, BLOCK_N)
    k_beg, k_end = _k_slice(K, tl.program_id(1), SPLIT_K, BLOCK_K)
    for k0 in range(k_beg, k_end, BLOCK_K):
        for j in tl.static_range(BLOCK_K // SUB):
            kj = k0 + j * SUB
            if GROUP_SIZE > 0:
                p0, p1 = _group_operands(s_ptr, z_ptr, (kj // GROUP_SIZE) * N + rn, INT_W, SZ_WORD, HAS_ZERO,
                                         A_INT8, ety, BLOCK_N)
            wb = tl.load(w_rows + tl.multiple_of(kj // 2, 16))  # [BLOCK_N, SUB / 2] bytes
            x_lo = tl.load(a_lo + kj)  # [SUB / 2, BLOCK_T]: the low nibbles' channels
            x_hi = tl.load(a_lo + kj + HALF)
            if INT_W:
                lo, hi = _progressive_planes(wb, p0, p1, BLOCK_N, SUB // 2)  # p0, p1: s2, s2 * z
                acc_i = tl.dot(hi, x_hi, tl.dot(lo, x_lo, acc_i, out_dtype=tl.int32), out_dtype=tl.int32)
            elif A_INT8:  # p0, p1: the group's scale and zero operand
                lo, hi = _nibble_planes(wb, p1, ety, BLOCK_N, SUB // 2)
                part = tl.dot(hi, x_hi, tl.dot(lo, x_lo, out_dtype=tl.int32), out_dtype=tl.int32)
                if GROUP_SIZE > 0:  # |part| <= SUB * 127 * 15 < 2^22: exact through _exact_float
                    acc = tl.fma(_exact_float(part), p0[:, None], acc)
                else:
                    acc_i += part
            else:  # the weight (q - z) * s rounded to the tokens' dtype, as the reference path does: one accumulator
                lo, hi = _nibble_planes(wb, p1, ety, BLOCK_N, SUB // 2)
                sw = (p0 * row if PROG else p0).to(ety)[:, None]
                if SPLIT:
                    acc = tl.dot(lo * sw, x_lo, acc)
                    acc_hi = tl.dot(hi * sw, x_hi, acc_hi)
                else:
                    acc = tl.dot(hi * sw, x_hi, tl.dot(lo * sw, x_lo, acc))

    if SPLIT:
        acc += acc_hi
    if INT_ACC:
        acc = acc_i.to(tl.float32) * (row if PROG else p0)[:, None]  # p0: the per-channel scale here
    last = True
    if SPLIT_K > 1:
        tile_size: tl.constexpr = BLOCK_N * BLOCK_T
        tile = tl.program_id(0) * tile_size + tl.arange(0, BLOCK_N)[:, None] * BLOCK_T + tl.arange(0, BLOCK_T)[None, :]
        acc, last = _split_k_sum(acc, ws_ptr, cnt_ptr, tile, tl.num_programs(0) * tile_size, tl.program_id(0),
                                 tl.program_id(1), SPLIT_K)
    if last:
        if A_INT8:
            acc = acc * tl.load(as_ptr + rt)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn).to(tl.float32)[:, None]
        acc = apply_act(acc, ACT)
        c_ptrs = c_ptr + offs_t[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_t[None, :] < M) & (offs_n[:, None] < N))


def w4_gemm_ok(a: torch.Tensor, w: KernelWeight) -> bool:
    """INT4 weights, more than 16 tokens, on Hopper+ (the warpgroup MMA's register operand)."""
    return w.bits == 4 and a.shape[0] > 16 and a.is_cuda and device_info(device_index(a))[0] >= 9


def w4_gemm(a: torch.Tensor, xs: torch.Tensor | None, w: KernelWeight, bias, act, c: torch.Tensor) -> None:
    """c = act(a [* xs] @ W^T + bias) for INT4 W: a int8 [M, K] with float32 per-token scales xs [M], or
    fp16/bf16 [M, K] with xs None; twin: reference.quant_linear."""
    m, k = a.shape
    n = w.out_features
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_T"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
    ws, counters = split_workspace(m, n, a.device)
    _w4_gemm_kernel[grid](
        a, xs if xs is not None else c, w.qweight, w.scale, w.zero if w.zero is not None else w.scale,
        w.row_scale if w.row_scale is not None else c, bias if bias is not None else c, c,
        m, n, k, a.stride(0), w.qweight.stride(0), c.stride(0), _m_bucket(m),
        A_INT8=xs is not None, HAS_ZERO=w.zero is not None, GROUP_SIZE=w.kernel_group, HAS_BIAS=bias is not None,
        ACT=act_code(act), SZ_WORD=w.sz_step == 2, PROG=w.row_scale is not None, ws_ptr=ws, cnt_ptr=counters,
    )


def split_workspace(m: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 partials, arrival counters) for whichever split-K configuration the autotuner picks at m tokens:
    SPLIT_K slices of every tile's outputs, one counter a tile (none past SPLIT_K_TOKENS tokens)."""
    if m > SPLIT_K_TOKENS:
        return torch.empty(0, dtype=torch.float32, device=device), split_counters(device, 1)
    tiles = [(c.kwargs["SPLIT_K"], triton.cdiv(m, c.kwargs["BLOCK_T"]) * triton.cdiv(n, c.kwargs["BLOCK_N"]),
              c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_N"]) for c in _SPLIT_K_CONFIGS]
    return (torch.empty(max(split * t * size for split, t, size in tiles), dtype=torch.float32, device=device),
            split_counters(device, max(t for _, t, _ in tiles)))
