"""The small-M INT4 GEMM (batched decode, 1..16 tokens, Hopper): the weights as the MMA's M side, split-K."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import act_code
from .gemm_common import PACK_C, _exact_float, _gpu_time
from .launch import device_index, device_info
from .rowwise import apply_act
from .weight_format import KernelWeight

# The small-M INT4 kernel's tile of output channels: the M side of one Hopper warpgroup MMA (64 x 16 x 16).
SKINNY_BLOCK_N = 64


def _skinny_cfg(bk, stages):
    return triton.Config({"BLOCK_K": bk}, num_warps=4, num_stages=stages)


_SKINNY_CONFIGS = [_skinny_cfg(128, 3), _skinny_cfg(128, 4), _skinny_cfg(64, 4)]


def _prune_skinny(configs, named_args, **kwargs):
    k = {**named_args, **kwargs}["K"]
    return [c for c in configs if k % c.kwargs["BLOCK_K"] == 0]


@triton.jit
def _w4_zero(z_ptr, idx, HAS_ZERO: tl.constexpr, A_INT8: tl.constexpr, ety: tl.constexpr, BASE: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """What _w4_skinny_kernel subtracts from a weight tile's nibbles: the zero point (8 when symmetric) as
    int8 for the int8 MMA, or as BASE + zero in the activation dtype (the nibbles carry the BASE)."""
    if A_INT8:
        z = tl.load(z_ptr + idx).to(tl.int8) if HAS_ZERO else tl.full((BLOCK_N,), 8, tl.int8)
    else:
        z = (tl.load(z_ptr + idx) + BASE).to(ety) if HAS_ZERO else tl.full((BLOCK_N,), BASE + 8.0, ety)
    return z


@triton.jit
def _w4_int8_planes(wb, z):
    """Bytes [BLOCK_N, B] -> the low and high nibble planes minus each row's zero point, as int8."""
    return (wb & 0xF).to(tl.int8) - z[:, None], (wb >> 4).to(tl.int8) - z[:, None]


