"""The tile GEMM: one Triton kernel body, specialised by constexprs, for every weight/activation format.

- A_INT8 (W8A8, W4A8): int8 x int8 -> int32 on tensor cores. Per-channel weights keep one int32
  accumulator for the whole K loop; group-wise weights (group_size < K) convert each group-aligned
  chunk's int32 dot to float and multiply it by its group's scale, so groups are accumulated in the K
  loop. The per-token activation scale, bias and activation come last.
- A16 (W8A16, W4A16): weights are dequantized in registers to the activation dtype and fed to an fp16/bf16
  tensor-core dot with float32 accumulation.
- PROG (progressive INT4: integer group scales s2, float row scales s1): against INT8 tokens each nibble
  becomes the INT8 weight s2 * (q - z) in registers and one int32 accumulator runs the whole K loop, as for
  per-channel INT8; s1 comes in the epilogue. Against 16-bit tokens s1 * s2 is the group's float scale.
INT4 weights are packed two per byte and unpacked in registers, so only K/2 bytes per row leave memory.
Up to 16 tokens (decode) launch _qlinear_decode_kernel: the same body, its configurations timed on weights read
from HBM (_cold_gpu_time); more tokens _qlinear_kernel, timed back to back (_gpu_time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroquant.kernels import act_code
from zeroquant.kernels.triton.gemm_common import (
    _chunk,
    _cold_gpu_time,
    _exact_float,
    _gpu_time,
    _scale_zero,
    _tile,
    _w4_float,
    _w4_int8,
)
from zeroquant.kernels.triton.rowwise import apply_act
from zeroquant.kernels.weight_format import KernelWeight


def _m_bucket(m: int) -> int:
    return 16 if m <= 16 else 64 if m <= 64 else 128 if m <= 256 else 1024


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Decode (M <= 16) is bound by weight bytes: narrow N tiles so every SM streams weights, long K steps and
# deep pipelines to keep enough bytes in flight. Prefill is bound by tensor-core throughput: large tiles.
_CONFIGS = {
    16: [_cfg(16, 32, 256, 4, 4), _cfg(16, 64, 256, 4, 3), _cfg(16, 32, 512, 4, 3), _cfg(16, 16, 512, 4, 4),
         _cfg(16, 64, 128, 4, 4), _cfg(16, 128, 128, 4, 4)],
    64: [_cfg(64, 64, 128, 4, 4), _cfg(64, 128, 128, 4, 3), _cfg(32, 64, 256, 4, 3), _cfg(32, 64, 128, 4, 4)],
    128: [_cfg(128, 128, 128, 8, 3), _cfg(64, 128, 128, 4, 4), _cfg(128, 64, 128, 4, 4), _cfg(128, 128, 64, 4, 4)],
    1024: [_cfg(128, 128, 128, 8, 3), _cfg(128, 256, 128, 8, 3), _cfg(256, 128, 128, 8, 3), _cfg(128, 128, 64, 4, 4),
           _cfg(128, 256, 64, 8, 4), _cfg(128, 128, 128, 4, 4)],
}
# _qlinear_kernel's configurations: more than 16 tokens (decode has its own autotuner, _qlinear_decode_kernel).
_PREFILL_CONFIGS = [c for m, cs in _CONFIGS.items() if m > 16 for c in cs]


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    gs, k = args["GROUP_SIZE"], args["K"]
    keep = [c for c in configs if c in _CONFIGS[args["M_BUCKET"]]]
    if gs or args["W_BITS"] == 4:  # chunks are not masked: whole BLOCK_K steps, aligned to groups
        bk = lambda c: c.kwargs["BLOCK_K"]
        keep = [c for c in keep if k % bk(c) == 0 and (not gs or gs % bk(c) == 0 or bk(c) % gs == 0)]
    return keep or [_cfg(16 if args["M_BUCKET"] == 16 else 64, 64, 64, 4, 2)]


@triton.jit
def _load_rows(ptrs, ok, MASK: tl.constexpr):
    """Token rows: where MASK, only the rows `ok` holds are read (the others are 0)."""
    if MASK:
        return tl.load(ptrs, mask=ok, other=0)
    else:
        return tl.load(ptrs)


@triton.autotune(
    configs=_PREFILL_CONFIGS,
    key=["M_BUCKET", "N", "K", "A_INT8", "W_BITS", "HAS_ZERO", "GROUP_SIZE", "PROG"],
    prune_configs_by={"early_config_prune": _prune},
    # Short timing runs: the ranking of configs is stable long before the default 100 ms.
    do_bench=_gpu_time,
)
@triton.heuristics(
    {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0, "CH": _chunk, "MASK_M": lambda a: a["M"] < a["BLOCK_M"]}
)
@triton.jit
def _qlinear_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, z_ptr, r_ptr, b_ptr, c_ptr,
    M, N, K, stride_am, stride_wn, stride_cm, M_BUCKET,
    A_INT8: tl.constexpr, W_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr, CH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SZ_WORD: tl.constexpr,
    MASK_M: tl.constexpr, PROG: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns load a valid row instead (wrapped); their results are never stored.
    rm = (offs_m % M).to(tl.int64)
    rn = offs_n % N
    a_rows = a_ptr + rm[:, None] * stride_am
    w_cols = w_ptr + rn[None, :].to(tl.int64) * stride_wn
    # Fewer tokens than BLOCK_M (decode): the wrapped rows would fetch the same few tokens again, and every
    # program fetches them from L2 at once, so rows past M are masked instead and not read at all.
    a_ok = (offs_m < M)[:, None]

    # A BLOCK_K step is split into chunks of CH channels (see _chunk): one dot per chunk, its group's scale
    # applied to that dot; an INT4 chunk is two dots on unshuffled nibbles.
    HALF: tl.constexpr = CH // 2
    offs_c = tl.arange(0, CH)
    offs_h = tl.arange(0, HALF)

    # Only one accumulator is live through the loop: two would double the registers and spill.
    INT_ACC: tl.constexpr = A_INT8 and (GROUP_SIZE == 0 or PROG)
    if INT_ACC:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PROG:
        row = tl.load(r_ptr + rn)
    if GROUP_SIZE == 0:  # one scale (and zero) per output channel
        s, z = _scale_zero(s_ptr, z_ptr, 0, rn, HAS_ZERO, SZ_WORD)
        if PROG and not A_INT8:
            s = s * row

    for k0 in range(0, K, BLOCK_K):
        for j in tl.static_range(BLOCK_K // CH):
            kc = k0 + j * CH
            if GROUP_SIZE > 0:
                s, z = _scale_zero(s_ptr, z_ptr, kc // GROUP_SIZE * N, rn, HAS_ZERO, SZ_WORD)
                if PROG and not A_INT8:  # the group's float scale s1 * s2, exact in float32
                    s = s * row
            if W_BITS == 4:
                wb = tl.load(w_cols + (kc // 2 + offs_h)[:, None])  # [HALF, BLOCK_N] bytes
                a_lo = _load_rows(a_rows + (kc + offs_h)[None, :], a_ok, MASK_M)
                a_hi = _load_rows(a_rows + (kc + HALF + offs_h)[None, :], a_ok, MASK_M)
                lo, hi = wb & 0xF, wb >> 4
                if A_INT8 and PROG:  # s2 * (q - z) lies in int8 by the format's construction
                    s2 = s.to(tl.int32)[None, :]
                    w_lo = (_w4_int8(lo, z, HAS_ZERO).to(tl.int32) * s2).to(tl.int8)
                    w_hi = (_w4_int8(hi, z, HAS_ZERO).to(tl.int32) * s2).to(tl.int8)
                    part = tl.dot(a_lo, w_lo, out_dtype=tl.int32)
                    part = tl.dot(a_hi, w_hi, part, out_dtype=tl.int32)
                elif A_INT8:
                    part = tl.dot(a_lo, _w4_int8(lo, z, HAS_ZERO), out_dtype=tl.int32)
                    part = tl.dot(a_hi, _w4_int8(hi, z, HAS_ZERO), part, out_dtype=tl.int32)
                else:
                    acc = tl.dot(a_lo, _w4_float(lo, z, s, HAS_ZERO).to(a_lo.dtype), acc)
                    acc = tl.dot(a_hi, _w4_float(hi, z, s, HAS_ZERO).to(a_hi.dtype), acc)
            else:
                if EVEN_K:
                    a = _load_rows(a_rows + (kc + offs_c)[None, :], a_ok, MASK_M)
                    w = tl.load(w_cols + (kc + offs_c)[:, None])
                else:
                    k_ok = (kc + offs_c)[None, :] < K
                    if MASK_M:
                        k_ok = k_ok & a_ok
                    a = tl.load(a_rows + (kc + offs_c)[None, :], mask=k_ok, other=0)
                    w = tl.load(w_cols + (kc + offs_c)[:, None], mask=(kc + offs_c)[:, None] < K, other=0)
                if A_INT8:
                    part = tl.dot(a, w, out_dtype=tl.int32)
                else:
                    acc = tl.dot(a, (_exact_float(w.to(tl.int32)) * s[None, :]).to(a.dtype), acc)
            if A_INT8:
                if INT_ACC:
                    acc_i += part
                else:
                    acc = tl.fma(_exact_float(part), s[None, :], acc)

    if A_INT8:
        if PROG:
            acc = acc_i.to(tl.float32) * row[None, :]
        elif GROUP_SIZE == 0:
            acc = acc_i.to(tl.float32) * s[None, :]
        acc = acc * tl.load(as_ptr + rm)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    acc = apply_act(acc, ACT)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# The same kernel for up to 16 tokens (decode), its configurations timed on weights read from HBM.
_qlinear_decode_kernel = triton.autotune(
    configs=_CONFIGS[16],
    key=["N", "K", "A_INT8", "W_BITS", "HAS_ZERO", "GROUP_SIZE", "PROG"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_cold_gpu_time,
)(_qlinear_kernel.fn)


def tile_gemm(a, xs, w: KernelWeight, bias, act, c) -> None:
    """Launch _qlinear_kernel on a [M, K] (int8 with float32 per-token scales xs, or fp16/bf16 with xs = c)."""
    m, k = a.shape
    n = w.out_features
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    kernel = _qlinear_decode_kernel if _m_bucket(m) == 16 else _qlinear_kernel
    kernel[grid](
        a, xs, w.qweight, w.scale, w.zero if w.zero is not None else w.scale,
        w.row_scale if w.row_scale is not None else xs, bias if bias is not None else c, c,
        m, n, k, a.stride(0), w.qweight.stride(0), c.stride(0), _m_bucket(m),
        A_INT8=a.dtype == torch.int8, W_BITS=w.bits, HAS_ZERO=w.zero is not None, GROUP_SIZE=w.kernel_group,
        HAS_BIAS=bias is not None, ACT=act_code(act), SZ_WORD=w.sz_step == 2, PROG=w.row_scale is not None,
    )
