"""The small-M INT4 GEMM (batched decode, 2..16 tokens, Hopper): the weights as the MMA's M side, split-K.

bf16 and int8 tokens, and fp16 tokens in the formats skinny_mma (the Gluon kernel, faster for them) does not
take; gemm.quant_linear chooses."""

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
    _scale_zero_word,
    _split_k_sum,
    _tied,
    split_counters,
)
from zeroquant.kernels.triton.launch import device_index, device_info
from zeroquant.kernels.triton.rowwise import apply_act
from zeroquant.kernels.weight_format import KernelWeight

# The small-M INT4 kernel's tile of output channels: the M side of one Hopper warpgroup MMA (64 x 16 x 16).
SKINNY_BLOCK_N = 64
# Half-precision tokens, up to 8 of them: 32 channels a program on 2 warps, whose dots Triton lowers to
# mma.sync instead of the warpgroup MMA (fewer instructions a weight; docs/kernels.md).
SKINNY_SYNC_BLOCK_N = 32
SKINNY_SYNC_MAX_M = 8


def _skinny_cfg(bk, stages, warps=4):
    return triton.Config({"BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# BLOCK_K 64 serves K that is a whole number of 64-channel chunks but not of 128.
_SKINNY_CONFIGS = [_skinny_cfg(128, 3), _skinny_cfg(128, 2), _skinny_cfg(128, 4), _skinny_cfg(64, 4)]
_SKINNY_SYNC_CONFIGS = [_skinny_cfg(128, 3, 2), _skinny_cfg(128, 4, 2), _skinny_cfg(64, 4, 2)]


def _prune_skinny(configs, named_args, **kwargs):
    k = {**named_args, **kwargs}["K"]
    return [c for c in configs if k % c.kwargs["BLOCK_K"] == 0]


@triton.jit
def _zero_operand(z_ptr, idx, s, HAS_ZERO: tl.constexpr, A_INT8: tl.constexpr, ety: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """What _nibble_planes subtracts from a row's nibbles: the zero point (8 when symmetric) as int8, or the
    half-precision magic base plus the zero point. For half-precision tokens the zero point is tied to the
    group's scale s (_tied), so both load at the top of the step; int8 tokens were slower tied
    (docs/history.md)."""
    z = tl.load(z_ptr + idx).to(tl.float32) if HAS_ZERO else tl.full((BLOCK_N,), 8.0, tl.float32)
    if A_INT8:
        return z.to(tl.int8)
    return (_tied(z, s) + (128.0 if ety == tl.bfloat16 else 1024.0)).to(ety)


@triton.jit
def _word_zero_operand(s_ptr, idx, A_INT8: tl.constexpr, ety: tl.constexpr):
    """(scale, _zero_operand's value) from interleaved scales and zero points: one word a row."""
    s, z = _scale_zero_word(s_ptr, idx)
    if A_INT8:
        zo = z.to(tl.int8)
    else:
        zo = (z + (128.0 if ety == tl.bfloat16 else 1024.0)).to(ety)
    return s, zo


@triton.autotune(
    configs=_SKINNY_CONFIGS,
    key=["N", "K", "A_INT8", "HAS_ZERO", "GROUP_SIZE", "SPLIT", "SZ_WORD", "ROW_SCALE"],
    prune_configs_by={"early_config_prune": _prune_skinny},
    do_bench=_gpu_time,
)
@triton.jit
def _w4_skinny_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, z_ptr, b_ptr, c_ptr, ws_ptr, cnt_ptr, M, N, K, stride_am, stride_wn, stride_cm,
    A_INT8: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SZ_WORD: tl.constexpr,
    rs_ptr=None, ROW_SCALE: tl.constexpr = False,
):
    """INT4 weights for M <= 16 (batched decode): C^T = W x^T, so the weights are the MMA's M side.

    Why not _qlinear_kernel: with the tokens as M, Hopper's warpgroup MMA (M = 64) cannot be used, and every
    weight was scaled in float32 before the dot; at M = 16 that kernel ran no faster than cuBLAS on FP16
    weights (docs/history.md, kernel choices). Here a weight tile becomes q - zero in registers
    (_nibble_planes) straight into the MMA's register operand: int8 against INT8 tokens (each group's int32
    dot exact), fp16/bf16 against half-precision tokens. The group's scale multiplies the group's float32
    dot instead of each weight (SZ_WORD: scales interleaved with the zero points, one word a row). Tokens past M
    load as zeros. Program (n, s) covers BLOCK_N channels (64 on a warpgroup; 32 on 2 warps, mma.sync) and the
    s-th of SPLIT slices of K, so enough programs stream weights at once (_split_k_sum adds the slices).
    ROW_SCALE: progressive INT4, whose integer group scales (s_ptr) scale the group dots like float ones and
    whose float row scales (rs_ptr) multiply each row's sums once, before the slices are added.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_m = tl.arange(0, 16)
    x_mask = (offs_m < M)[None, :]
    # A sub-step never straddles a weight group. Its bytes hold whole half-split chunks (quant.pack_int4):
    # the low nibbles of bytes 0..31 of a chunk are its channels 0..31, the high nibbles 32..63, so the
    # activations are gathered to match each nibble plane and one dot covers each plane.
    SUB: tl.constexpr = BLOCK_K if GROUP_SIZE == 0 or GROUP_SIZE >= BLOCK_K else GROUP_SIZE
    HALF: tl.constexpr = PACK_C // 2
    byte = tl.arange(0, SUB // 2)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn + byte[None, :]
    a_lo = a_ptr + offs_m[None, :] * stride_am + ((byte // HALF) * PACK_C + byte % HALF)[:, None]
    ety = a_ptr.dtype.element_ty
    k_beg, k_end = _k_slice(K, pid_k, SPLIT, BLOCK_K)

    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    if GROUP_SIZE == 0:
        if SZ_WORD:
            s, zo = _word_zero_operand(s_ptr, rn, A_INT8, ety)
        else:
            s = tl.load(s_ptr + rn).to(tl.float32)
            zo = _zero_operand(z_ptr, rn, s, HAS_ZERO, A_INT8, ety, BLOCK_N)
    for k0 in range(k_beg, k_end, BLOCK_K):
        for j in tl.static_range(BLOCK_K // SUB):
            kj = k0 + j * SUB
            wb = tl.load(w_rows + tl.multiple_of(kj // 2, 16))  # [BLOCK_N, SUB / 2] bytes
            x_lo = tl.load(a_lo + kj, mask=x_mask, other=0)  # [SUB / 2, 16]: the low nibbles' channels
            x_hi = tl.load(a_lo + kj + HALF, mask=x_mask, other=0)
            if GROUP_SIZE > 0:
                g = kj // GROUP_SIZE
                if SZ_WORD:
                    s, zo = _word_zero_operand(s_ptr, g * N + rn, A_INT8, ety)
                else:
                    s = tl.load(s_ptr + g * N + rn).to(tl.float32)
                    zo = _zero_operand(z_ptr, g * N + rn, s, HAS_ZERO, A_INT8, ety, BLOCK_N)
            lo, hi = _nibble_planes(wb, zo, ety, BLOCK_N, SUB // 2)
            if A_INT8:
                # |dot| <= SUB * 127 * 15 < 2^22: exact through _exact_float
                part = _exact_float(tl.dot(hi, x_hi, tl.dot(lo, x_lo, out_dtype=tl.int32), out_dtype=tl.int32))
            else:
                part = tl.dot(hi, x_hi, tl.dot(lo, x_lo))
            if GROUP_SIZE > 0:
                acc = tl.fma(part, s[:, None], acc)
            else:
                acc += part
    if GROUP_SIZE == 0:
        acc = acc * s[:, None]
    if ROW_SCALE:
        acc = acc * tl.load(rs_ptr + rn)[:, None]

    last = True
    if SPLIT > 1:
        tile = offs_n[:, None] * 16 + offs_m[None, :]
        acc, last = _split_k_sum(acc, ws_ptr, cnt_ptr, tile, tl.num_programs(0) * BLOCK_N * 16, pid_n, pid_k, SPLIT)
    if last:
        if A_INT8:
            acc = acc * tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn).to(tl.float32)[:, None]
        acc = apply_act(acc, ACT)
        c_ptrs = c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=x_mask & (offs_n[:, None] < N))


def skinny_ok(a: torch.Tensor, w: KernelWeight) -> bool:
    """INT4 weights, 2..16 tokens, on Hopper+ (the warpgroup MMA's register operand). One token goes to the
    INT4 GEMV, which reads the weights faster (docs/kernels.md)."""
    return w.bits == 4 and 1 < a.shape[0] <= 16 and a.is_cuda and device_info(device_index(a))[0] >= 9


# The same kernel on 2-warp mma.sync tiles (SKINNY_SYNC_BLOCK_N channels a program).
_w4_skinny_sync_kernel = triton.autotune(
    configs=_SKINNY_SYNC_CONFIGS,
    key=["N", "K", "A_INT8", "HAS_ZERO", "GROUP_SIZE", "SPLIT", "SZ_WORD", "ROW_SCALE"],
    prune_configs_by={"early_config_prune": _prune_skinny},
    do_bench=_gpu_time,
)(_w4_skinny_kernel.fn)


def skinny_tile(a: torch.Tensor) -> tuple[int, int]:
    """(channels a program, programs per SM) for tokens a: 2-warp mma.sync programs for up to
    SKINNY_SYNC_MAX_M half-precision tokens, about eight an SM; otherwise 4-warp warpgroup programs, about
    five an SM, so all of them are resident at once (80 registers a thread)."""
    if a.dtype != torch.int8 and a.shape[0] <= SKINNY_SYNC_MAX_M:
        return SKINNY_SYNC_BLOCK_N, 8
    return SKINNY_BLOCK_N, 5


def skinny_split(w: KernelWeight, sms: int, rows: int, per_sm: int) -> int:
    """K slices per output tile of `rows` channels, so about per_sm programs run on each SM and keep enough
    weight loads in flight; at least 256 channels a slice (how flat the optimum is: docs/history.md, kernel
    choices)."""
    tiles = triton.cdiv(w.out_features, rows)
    return max(1, min(round(per_sm * sms / tiles), w.in_features // 256, 16))


def w4_skinny(a, xs, w: KernelWeight, bias, act, c, split: int | None = None) -> None:
    """Launch the small-M INT4 kernel on skinny_tile's programs; xs: float32 per-token scales of int8 a, or
    None for fp16/bf16 a."""
    m, k = a.shape
    n = w.out_features
    rows, per_sm = skinny_tile(a)
    tiles = triton.cdiv(n, rows)
    split = split or skinny_split(w, device_info(device_index(a))[1], rows, per_sm)
    ws = torch.empty(split * tiles * rows * 16, dtype=torch.float32, device=a.device) if split > 1 else c
    kernel = _w4_skinny_sync_kernel if rows == SKINNY_SYNC_BLOCK_N else _w4_skinny_kernel
    kernel[(tiles, split)](
        a, xs if xs is not None else c, w.qweight, w.scale, w.zero if w.zero is not None else w.scale,
        bias if bias is not None else c, c, ws, split_counters(a.device, tiles), m, n, k, a.stride(0),
        w.qweight.stride(0), c.stride(0),
        A_INT8=xs is not None, HAS_ZERO=w.zero is not None, GROUP_SIZE=w.kernel_group,
        HAS_BIAS=bias is not None, ACT=act_code(act), SPLIT=split, BLOCK_N=rows, SZ_WORD=w.sz_step == 2,
        rs_ptr=w.row_scale, ROW_SCALE=w.row_scale is not None,
    )