@triton.autotune(
    configs=_SKINNY_CONFIGS,
    key=["N", "K", "A_INT8", "HAS_ZERO", "GROUP_SIZE", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune_skinny},
    do_bench=_gpu_time,
)
@triton.jit
def _w4_skinny_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, z_ptr, b_ptr, c_ptr, ws_ptr, cnt_ptr, M, N, K, stride_am, stride_wn, stride_cm,
    A_INT8: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """INT4 weights for M <= 16 (batched decode): C^T = W x^T, so the weights are the MMA's M side.

    Why not _qlinear_kernel: with the tokens as M, Hopper's warpgroup MMA (M = 64) cannot be used, and every
    weight was scaled in float32 before the dot; at M = 16 that kernel ran no faster than cuBLAS on FP16
    weights (bench/NOTES.md, kernel choices). Here a weight tile dequantizes in registers
    straight into the MMA's register operand. A16: nibble | 0x6400 is the fp16 1024 + q (0x4300: bf16
    128 + q), minus (1024 + zero) gives q - zero exactly, two weights per packed half-precision add. A8
    (INT8 tokens): q - zero as int8 into an int8 MMA, each group's int32 dot exact. Either way the group's
    scale multiplies the group's float32 dot instead of each weight. Program (n, s) covers 64 channels and
    the s-th of SPLIT slices of K, so enough programs stream weights at once; the last of a tile's SPLIT
    programs to finish (an arrival counter) sums the float32 partials in slice order, so results do not
    depend on timing, and resets the counter.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_m = tl.arange(0, 16)
    rm = offs_m % M
    # A sub-step never straddles a weight group. Its bytes hold whole half-split chunks (quant.pack_int4):
    # the low nibbles of bytes 0..31 of a chunk are its channels 0..31, the high nibbles 32..63, so the
    # activations are gathered to match each nibble plane and one dot covers each plane.
    SUB: tl.constexpr = BLOCK_K if GROUP_SIZE == 0 or GROUP_SIZE >= BLOCK_K else GROUP_SIZE
    HALF: tl.constexpr = PACK_C // 2
    byte = tl.arange(0, SUB // 2)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn + byte[None, :]
    a_lo = a_ptr + rm[None, :] * stride_am + ((byte // HALF) * PACK_C + byte % HALF)[:, None]
    ety = a_ptr.dtype.element_ty
    MAGIC: tl.constexpr = 0x4300 if ety == tl.bfloat16 else 0x6400
    BASE: tl.constexpr = 128.0 if ety == tl.bfloat16 else 1024.0
    steps = tl.cdiv(K // BLOCK_K, SPLIT)  # per slice; the last slice may have fewer (or none)
    k_beg = pid_k * steps * BLOCK_K
    k_end = tl.minimum(K, k_beg + steps * BLOCK_K)

    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    if GROUP_SIZE == 0:
        s = tl.load(s_ptr + rn)
        zo = _w4_zero(z_ptr, rn, HAS_ZERO, A_INT8, ety, BASE, BLOCK_N)
    for k0 in range(k_beg, k_end, BLOCK_K):
        for j in tl.static_range(BLOCK_K // SUB):
            kj = k0 + j * SUB
            wb = tl.load(w_rows + tl.multiple_of(kj // 2, 16))  # [BLOCK_N, SUB / 2] bytes
            x_lo = tl.load(a_lo + kj)  # [SUB / 2, 16]: the low nibbles' channels
            x_hi = tl.load(a_lo + kj + HALF)
            if GROUP_SIZE > 0:
                g = kj // GROUP_SIZE
                s = tl.load(s_ptr + g * N + rn)
                zo = _w4_zero(z_ptr, g * N + rn, HAS_ZERO, A_INT8, ety, BASE, BLOCK_N)
            if A_INT8:
                lo, hi = _w4_int8_planes(wb, zo)
                # |dot| <= SUB * 127 * 15 < 2^22: exact through _exact_float
                part = tl.dot(hi, x_hi, tl.dot(lo, x_lo, out_dtype=tl.int32), out_dtype=tl.int32)
                if GROUP_SIZE > 0:
                    acc = tl.fma(_exact_float(part), s[:, None], acc)
                else:
                    acc += _exact_float(part)
            else:
                lo = ((wb & 0xF).to(tl.int16) | MAGIC).to(ety, bitcast=True) - zo[:, None]
                hi = ((wb >> 4).to(tl.int16) | MAGIC).to(ety, bitcast=True) - zo[:, None]
                if GROUP_SIZE > 0:
                    acc = tl.fma(tl.dot(hi, x_hi, tl.dot(lo, x_lo)), s[:, None], acc)
                else:
                    acc = tl.dot(hi, x_hi, tl.dot(lo, x_lo, acc))
    if GROUP_SIZE == 0:
        acc = acc * s[:, None]

    c_ptrs = c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    c_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    last = True
    if SPLIT > 1:
        tile = offs_n[:, None] * 16 + offs_m[None, :]
        slice_size = tl.num_programs(0) * BLOCK_N * 16
        tl.store(ws_ptr + pid_k * slice_size + tile, acc)
        tl.debug_barrier()  # every thread's partial is written before the arrival is released
        last = tl.atomic_add(cnt_ptr + pid_n, 1) == SPLIT - 1
        if last:
            # .cg: read the other programs' partials from L2, never from this SM's L1.
            acc = tl.load(ws_ptr + tile, cache_modifier=".cg")
            for i in tl.static_range(1, SPLIT):
                acc += tl.load(ws_ptr + i * slice_size + tile, cache_modifier=".cg")
            tl.store(cnt_ptr + pid_n, 0)
    if last:
        if A_INT8:
            acc = acc * tl.load(as_ptr + rm)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn).to(tl.float32)[:, None]
        acc = apply_act(acc, ACT)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def skinny_ok(a: torch.Tensor, w: KernelWeight) -> bool:
    """INT4 weights, 1..16 tokens, on Hopper+ (the warpgroup MMA's register operand). One token too: W4A16
    beat the GEMV at Llama-7B's MLP shapes and lost only where the weight is small (bench/NOTES.md)."""
    return w.bits == 4 and a.shape[0] <= 16 and a.is_cuda and device_info(device_index(a))[0] >= 9


def skinny_split(w: KernelWeight, sms: int) -> int:
    """K slices per output tile: about five programs per SM, so all of them are resident at once (80
    registers a thread) and keep enough weight loads in flight; at least 256 channels a slice (how flat the
    optimum is: bench/NOTES.md, kernel choices)."""
    tiles = triton.cdiv(w.out_features, SKINNY_BLOCK_N)
    return max(1, min(round(5 * sms / tiles), w.in_features // 256, 16))


# Tiles of output channels the shared arrival counters cover: 4M channels, past any linear of a real model.
_COUNTERS = 1 << 16


def split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Split-K arrival counters, one per tile of output channels, zero between launches (each tile's last
    program resets its own), so one zeroed allocation per device serves every layer, as a GEMM library's
    workspace does: kernels on one stream run one after another. A fresh zeroed tensor per call would add a
    memset to every INT4 linear; one per layer would be state the checkpoint loaders have to build."""
    if tiles > _COUNTERS:
        raise ValueError(f"{tiles} tiles of output channels exceed the split-K workspace ({_COUNTERS})")
    return _zeroed_counters(device)


@functools.cache
def _zeroed_counters(device: torch.device) -> torch.Tensor:
    return torch.zeros(_COUNTERS, dtype=torch.int32, device=device)


def w4_skinny(a, xs, w: KernelWeight, bias, act, c, split: int | None = None) -> None:
    """Launch _w4_skinny_kernel; xs: float32 per-token scales of int8 a, or None for fp16/bf16 a."""
    m, k = a.shape
    n = w.out_features
    tiles = triton.cdiv(n, SKINNY_BLOCK_N)
    split = split or skinny_split(w, device_info(device_index(a))[1])
    ws = torch.empty(split * tiles * SKINNY_BLOCK_N * 16, dtype=torch.float32, device=a.device) if split > 1 else c
    _w4_skinny_kernel[(tiles, split)](
        a, xs if xs is not None else c, w.qweight, w.scale, w.zero if w.zero is not None else w.scale,
        bias if bias is not None else c, c, ws, split_counters(a.device, tiles), m, n, k, a.stride(0),
        w.qweight.stride(0), c.stride(0),
        A_INT8=xs is not None, HAS_ZERO=w.zero is not None, GROUP_SIZE=w.kernel_group,
        HAS_BIAS=bias is not None, ACT=act_code(act), SPLIT=split, BLOCK_N=SKINNY_BLOCK_N,
    )

