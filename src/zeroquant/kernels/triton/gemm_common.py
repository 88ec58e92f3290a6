"""Triton helpers the GEMM families share: integer-to-float without I2F, INT4 unpacking, tile order, the
split-K reduction and its arrival counters, and the autotuners' timing."""

from __future__ import annotations

import functools
import threading

import torch
import triton
import triton.language as tl

from zeroquant.kernels.weight_format import PACK

PACK_C = tl.constexpr(PACK)  # weight_format.PACK, readable inside kernels


def _gpu_time(fn, quantiles):
    """The autotuners' measure: back-to-back CUDA-graph replays, so the inputs sit in L2 as they do in a model
    (the activation was just written by the op before). triton's do_bench flushes L2 before every call; its
    ranking of close configurations changed from one process to the next, and so did whole-model times
    (docs/history.md, kernel choices)."""
    return triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=quantiles)


def _cold_gpu_time(fn, quantiles):
    """_gpu_time with each call after a read of twice the L2, less that read's own time: the weights come from
    HBM, as a decoder layer's do in a model. Decode configurations measured warm ranked wrongly wherever the
    weights fit in L2 (docs/history.md)."""
    # Twice the L2's bytes, allocated per tuning run rather than held: ~100 MB on Hopper.
    sweep = torch.ones(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size,
                       dtype=torch.float16, device="cuda")
    both = triton.testing.do_bench_cudagraph(lambda: (sweep.amax(), fn()), rep=20, quantiles=quantiles)
    alone = triton.testing.do_bench_cudagraph(sweep.amax, rep=20, quantiles=quantiles)
    if quantiles is None:
        return both - alone
    return [b - a for b, a in zip(both, alone, strict=True)]


def _chunk(args: dict) -> int:
    """Channels per dot inside a BLOCK_K step, for both kernels: a chunk never straddles a weight group, so
    its group's scale applies to the whole dot; an INT4 chunk is one PACK of the half-split layout
    (byte j = channel j | channel j + PACK/2 << 4)."""
    gs, bk = args["GROUP_SIZE"], args["BLOCK_K"]
    if args["W_BITS"] == 4:
        return PACK
    return gs if 0 < gs < bk else bk


