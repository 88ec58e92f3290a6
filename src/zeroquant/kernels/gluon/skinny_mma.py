"""The small-M INT4 GEMM for fp16 tokens (batched decode, 2..16 tokens, Hopper), in Gluon: each thread's
16-byte weight load is unpacked straight into mma.sync's register operand, split-K.

Why Gluon and not Triton: the operand's register layout is ours to choose here. Triton's small-M kernel
(skinny_gemm) moved weight bytes into the MMA's layout two bytes at a time (LDS.U16 + PRMT); this one takes
fewer instructions a weight, and its loads are a cp.async ring that the weights (which do not depend on the
kernel before) start filling before the programmatic-dependent-launch wait. Design: docs/kernels.md;
measurements: docs/history.md.

The trick is relabelling K. A thread of mma.m16n8k16 holds, for its rows, the operand's columns 2t, 2t+1,
2t+8, 2t+9 of every 16 (t = lane % 4). The dot sums over K, so any bijection between the MMA's column index
and the stored channel order gives the same result as long as the tokens follow it. Thread t loads bytes
16t..16t+15 of a row's 64-byte step (half-split chunks, quant.pack_int4: byte j = channel j | channel j + 32
<< 4); their nibbles become sixteen fp16 pairs of adjacent channels, and _a_operand / _b_operand name the
channels so that those pairs are exactly the thread's operand registers. reshape/permute/convert_layout move
no data (assert_trivial checks it at compile time).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from zeroquant.kernels import act_code
from zeroquant.kernels.triton.gemm_common import _split_k_sum, split_counters
from zeroquant.kernels.triton.launch import device_index, device_info, pdl_flags, wait_for_producer
from zeroquant.kernels.triton.rowwise import apply_act
from zeroquant.kernels.weight_format import MMA_A_ORDER, MMA_B_ORDER, KernelWeight

# Output channels a program (two m16 tiles on each of 4 warps), K per step, cp.async ring depth. With at most
# 128 registers a thread (maxnreg) four programs fit an SM; the split plan counts on that.
ROWS, WARPS, STEP, STAGES, MAX_REGS = 128, 4, 128, 3, 128
MIN_STEPS = 4
PROGRAMS_PER_SM = 65536 // (MAX_REGS * 32 * WARPS)
_A_ORDER = gl.constexpr(MMA_A_ORDER)
_B_ORDER = gl.constexpr(MMA_B_ORDER)


@functools.cache
def _w_layout(rows: int, warps: int) -> gl.DistributedLinearLayout:
    """[rows, 16] 32-bit words of one step: thread (g, t) of warp w holds words 4t..4t+3 of rows g and g+8 of
    each of its m16 tiles, warps 16 rows apart: the mma operand's rows."""
    tiles = rows // (16 * warps)
    reg = [[0, 1], [0, 2], [8, 0]] + [[16 * warps << i, 0] for i in range(tiles.bit_length() - 1)]
    lane = [[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]]
    warp = [[16 << i, 0] for i in range(warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [rows, 16])


@functools.cache
def _x_layout(warps: int) -> gl.DistributedLinearLayout:
    """[16 tokens, 64 words] of one step (a word: two fp16 channels): thread (g, t) holds tokens g and g+8 at
    channels 64 t1 + 32 h + 16 t0 + i, i < 16, the channels of its weight nibbles; every warp holds all of it."""
    reg = [[0, 1], [0, 2], [0, 4], [0, 16], [8, 0]]
    lane = [[0, 8], [0, 32], [1, 0], [2, 0], [4, 0]]
    return gl.DistributedLinearLayout(reg, lane, [[0, 0]] * (warps.bit_length() - 1), [], [16, 64])


@gluon.jit
def _unpack(w2, zlo, zhi):
    """Words (each twice: w2 = join(w, w), so each fp16 output pair comes from one 32-bit input) -> low nibbles
    of bytes (0, 1), (2, 3) and high nibbles of bytes (0, 1), (2, 3), minus the row's zero point, exact: a nibble
    OR-ed into the mantissa of 1024 is 1024 + q (zlo = 1024 + z); a high one is 1024 + 16 q, scaled by 1/16
    in the same FMA that subtracts 64 + z (zhi = -(64 + z))."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 s, t, q; mov.b32 q, 0x2C002C00;"
        " prmt.b32 s, $4, 0, 0x4140; prmt.b32 t, $4, 0, 0x4342;"
        " lop3.b32 $0, s, 0x000F000F, 0x64006400, 0xea; lop3.b32 $1, t, 0x000F000F, 0x64006400, 0xea;"
        " lop3.b32 $2, s, 0x00F000F0, 0x64006400, 0xea; lop3.b32 $3, t, 0x00F000F0, 0x64006400, 0xea;"
        " sub.f16x2 $0, $0, $6; sub.f16x2 $1, $1, $6;"
        " fma.rn.f16x2 $2, $2, q, $7; fma.rn.f16x2 $3, $3, q, $7; }",
        "=r,=r,=r,=r,r,r,r,r", [w2, zlo, zhi], dtype=(gl.float16, gl.float16, gl.float16, gl.float16),
        is_pure=True, pack=2)


@gluon.jit
def _a_operand(wb, z, ROWS: gl.constexpr, A_L: gl.constexpr):
    """A step's words [ROWS, 16] (word 4t + w of thread t) and the rows' zero points -> the mma A operand
    [ROWS, 128] (weight_format.MMA_A_ORDER: a word's byte 2p + q, high nibble or not (h), is operand column
    (w1 w0 h p t1 t0 q))."""
    zlo = gl.broadcast((z + 1024.0).to(gl.float16)[:, None], wb)[0]
    zhi = gl.broadcast((-64.0 - z).to(gl.float16)[:, None], wb)[0]
    lo0, lo1, hi0, hi1 = _unpack(gl.join(wb, wb), gl.join(zlo, zlo), gl.join(zhi, zhi))
    t = gl.join(gl.join(lo0, lo1), gl.join(hi0, hi1))  # [ROWS, 16, q, p, h]
    t = gl.permute(gl.reshape(t, [ROWS, 2, 2, 2, 2, 2, 2, 2]), _A_ORDER.value)
    return gl.convert_layout(gl.reshape(t, [ROWS, 128]), A_L, assert_trivial=True)


@gluon.jit
def _b_operand(xw, B_L: gl.constexpr):
    """A step's tokens as words [16, 64] -> the mma B operand [128, 16], columns named as _a_operand's
    (weight_format.MMA_B_ORDER: stored channel 64 t1 + 32 h + 16 t0 + 4 w + 2 p + q). Words, not fp16 pairs,
    come out of shared memory: loaded as fp16 the pairs were split across registers (a PRMT each)."""
    x = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [gl.join(xw, xw)], dtype=gl.float16, is_pure=True,
                                  pack=2)
    t = gl.permute(gl.reshape(x, [16, 2, 2, 2, 2, 2, 2, 2]), _B_ORDER.value)
    return gl.convert_layout(gl.reshape(t, [128, 16]), B_L, assert_trivial=True)


@gluon.jit
def _w4a16_mma_kernel(
    a_ptr, w_ptr, s_ptr, z_ptr, b_ptr, c_ptr, ws_ptr, cnt_ptr, M, N, K, stride_am, stride_wn, stride_cm,
    HAS_ZERO: gl.constexpr, GROUP_SIZE: gl.constexpr, HAS_BIAS: gl.constexpr, ACT: gl.constexpr,
    SPLIT: gl.constexpr, ROWS: gl.constexpr, WARPS: gl.constexpr, STAGES: gl.constexpr, PDL: gl.constexpr,
    W_L: gl.constexpr, X_L: gl.constexpr,
):
    """C^T = W x^T for M <= 16 fp16 tokens: program (n, s) covers ROWS output channels and the s-th of SPLIT
    slices of K. Weights and tokens go through a STAGES-deep cp.async ring (each thread copies and reads back
    its own weight words; the token tile is shared); each group's scale and zero point load one step ahead.
    GROUP_SIZE 0: one scale per row. Tokens past M load as zeros."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    A_L: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    B_L: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
    XD: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [WARPS, 1], [1, 0])
    XS: gl.constexpr = gl.SwizzledSharedLayout(4, 1, 8, [1, 0])
    WS: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    rn = (pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, W_L))) % N
    w_ptrs = (w_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + rn[:, None].to(gl.int64) * (stride_wn // 4)
              + gl.arange(0, 16, layout=gl.SliceLayout(0, W_L))[None, :])
    w_all = gl.full([ROWS, 16], 1, gl.int1, W_L)
    tok = gl.arange(0, 16, layout=gl.SliceLayout(1, XD))
    x_ptrs = (a_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + tok[:, None] * (stride_am // 2)
              + gl.arange(0, 64, layout=gl.SliceLayout(0, XD))[None, :])
    x_mask = (tok < M)[:, None]
    offs_n = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, MMA))
    sn = offs_n % N
    xs = gl.allocate_shared_memory(gl.int32, [STAGES, 16, 64], XS)
    wsm = gl.allocate_shared_memory(gl.int32, [STAGES, ROWS, 16], WS)

    steps = gl.cdiv(K // 128, SPLIT)
    k_beg = pid_k * steps * 128
    k_end = gl.minimum(K, k_beg + steps * 128)
    acc = gl.zeros([ROWS, 16], gl.float32, MMA)
    if k_beg < k_end:  # the weights do not depend on the kernel before: their first stages load before the wait
        for j in gl.static_range(STAGES - 1):
            kj = k_beg + j * 128
            cp.async_copy_global_to_shared(wsm.index(j), w_ptrs + kj // 8, mask=w_all & (kj < k_end))
            cp.commit_group()
    wait_for_producer(PDL)  # before any token load, workspace or counter use, and store
    if k_beg < k_end:
        for j in gl.static_range(STAGES - 1):
            kj = k_beg + j * 128
            cp.async_copy_global_to_shared(xs.index(j), x_ptrs + kj // 2, mask=x_mask & (kj < k_end))
            cp.commit_group()
        z, sc = _group_scale_zero(s_ptr, z_ptr, k_beg, N, rn, sn, HAS_ZERO, GROUP_SIZE)
        i = 0
        for k0 in range(k_beg, k_end, 128):
            kn = gl.minimum(k0 + 128, k_end - 128)
            z_n, sc_n = _group_scale_zero(s_ptr, z_ptr, kn, N, rn, sn, HAS_ZERO, GROUP_SIZE)
            cp.wait_group(STAGES - 2)  # step k0 has landed (this thread's copies)
            gl.thread_barrier()  # ... and everyone's; the slot refilled next was read in the step before
            kf = k0 + (STAGES - 1) * 128
            slot = (i + STAGES - 1) % STAGES
            cp.async_copy_global_to_shared(wsm.index(slot), w_ptrs + kf // 8, mask=w_all & (kf < k_end))
            cp.async_copy_global_to_shared(xs.index(slot), x_ptrs + kf // 2, mask=x_mask & (kf < k_end))
            cp.commit_group()
            a = _a_operand(wsm.index(i % STAGES).load(W_L), z, ROWS, A_L)
            b = _b_operand(xs.index(i % STAGES).load(X_L), B_L)
            acc = gl.fma(mma_v2(a, b, gl.zeros([ROWS, 16], gl.float32, MMA)), sc[:, None], acc)
            z, sc = z_n, sc_n
            i += 1
        cp.wait_group(0)

    offs_m = gl.arange(0, 16, layout=gl.SliceLayout(0, MMA))
    last = True
    if SPLIT > 1:
        tile = offs_n[:, None] * 16 + offs_m[None, :]
        acc, last = _split_k_sum(acc, ws_ptr, cnt_ptr, tile, gl.num_programs(0) * ROWS * 16, pid_n, pid_k, SPLIT)
    if last:
        if HAS_BIAS:
            acc += gl.load(b_ptr + sn).to(gl.float32)[:, None]
        acc = apply_act(acc, ACT)
        c_ptrs = c_ptr + offs_m[None, :].to(gl.int64) * stride_cm + offs_n[:, None]
        gl.store(c_ptrs, acc.to(gl.float16), mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


@gluon.jit
def _group_scale_zero(s_ptr, z_ptr, k, N, rn, sn, HAS_ZERO: gl.constexpr, GROUP_SIZE: gl.constexpr):
    """The zero points (rows rn, 8 when symmetric) and float32 scales (rows sn) of the group holding channel k."""
    g = k // GROUP_SIZE if GROUP_SIZE > 0 else 0
    z = gl.load(z_ptr + g * N + rn).to(gl.float32) if HAS_ZERO else gl.full_like(rn, 8.0, dtype=gl.float32)
    return z, gl.load(s_ptr + g * N + sn).to(gl.float32)


def mma_ok(a: torch.Tensor, w: KernelWeight) -> bool:
    """fp16 tokens, 2..16 of them, INT4 weights with separate scale buffers and groups of a multiple of 128
    channels (or one scale a row), K a multiple of 128, 16-byte aligned rows, on Hopper. Other formats take
    skinny_gemm."""
    return (a.dtype == torch.float16 and 1 < a.shape[0] <= 16 and w.bits == 4 and w.sz_step == 1
            and w.in_features % STEP == 0 and w.kernel_group % STEP == 0 and a.stride(0) % 8 == 0
            and a.data_ptr() % 16 == 0 and w.qweight.data_ptr() % 16 == 0 and a.is_cuda
            and device_info(device_index(a))[0] >= 9)


def mma_split(n: int, k: int, sms: int) -> int:
    """K slices a tile of ROWS channels gets: as many as one wave of PROGRAMS_PER_SM an SM holds, at least
    MIN_STEPS steps each (a program's loads before its first step and its split-K sum after the last cost about
    a step each), then the fewest slices with the same longest one (fewer partials to add). How the time went
    with the split: docs/history.md ("The split")."""
    steps = k // STEP
    split = max(1, min(PROGRAMS_PER_SM * sms // triton.cdiv(n, ROWS), steps // MIN_STEPS, 16))
    return triton.cdiv(steps, triton.cdiv(steps, split))


def w4a16_mma(a: torch.Tensor, w: KernelWeight, bias: torch.Tensor | None, act: str | None, c: torch.Tensor,
              split: int | None = None) -> None:
    """Launch the kernel for fp16 tokens a [M, K] (mma_ok) into c [M, N]."""
    m, k = a.shape
    n = w.out_features
    tiles = triton.cdiv(n, ROWS)
    split = split or mma_split(n, k, device_info(device_index(a))[1])
    ws = torch.empty(split * tiles * ROWS * 16, dtype=torch.float32, device=a.device) if split > 1 else c
    _w4a16_mma_kernel[(tiles, split)](
        a, w.qweight, w.scale, w.zero if w.zero is not None else w.scale, bias if bias is not None else c, c, ws,
        split_counters(a.device, tiles), m, n, k, a.stride(0), w.qweight.stride(0), c.stride(0),
        HAS_ZERO=w.zero is not None, GROUP_SIZE=w.kernel_group, HAS_BIAS=bias is not None, ACT=act_code(act),
        SPLIT=split, ROWS=ROWS, WARPS=WARPS, STAGES=STAGES, W_L=_w_layout(ROWS, WARPS), X_L=_x_layout(WARPS),
        num_warps=WARPS, maxnreg=MAX_REGS, **pdl_flags(a, graph_only=True),
    )
