"""The INT4 GEMV (_w4_gemv_kernel: one token, or two fp16 or int8 tokens, on CUDA cores), its launch plan and
its inline-PTX unpacking, apart from gemv.py's INT8 GEMV and dispatch so each file holds one kernel family.
The GEMVs' shared row mapping and epilogue (_gemv_rows, _gemv_epilogue) live here, so gemv.py imports them
from this file and this file never imports gemv.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroquant.kernels.triton.gemm_common import (
    PACK_C,
    _exact_float,
    _k_slice,
    _nibble_planes,
    _scale_zero,
    _split_k_sum,
    _tied,
)
from zeroquant.kernels.triton.launch import device_index, device_info, wait_for_producer
from zeroquant.kernels.triton.rowwise import apply_act
from zeroquant.kernels.weight_format import PACK

MAX_SPLIT = 16  # the most K slices gemv._gemv_split and _w4_plan pick


@triton.jit
def _gemv_rows(pid_n, N, GLU: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offs_n, rn): a program's BLOCK_N distinct indices (where its split-K partials go) and the weight rows
    they read, wrapped into [0, N). GLU: N rows are gate rows then up rows (zeroquant.nn.packing), and a program
    reads BLOCK_N / 2 gate rows and the up rows of the same outputs, so its epilogue can multiply them."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if GLU:
        HALF: tl.constexpr = BLOCK_N // 2
        j = tl.arange(0, BLOCK_N)
        return offs_n, (pid_n * HALF + j % HALF) % (N // 2) + (j // HALF) * (N // 2)
    return offs_n, offs_n % N


@triton.jit
def _gemv_store(out, offs_n, rn, pid_n, as_ptr, b_ptr, c_ptr, N, A_INT8: tl.constexpr, HAS_BIAS: tl.constexpr,
                ACT: tl.constexpr, GLU: tl.constexpr, BLOCK_N: tl.constexpr):
    """One token's row of outputs: the token scale, bias and activation on a program's float32 sums of rows rn
    (_gemv_rows), stored. GLU: act(gate) * up, N / 2 outputs."""
    if A_INT8:
        out = out * tl.load(as_ptr)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn).to(tl.float32)
    if GLU:
        HALF: tl.constexpr = BLOCK_N // 2
        gate, up = tl.split(tl.permute(tl.reshape(out, (2, HALF)), (1, 0)))
        cols = pid_n * HALF + tl.arange(0, HALF)
        tl.store(c_ptr + cols, (apply_act(gate, ACT) * up).to(c_ptr.dtype.element_ty), mask=cols < N // 2)
    else:
        out = apply_act(out, ACT)
        tl.store(c_ptr + offs_n, out.to(c_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _gemv_epilogue(out, out1, offs_n, rn, pid_n, pid_k, as_ptr, b_ptr, c_ptr, stride_cm, ws_ptr, cnt_ptr, N,
                   A_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, TOKENS: tl.constexpr):
    """Both GEMVs' end: this program's float32 sums of rows rn for each token (out; out1, the second token's,
    where TOKENS == 2) added over the K slices, then _gemv_store for each token, by the last slice to arrive."""
    last = True
    if TOKENS == 2:
        both = tl.join(out, out1)  # [BLOCK_N, 2]: one split-K partial for both tokens
        if SPLIT > 1:
            tile = offs_n[:, None] * 2 + tl.arange(0, 2)[None, :]
            both, last = _split_k_sum(both, ws_ptr, cnt_ptr, tile, tl.num_programs(0) * BLOCK_N * 2, pid_n, pid_k,
                                      SPLIT)
        out, out1 = tl.split(both)
    elif SPLIT > 1:
        out, last = _split_k_sum(out, ws_ptr, cnt_ptr, offs_n, tl.num_programs(0) * BLOCK_N, pid_n, pid_k, SPLIT)
    if last:
        _gemv_store(out, offs_n, rn, pid_n, as_ptr, b_ptr, c_ptr, N, A_INT8, HAS_BIAS, ACT, GLU, BLOCK_N)
        if TOKENS == 2:
            _gemv_store(out1, offs_n, rn, pid_n, as_ptr + 1, b_ptr, c_ptr + stride_cm, N, A_INT8, HAS_BIAS, ACT, GLU,
                        BLOCK_N)


# The INT4 GEMV's one configuration: 64 rows a program (two rows a thread), about 8 programs per SM. Close to
# the best configuration at every Llama-7B decode shape with the weights read from memory, where the
# autotuner's L2-hot measure picked slower ones (docs/history.md).
W4_BLOCK_N = 64
W4_PROGRAMS_PER_SM = 8
# Two fp16 tokens hold twice the token registers (two K steps), so four programs fit an SM; two int8 tokens ran
# fastest at the one-token count (docs/history.md).
W4_PROGRAMS_PER_SM_2 = 4


def _w4_step(k: int, group: int) -> int:
    """Channels a K step covers: 128 (two half-split chunks) where no group or K boundary falls inside."""
    return 128 if k % 128 == 0 and group % 128 == 0 else PACK


def _w4_plan(a: torch.Tensor, n: int, k: int, group: int) -> tuple[int, int, int]:
    """(split, step, unroll) of an INT4 GEMV launch: K slices per tile of rows so that about
    W4_PROGRAMS_PER_SM programs (W4_PROGRAMS_PER_SM_2 for two fp16 tokens) run on each SM. Programs with two K
    steps in flight take one wave of at most that many: a few programs past it cost fp16 q/k/v more than the
    extra slice saved, while one-step programs gained from them (docs/history.md). The split is then
    lowered to the fewest slices with the same longest one, so no program gets an empty or stub slice (_k_slice
    cuts K in whole iterations)."""
    step = _w4_step(k, group)
    programs = W4_PROGRAMS_PER_SM_2 if a.shape[0] == 2 and a.dtype == torch.float16 else W4_PROGRAMS_PER_SM
    per_sm = programs * device_info(device_index(a))[1] / triton.cdiv(n, W4_BLOCK_N)
    most = min(k // step, MAX_SPLIT)
    split = max(1, min(round(per_sm), most))
    unroll = _w4_unroll(a, k, step, split)
    if unroll == 2:
        split = max(1, min(int(per_sm), most))
    iters = k // (step * unroll)
    return triton.cdiv(iters, triton.cdiv(iters, split)), step, unroll


def _w4_unroll(a: torch.Tensor, k: int, step: int, split: int) -> int:
    """K steps an iteration of the INT4 GEMV takes (their loads in flight together): two for fp16 tokens where
    every K slice gets at least two such pairs (one pair for two tokens); one otherwise. bf16 tokens were no
    faster with two; one token on slices of one pair was slower at 4096 x 4096, two tokens faster
    (docs/history.md)."""
    pair, pairs = 2 * step, 2 if a.shape[0] == 1 else 1
    fits = k % pair == 0 and k // (pair * split) >= pairs
    return 2 if a.dtype == torch.float16 and step == 128 and fits else 1


@triton.jit
def _nibble_floats(wb, o23, o19, o15, o11, o7):
    """Bytes -> (low, high) nibbles minus the zero point as float32, exact, four bytes per 32-bit register.

    A nibble at bits p..p+3 OR-ed into the exponent of 2^(23-p) is the float 2^(23-p) + q, so one lop3 a weight
    converts it with no shift and no I2F (only the top three nibbles need one shift, bits 24-31 overlap the
    exponent); subtracting o_E = 2^E + zero leaves q - zero exactly (E >= 7 keeps 2^E + 15 exact).
    """
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t;"
        " lop3.b32 $0, $8, 0xF, 0x4B000000, 0xea; sub.f32 $0, $0, $9;"
        " lop3.b32 $4, $8, 0xF0, 0x49000000, 0xea; sub.f32 $4, $4, $13;"
        " lop3.b32 $1, $8, 0xF00, 0x47000000, 0xea; sub.f32 $1, $1, $17;"
        " lop3.b32 $5, $8, 0xF000, 0x45000000, 0xea; sub.f32 $5, $5, $21;"
        " lop3.b32 $2, $8, 0xF0000, 0x43000000, 0xea; sub.f32 $2, $2, $25;"
        " shr.u32 t, $8, 12;"
        " lop3.b32 $6, t, 0xF00, 0x47000000, 0xea; sub.f32 $6, $6, $17;"
        " lop3.b32 $3, t, 0xF000, 0x45000000, 0xea; sub.f32 $3, $3, $21;"
        " lop3.b32 $7, t, 0xF0000, 0x43000000, 0xea; sub.f32 $7, $7, $25; }",
        "=r,=r,=r,=r,=r,=r,=r,=r," + "r," * 20 + "r", [wb, o23, o19, o15, o11, o7], dtype=(tl.float32, tl.float32),
        is_pure=True, pack=4)


@triton.jit
def _zero_offsets(z, BLOCK_N: tl.constexpr, BYTES: tl.constexpr):
    """2^E + zero (z: the rows' float32 zero points [BLOCK_N]) for the five exponents _nibble_floats uses, each
    broadcast over [BLOCK_N, BYTES]."""
    shape: tl.constexpr = (BLOCK_N, BYTES)
    return (tl.broadcast_to((z + 8388608.0)[:, None], shape), tl.broadcast_to((z + 524288.0)[:, None], shape),
            tl.broadcast_to((z + 32768.0)[:, None], shape), tl.broadcast_to((z + 2048.0)[:, None], shape),
            tl.broadcast_to((z + 128.0)[:, None], shape))


@triton.jit
def _dp4a(lo, xl, hi, xh):
    """int8 [.., 4n] planes -> int32 [.., 4n]: the first of every four lanes holds the four bytes' dot (low and
    high nibbles against their channels, two dp4a), the other three 0, so a sum over the run is its dot."""
    return tl.inline_asm_elementwise(
        "{ dp4a.s32.s32 $0, $4, $5, 0; dp4a.s32.s32 $0, $6, $7, $0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0; }",
        "=r,=r,=r,=r,r,r,r,r", [lo, xl, hi, xh], dtype=tl.int32, is_pure=True, pack=4)


def _half_run_asm(tokens: int) -> str:
    """PTX for _half_run_dots: per 32-bit word of weights, two prmt spread bytes (0, 1) and (2, 3) to the 16-bit
    lanes, four lop3 OR the low nibbles into the mantissa of 4.0 and the high ones into that of 0.25 (both give
    base + q / 256), four packed subtracts of base + zero / 256, then for each token four packed FMAs against
    its channel pairs. Operands: 16 outputs, the 4 weight words, each token's 8 low-nibble and 8 high-nibble
    channel words, then the zero words."""
    zl = f"${20 + 16 * tokens}"
    body = ["{ .reg .b32 t0, t1, u, zh;", "".join(f" .reg .b32 acc{t};" for t in range(tokens)),
            " .reg .b16 ha, hb; .reg .f32 fa, fb;", "".join(f" mov.b32 acc{t}, 0;" for t in range(tokens)),
            f" mov.b32 zh, 0x43804380; sub.f16x2 zh, {zl}, zh;"]
    for i in range(4):
        body.append(f" prmt.b32 t0, ${16 + i}, 0, 0x4140; prmt.b32 t1, ${16 + i}, 0, 0x4342;")
        for t_reg, j, mask, base, zero in (("t0", 0, "0x000F000F", "0x44004400", zl), ("t1", 1, "0x000F000F",
                                           "0x44004400", zl), ("t0", 8, "0x00F000F0", "0x34003400", "zh"),
                                          ("t1", 9, "0x00F000F0", "0x34003400", "zh")):
            body.append(f" lop3.b32 u, {t_reg}, {mask}, {base}, 0xea; sub.f16x2 u, u, {zero};")
            body += [f" fma.rn.f16x2 acc{t}, u, ${20 + 16 * t + j + 2 * i}, acc{t};" for t in range(tokens)]
    for t in range(tokens):  # output lane t: token t's dot
        body.append(f" mov.b32 {{ha, hb}}, acc{t}; cvt.f32.f16 fa, ha; cvt.f32.f16 fb, hb; add.f32 fa, fa, fb;"
                    f" mov.b32 ${t}, fa;")
    body += [f" mov.b32 ${i}, 0;" for i in range(tokens, 16)]
    return "".join(body) + " }"


_HALF_RUN_ASM = tl.constexpr(_half_run_asm(1))
_HALF_RUN_ASM_2 = tl.constexpr(_half_run_asm(2))


@triton.jit
def _half_run_dots(wb, xl, xh, zl):
    """fp16 tokens: bytes [.., 16n] -> int32 [.., 16n] whose first of every 16 lanes holds the float32 bits of
    the 16-byte run's dot (its 32 weights as (q - zero) / 256, exact in fp16, against their channels, packed
    fp16 FMAs), the other fifteen 0, so an integer sum over the run is the dot's bits. zl: 4 + zero / 256 in
    fp16. The 1/256 keeps any run's fp16 sum finite: 16 products of |x| <= 65504 by |q - zero| / 256 <= 15/256
    stay below 65504."""
    return tl.inline_asm_elementwise(_HALF_RUN_ASM, "=r," * 16 + "r," * 27 + "r", [wb, xl, xh, zl], dtype=tl.int32,
                                     is_pure=True, pack=16)


@triton.jit
def _half_run_dots_2(wb, xl, xh, xl1, xh1, zl):
    """_half_run_dots for two tokens from one unpacking of the weights: lane 0 of each run holds the first
    token's dot, lane 1 the second's (xl1, xh1), the others 0."""
    return tl.inline_asm_elementwise(_HALF_RUN_ASM_2, "=r," * 16 + "r," * 43 + "r", [wb, xl, xh, xl1, xh1, zl],
                                     dtype=tl.int32, is_pure=True, pack=16)


@triton.jit
def _run_lane(d, lane: tl.constexpr, BLOCK_N: tl.constexpr, BYTES: tl.constexpr):
    """Lane `lane` of each 16-lane run of d (int32 [BLOCK_N, BYTES]) -> [BLOCK_N, BYTES // 16]; the lanes are one
    thread's registers, so this picks registers."""
    d3 = tl.reshape(d, (BLOCK_N, BYTES // 16, 16))
    return tl.sum(tl.where(tl.arange(0, 16)[None, None, :] == lane, d3, 0), 2)


@triton.jit
def _after(wb, dep):
    """wb (bytes [.., 16n]) made to depend on the first word of each 16-byte run of dep, its bits unchanged (OR
    of +0: dep's word, made a finite float, times 0, sign cleared), so dep's load is issued before wb's first
    use, where ptxas would otherwise sink it to its own use."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t, zero; mov.b32 zero, 0; and.b32 t, $8, 0x3FFFFFFF; mul.rn.f32 t, t, zero;"
        " and.b32 t, t, 0x7FFFFFFF; or.b32 $0, $4, t; mov.b32 $1, $5; mov.b32 $2, $6; mov.b32 $3, $7; }",
        "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [wb, dep], dtype=tl.uint8, is_pure=True, pack=16)


@triton.jit
def _w4_load(w_rows, s_ptr, z_ptr, x_lo, rn, k0, N, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
             SZ_WORD: tl.constexpr):
    """The K step at k0's loads: weight bytes, the group's float32 scales and zero points (8 when symmetric;
    SZ_WORD: interleaved, one word a row), and the token's channels for the low and the high nibbles."""
    g = k0 // GROUP_SIZE if GROUP_SIZE > 0 else 0
    wb = tl.load(w_rows + k0 // 2)
    s, z = _scale_zero(s_ptr, z_ptr, g * N, rn, HAS_ZERO, SZ_WORD)
    return wb, s, z, tl.load(x_lo + k0), tl.load(x_lo + k0 + PACK_C // 2)


@triton.jit
def _second_token(x_lo, k0, stride_am, xl, xh, TOKENS: tl.constexpr):
    """The second token's channels for the step at k0 (TOKENS == 2); otherwise xl, xh, unused."""
    if TOKENS == 2:
        return tl.load(x_lo + stride_am + k0), tl.load(x_lo + stride_am + k0 + PACK_C // 2)
    return xl, xh


@triton.jit
def _w4_k_step(acc, acc1, wb, s, z, xl, xh, xl1, xh1, A_INT8: tl.constexpr, HALF_ACC: tl.constexpr,
               GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BYTES: tl.constexpr, TOKENS: tl.constexpr):
    """acc [BLOCK_N, BYTES // 16] plus one K step (_w4_load's tensors): each thread's 16-byte runs' dots,
    scaled by the group; where TOKENS == 2, acc1 the same for the second token (xl1, xh1) from the same
    unpacked weights."""
    part1 = acc1
    if A_INT8:
        # INT8 tokens: q - zero as int8 four to a register (_nibble_planes), two dp4a per four bytes; the
        # step's int32 dot (|dot| <= 128 * 127 * 15 < 2^22) is exact through _exact_float. The zero point is
        # not tied to the scale: int8 tokens measured no better tied (docs/history.md).
        lo, hi = _nibble_planes(wb, z.to(tl.int8), tl.int8, BLOCK_N, BYTES)
        part = _exact_float(tl.sum(tl.reshape(_dp4a(lo, xl, hi, xh), (BLOCK_N, BYTES // 16, 16)), 2))
        if TOKENS == 2:
            part1 = _exact_float(tl.sum(tl.reshape(_dp4a(lo, xl1, hi, xh1), (BLOCK_N, BYTES // 16, 16)), 2))
    elif HALF_ACC:
        zl = tl.broadcast_to((_tied(z, s) * 0.00390625 + 4.0).to(tl.float16)[:, None], (BLOCK_N, BYTES))
        s = s * 256.0
        if TOKENS == 2:
            d = _half_run_dots_2(wb, xl, xh, xl1, xh1, zl)
            part = _run_lane(d, 0, BLOCK_N, BYTES).to(tl.float32, bitcast=True)
            part1 = _run_lane(d, 1, BLOCK_N, BYTES).to(tl.float32, bitcast=True)
        else:
            d = _half_run_dots(wb, xl, xh, zl)
            part = tl.sum(tl.reshape(d, (BLOCK_N, BYTES // 16, 16)), 2).to(tl.float32, bitcast=True)
    else:
        o23, o19, o15, o11, o7 = _zero_offsets(_tied(z, s), BLOCK_N, BYTES)
        lo, hi = _nibble_floats(wb, o23, o19, o15, o11, o7)
        # Two in-thread sums of products: each product feeds an add, so they compile to FMA chains.
        part = (tl.sum(tl.reshape(lo * xl.to(tl.float32), (BLOCK_N, BYTES // 16, 16)), 2)
                + tl.sum(tl.reshape(hi * xh.to(tl.float32), (BLOCK_N, BYTES // 16, 16)), 2))
        if TOKENS == 2:
            part1 = (tl.sum(tl.reshape(lo * xl1.to(tl.float32), (BLOCK_N, BYTES // 16, 16)), 2)
                     + tl.sum(tl.reshape(hi * xh1.to(tl.float32), (BLOCK_N, BYTES // 16, 16)), 2))
    if TOKENS == 2:
        acc1 = tl.fma(part1, s[:, None], acc1) if GROUP_SIZE > 0 else acc1 + part1
    return tl.fma(part, s[:, None], acc) if GROUP_SIZE > 0 else acc + part, acc1


@triton.jit
def _w4_gemv_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, z_ptr, b_ptr, c_ptr, ws_ptr, cnt_ptr, N, K, stride_wn,
    A_INT8: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, GLU: tl.constexpr, STEP: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr, SZ_WORD: tl.constexpr, UNROLL: tl.constexpr = 1, TOKENS: tl.constexpr = 1, stride_am=0,
    stride_cm=0, rs_ptr=None, ROW_SCALE: tl.constexpr = False,
):
    """One token (or two: TOKENS), INT4 weights, on CUDA cores: each thread reads 16-byte runs of its rows'
    packed weights, turns them into q - zero (fp16 tokens: packed fp16, _half_run_dots; bf16: float32,
    _nibble_floats; int8: int8, dp4a), multiplies them by the token's channels (loaded per row, so they arrive
    in the weight tile's layout; the rows of one thread share the loads) and sums its run before the group
    scale. Program (n, s) covers BLOCK_N rows and the s-th of SPLIT slices of K; _split_k_sum adds the slices.
    UNROLL (1 or 2): K steps an iteration, all their loads issued before the first step's math (K a whole
    number of them). TOKENS == 2: the second token (a_ptr + stride_am, output row c_ptr + stride_cm) shares
    each step's unpacked weights, so the weights are read once for both. ROW_SCALE: progressive INT4, the group
    scales (s_ptr) are integers and each row's float scale (rs_ptr) multiplies its sums once, before the slices
    are added.
    """
    wait_for_producer(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HALF_ACC: tl.constexpr = a_ptr.dtype.element_ty == tl.float16
    BYTES: tl.constexpr = STEP // 2
    HALF: tl.constexpr = PACK_C // 2
    byte = tl.arange(0, BYTES)
    offs_n, rn = _gemv_rows(pid_n, N, GLU, BLOCK_N)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn + byte[None, :]
    # Byte j of a chunk holds channels j (low nibble) and j + HALF (high): quant.pack_int4.
    x_lo = a_ptr + tl.zeros((BLOCK_N, 1), tl.int32) + ((byte // HALF) * PACK_C + byte % HALF)[None, :]
    acc = tl.zeros((BLOCK_N, BYTES // 16), dtype=tl.float32)
    acc_b = acc  # the second token's (TOKENS == 2)
    k_beg, k_end = _k_slice(K, pid_k, SPLIT, STEP * UNROLL)
    for k0 in range(k_beg, k_end, STEP * UNROLL):
        wb, s, z, xl, xh = _w4_load(w_rows, s_ptr, z_ptr, x_lo, rn, k0, N, HAS_ZERO, GROUP_SIZE, SZ_WORD)
        xl_b, xh_b = _second_token(x_lo, k0, stride_am, xl, xh, TOKENS)
        if UNROLL == 2:
            # The second step's weights, scale and zero point are loaded with the first's and the first's math
            # waits for them too, so two steps' bytes are in flight at once (ptxas would sink their loads).
            wb1, s1, z1, xl1, xh1 = _w4_load(w_rows, s_ptr, z_ptr, x_lo, rn, k0 + STEP, N, HAS_ZERO, GROUP_SIZE,
                                             SZ_WORD)
            xl1_b, xh1_b = _second_token(x_lo, k0 + STEP, stride_am, xl1, xh1, TOKENS)
            wb = _after(wb, wb1)
            s = _tied(_tied(s, s1), z1)
        acc, acc_b = _w4_k_step(acc, acc_b, wb, s, z, xl, xh, xl_b, xh_b, A_INT8, HALF_ACC, GROUP_SIZE, BLOCK_N,
                                BYTES, TOKENS)
        if UNROLL == 2:
            acc, acc_b = _w4_k_step(acc, acc_b, wb1, s1, z1, xl1, xh1, xl1_b, xh1_b, A_INT8, HALF_ACC, GROUP_SIZE,
                                    BLOCK_N, BYTES, TOKENS)
    out, out_b = tl.sum(acc, 1), tl.sum(acc_b, 1)
    if GROUP_SIZE == 0:
        s = _scale_zero(s_ptr, z_ptr, 0, rn, False, SZ_WORD)[0] * (256.0 if HALF_ACC else 1.0)
        out, out_b = out * s, out_b * s
    if ROW_SCALE:
        r = tl.load(rs_ptr + rn)
        out, out_b = out * r, out_b * r
    _gemv_epilogue(out, out_b, offs_n, rn, pid_n, pid_k, as_ptr, b_ptr, c_ptr, stride_cm, ws_ptr, cnt_ptr, N, A_INT8,
                   HAS_BIAS, ACT, GLU, SPLIT, BLOCK_N, TOKENS)