@triton.jit
def _exact_float(i):
    """int32 -> float32 for |i| < 2^22 with an integer add and a float subtract instead of I2F, which issues
    at 1/8 the rate of FMA on Hopper and otherwise dominates group-wise epilogues. One chunk's int8 dot
    (<= 256 * 127 * 127 < 2^22) always fits."""
    return (i + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _w4_int8(nib, z, HAS_ZERO: tl.constexpr):
    if HAS_ZERO:
        return (nib.to(tl.int32) - z.to(tl.int32)[None, :]).to(tl.int8)
    return (nib.to(tl.int32) - 8).to(tl.int8)


@triton.jit
def _w4_float(nib, z, s, HAS_ZERO: tl.constexpr):
    """(q - z) * s in float32 like the reference; q -> float as the bits of 2^23 + q (no I2F)."""
    q = (nib.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
    if HAS_ZERO:
        return (q - (z + 8388608.0)[None, :]) * s[None, :]
    return (q - 8388616.0) * s[None, :]  # 2^23 + 8, the symmetric offset


@triton.jit
def _scale_zero_word(s_ptr, idx):
    """(scale, zero point) in float32 at idx of interleaved float16 scales and zero points
    (weight_format.interleave): one 32-bit word, the scale's bits low and the zero point's high. One 4-byte load
    instead of two 2-byte ones; Triton's pipeliner streams it (cp.async) where it waited for the two
    (docs/kernels.md)."""
    word = tl.load(s_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + idx)
    s = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return s, (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale_zero(s_ptr, z_ptr, group_row, rn, HAS_ZERO: tl.constexpr, SZ_WORD: tl.constexpr):
    """Rows rn's float32 scales and zero points (8 when symmetric) in the group whose [G, N] row starts at
    group_row: one word a row where they are interleaved (SZ_WORD, _scale_zero_word), else from their separate
    buffers. The tile GEMM and the INT4 GEMV compile to the same SASS through it as with their own loads; the
    small-M kernel keeps its own (through this helper its SASS changed, unmeasured: docs/history.md)."""
    if SZ_WORD:
        return _scale_zero_word(s_ptr, group_row + rn)
    s = tl.load(s_ptr + group_row + rn).to(tl.float32)
    z = tl.load(z_ptr + group_row + rn).to(tl.float32) if HAS_ZERO else tl.full(rn.shape, 8.0, tl.float32)
    return s, z


@triton.jit
def _tied(z, s):
    """z + 0 * s in an opaque FMA: a K step's first math (on z) then needs s, so ptxas issues the scale's load
    with the others at the top of the step instead of sinking it to its use at the end, which cost the INT4
    GEMV a second wait on memory every step (docs/kernels.md)."""
    return tl.inline_asm_elementwise("fma.rn.f32 $0, $2, 0f00000000, $1;", "=r,r,r", [z, s], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _nibble_planes(wb, zo, ety: tl.constexpr, ROWS: tl.constexpr, BYTES: tl.constexpr):
    """Bytes [ROWS, BYTES] -> (low, high) nibble planes minus each row's zero point, exact, in ety: int8 for
    the int8 MMA (zo: the zero point as int8), fp16 or bf16 for the half-precision MMA (zo: 1024 + zero in
    fp16, 128 + zero in bf16).

    Why inline PTX: 32-bit logic works on four bytes at once, where Triton's byte-wise ops took several
    instructions per weight and bounded the kernel by instruction issue, not bandwidth (docs/history.md,
    kernel choices). int8: 0x80 | nibble minus the zero point cannot borrow across bytes (0x71..0x8F), and
    xor 0x80 turns the result into q - zero in two's complement. Half precision: nibbles are spread to the
    16-bit lanes (prmt) and OR-ed into the mantissa of 1024 (fp16, 0x6400) or 128 (bf16, 0x4300), which gives
    base + q exactly, two weights per register; one packed subtract of base + zero leaves q - zero.
    """
    z = tl.broadcast_to(zo[:, None], (ROWS, BYTES))
    if ety == tl.int8:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, u;"
            " lop3.b32 t, $2, 0x0F0F0F0F, 0x80808080, 0xea; sub.u32 t, t, $3; xor.b32 $0, t, 0x80808080;"
            " shr.u32 u, $2, 4;"
            " lop3.b32 u, u, 0x0F0F0F0F, 0x80808080, 0xea; sub.u32 u, u, $3; xor.b32 $1, u, 0x80808080; }",
            "=r,=r,r,r", [wb, z], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    elif ety == tl.bfloat16:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t0, t1, u0, u1;"
            " prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342; shr.u32 u0, t0, 4; shr.u32 u1, t1, 4;"
            " lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xea; lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xea;"
            " lop3.b32 $2, u0, 0x000F000F, 0x43004300, 0xea; lop3.b32 $3, u1, 0x000F000F, 0x43004300, 0xea;"
            " sub.rn.bf16x2 $0, $0, $5; sub.rn.bf16x2 $1, $1, $6; sub.rn.bf16x2 $2, $2, $5;"
            " sub.rn.bf16x2 $3, $3, $6; }",
            "=r,=r,=r,=r,r,r,r", [wb, z], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t0, t1, u0, u1;"
            " prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342; shr.u32 u0, t0, 4; shr.u32 u1, t1, 4;"
            " lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xea; lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xea;"
            " lop3.b32 $2, u0, 0x000F000F, 0x64006400, 0xea; lop3.b32 $3, u1, 0x000F000F, 0x64006400, 0xea;"
            " sub.f16x2 $0, $0, $5; sub.f16x2 $1, $1, $6; sub.f16x2 $2, $2, $5; sub.f16x2 $3, $3, $6; }",
            "=r,=r,=r,=r,r,r,r", [wb, z], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _progressive_planes(wb, s2, zs, ROWS: tl.constexpr, BYTES: tl.constexpr):
    """Bytes [ROWS, BYTES] of progressive INT4 -> (low, high) nibble planes as the int8 weights s2 * (q - z),
    exact: s2 int8 [ROWS] (1..16), zs uint8 [ROWS] = s2 * z mod 256.

    Four weights a 32-bit word, as _nibble_planes: a nibble mask leaves bytes q < 16, one integer multiply by
    s2 makes each byte s2 * q <= 240 with no carry into the next, and a byte-wise subtract without borrow
    across bytes ((x | 0x80..) - (y & 0x7F..), xor ((x ^ ~y) & 0x80..)) leaves s2 * q - s2 * z mod 256 in each
    byte, which is s2 * (q - z) in two's complement because the format keeps it in int8
    (core.quant.progressive_fits). Byte-wise in Triton the same took several instructions a weight
    (docs/kernels.md).
    The multiply takes s2 from the first of the four bytes Triton packs into a register: those are four
    consecutive channels of one row in the layouts a load along K or an 8-bit MMA operand has (zs is applied
    byte by byte either way); the GPU test's s2 differ from row to row and group to group, so it would show."""
    s = tl.broadcast_to(s2[:, None], (ROWS, BYTES))
    z = tl.broadcast_to(zs[:, None], (ROWS, BYTES))
    return tl.inline_asm_elementwise(
        "{ .reg .b32 s, y, t, u, a, v;"
        " and.b32 s, $3, 0xFF; and.b32 y, $4, 0x7F7F7F7F;"
        " and.b32 t, $2, 0x0F0F0F0F; mul.lo.u32 t, t, s; or.b32 a, t, 0x80808080; sub.u32 a, a, y;"
        " lop3.b32 v, t, $4, 0x80808080, 0x82; xor.b32 $0, a, v;"
        " shr.u32 u, $2, 4; and.b32 u, u, 0x0F0F0F0F; mul.lo.u32 u, u, s; or.b32 a, u, 0x80808080;"
        " sub.u32 a, a, y; lop3.b32 v, u, $4, 0x80808080, 0x82; xor.b32 $1, a, v; }",
        "=r,=r,r,r,r", [wb, s, z], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)


@triton.jit
def _progressive_operands(s_ptr, z_ptr, idx):
    """What _progressive_planes takes for rows idx of one group: s2 (int8) and s2 * z mod 256 (uint8)."""
    s2 = tl.load(s_ptr + idx)
    zs = (s2.to(tl.int32) * tl.load(z_ptr + idx).to(tl.int32)) & 0xFF
    return s2, zs.to(tl.uint8)


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(row tile, column tile) of output tile `pid`. GROUP_M row-tiles share each column of weight tiles, so
    weights are reused from L2."""
    GROUP_M: tl.constexpr = 8
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@triton.jit
def _k_slice(K, pid_k, SPLIT: tl.constexpr, BLOCK_K: tl.constexpr):
    """[begin, end) of the pid_k-th of SPLIT slices of K, in whole BLOCK_K steps (the last may be shorter or
    empty)."""
    steps = tl.cdiv(K // BLOCK_K, SPLIT)
    k_beg = pid_k * steps * BLOCK_K
    return k_beg, tl.minimum(K, k_beg + steps * BLOCK_K)


@triton.jit
def _split_k_sum(acc, ws_ptr, cnt_ptr, tile, slice_size, pid_n, pid_k, SPLIT: tl.constexpr):
    """Sum the SPLIT programs' float32 partials of output tile pid_n: each stores its own at `tile` in slice
    pid_k of the workspace; the last to arrive (an arrival counter) sums them in slice order, so results do not
    depend on timing, and resets the counter. Returns (sum, whether this program is the last)."""
    tl.store(ws_ptr + pid_k * slice_size + tile, acc)
    tl.debug_barrier()  # every thread's partial is written before the arrival is released
    last = tl.atomic_add(cnt_ptr + pid_n, 1) == SPLIT - 1
    if last:
        # .cg: read the other programs' partials from L2, never from this SM's L1.
        acc = tl.load(ws_ptr + tile, cache_modifier=".cg")
        for i in tl.static_range(1, SPLIT):
            acc += tl.load(ws_ptr + i * slice_size + tile, cache_modifier=".cg")
        tl.store(cnt_ptr + pid_n, 0)
    return acc, last


# Tiles of output channels the shared arrival counters cover: 4M channels, past any linear of a real model.
_COUNTERS = 1 << 16


def split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Split-K arrival counters, one per tile of output channels, zero between launches (each tile's last
    program resets its own), so one zeroed allocation per device serves every layer, as a GEMM library's
    workspace does: kernels on one stream run one after another. A fresh zeroed tensor per call would add a
    memset to every split linear; one per layer would be state the checkpoint loaders have to build."""
    if tiles > _COUNTERS:
        raise ValueError(f"{tiles} tiles of output channels exceed the split-K workspace ({_COUNTERS})")
    return _zeroed_counters(device)


@functools.cache
def _zeroed_counters(device: torch.device) -> torch.Tensor:
    """Allocated on a helper thread, outside any CUDA-graph memory pool: the first call may come while
    torch.compile's CUDA graphs warm up, which route the calling thread's allocations into their pool, and
    they refuse a tensor that stays alive there without being one of the graph's outputs. (A graph being
    captured allows no allocation elsewhere: then the workspace joins its pool, which keeps it alive.)"""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    made: list = []

    def allocate():
        try:
            made.append(torch.zeros(_COUNTERS, dtype=torch.int32, device=device))
            torch.cuda.synchronize(device)
        except Exception as e:  # e.g. out of memory: raised again on the calling thread
            made.append(e)

    worker = threading.Thread(target=allocate)
    worker.start()
    worker.join()
    if isinstance(made[0], Exception):
        raise made[0]
    return made[0]
