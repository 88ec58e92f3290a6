"""Quantized linear layers as one Triton GEMM with a fused dequantizing epilogue.

One kernel body, specialised by constexprs, covers the four weight/activation combinations:
- A_INT8 (W8A8, W4A8): int8 x int8 -> int32 on tensor cores. Per-channel weights keep one int32
  accumulator for the whole K loop; group-wise weights (group_size < K) convert each group-aligned
  chunk's int32 dot to float and multiply it by its group's scale, so groups are accumulated in the K
  loop. The per-token activation scale, bias and activation come last.
- A16 (W8A16, W4A16): weights are dequantized in registers to the activation dtype and fed to an fp16/bf16
  tensor-core dot with float32 accumulation.
INT4 weights are packed two per byte and unpacked in registers, so only K/2 bytes per row leave memory.

Three more kernels take the shapes where that one is not the fastest: _w8a8_tma_kernel (prefill W8A8 on
Hopper, operands by TMA), _w4_skinny_kernel (INT4 weights at 1..16 tokens on Hopper, decode: the weights as
the MMA's M side, split-K) and _gemv_kernel (the other formats at one token, on CUDA cores).

Scales and zero points are stored transposed, [G, N], so one program's loads of a group's scales are
contiguous; `KernelWeight.from_quant` makes that layout once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import quant as Q
from . import act_code
from .launch import device_index, device_info, pdl_flags, wait_for_producer
from .rowwise import apply_act

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: the pointer-based kernel takes every shape
    TensorDescriptor = None

# INT4 channels per half-split chunk: the storage layout of zeroquant.quant.pack_int4 (byte j of a chunk =
# channel j | channel j + PACK/2 << 4), read as stored. Unpacking is two nibble masks with no register
# shuffle, and each half feeds its own dot against a contiguous slice of the activations.
PACK = Q.INT4_CHUNK
PACK_C = tl.constexpr(PACK)  # the same, readable inside kernels


@dataclass(frozen=True)
class KernelWeight:
    """A quantized weight in the layout the GEMM kernel reads."""

    qweight: torch.Tensor  # int8 [N, K] (bits 8, symmetric) or uint8 [N, K/2] packed by quant.pack_int4
    scale: torch.Tensor  # float32 [G, N]
    zero: torch.Tensor | None  # float32 [G, N], integer-valued; None: symmetric
    bits: int
    in_features: int
    out_features: int
    group_size: int  # input channels per scale (in_features for one scale per row); the last group may be shorter
    # Split-K arrival counters of the small-M INT4 kernel, one per tile of output channels; zero between
    # launches (each tile's last program resets its own). Owned by the weight so no two layers share them.
    counters: torch.Tensor | None = None

    def __post_init__(self):
        if self.counters is None and self.bits == 4:
            tiles = triton.cdiv(self.out_features, SKINNY_BLOCK_N)
            object.__setattr__(self, "counters", torch.zeros(tiles, dtype=torch.int32, device=self.qweight.device))

    @property
    def kernel_group(self) -> int:
        """The kernels' GROUP_SIZE: the group size, or 0 for one scale per output channel."""
        return self.group_size if self.scale.shape[0] > 1 else 0

    @staticmethod
    def unsupported(k: int, bits: int, symmetric: bool, group_size: int) -> str | None:
        """Why the kernels cannot take this weight format (None: they can). group_size >= k: one per row.

        A short last group costs nothing: every kernel looks a chunk's group up as k // GROUP_SIZE, and its
        chunks never straddle a group, so K only has to be a whole number of chunks (64 channels)."""
        if bits == 8 and not symmetric:
            return "8-bit kernel weights must be symmetric"
        if bits not in (4, 8):
            return f"kernels take 4- or 8-bit weights, got {bits}"
        gs = min(group_size, k)
        if gs < k and not (gs % 16 == 0 and (gs % 128 == 0 or 128 % gs == 0)):
            return f"group size {gs} must be a multiple of 128 or a power of two between 16 and 128"
        if bits == 4 and gs % PACK:
            return f"INT4 kernels need groups (or K) that are multiples of {PACK}, got {gs}"
        if gs < k and k % gs and k % PACK:
            return f"a short last group needs K to be a multiple of {PACK}, got {k}"
        return None

    @classmethod
    def from_quant(
        cls, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, bits: int, group_size: int
    ) -> KernelWeight:
        """From QuantLinear storage: qweight as stored, w_scale / w_zero [N, G]; group_size as QuantLinear's."""
        n = qweight.shape[0]
        k = qweight.shape[1] * (2 if bits == 4 else 1)
        group_size = k if w_scale.shape[1] == 1 else group_size
        why = cls.unsupported(k, bits, w_zero is None, group_size)
        if bits == 8 and qweight.dtype != torch.int8:
            why = "8-bit kernel weights must be int8"
        if why:
            raise ValueError(why)
        # No copies when QuantLinear's buffers are in place: its scales are stored [G, N]-major already.
        zero = None if w_zero is None else w_zero.float().t().contiguous()
        return cls(qweight.contiguous(), w_scale.float().t().contiguous(), zero, bits, k, n, group_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)


def _gpu_time(fn, quantiles):
    """The autotuners' measure: back-to-back CUDA-graph replays, so the inputs sit in L2 as they do in a model
    (the activation was just written by the op before). triton's do_bench flushes L2 before every call; its
    ranking of close configurations changed from one process to the next, and BERT-large's w8a8 forward on
    H100 came out at 4.58 or 4.85 ms depending on what it picked."""
    return triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=quantiles)


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
_ALL = [c for cs in _CONFIGS.values() for c in cs]


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    gs, k = args["GROUP_SIZE"], args["K"]
    keep = [c for c in configs if c in _CONFIGS[args["M_BUCKET"]]]
    if gs or args["W_BITS"] == 4:  # chunks are not masked: whole BLOCK_K steps, aligned to groups
        bk = lambda c: c.kwargs["BLOCK_K"]
        keep = [c for c in keep if k % bk(c) == 0 and (not gs or gs % bk(c) == 0 or bk(c) % gs == 0)]
    return keep or [_cfg(16 if args["M_BUCKET"] == 16 else 64, 64, 64, 4, 2)]


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


@triton.autotune(
    configs=_ALL,
    key=["M_BUCKET", "N", "K", "A_INT8", "W_BITS", "HAS_ZERO", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": _prune},
    # Short timing runs: the ranking of configs is stable long before the default 100 ms.
    do_bench=_gpu_time,
)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0, "CH": _chunk})
@triton.jit
def _qlinear_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, z_ptr, b_ptr, c_ptr,
    M, N, K, stride_am, stride_wn, stride_cm, M_BUCKET,
    A_INT8: tl.constexpr, W_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr, CH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns load a valid row instead (wrapped); their results are never stored.
    rm = (offs_m % M).to(tl.int64)
    rn = offs_n % N
    a_rows = a_ptr + rm[:, None] * stride_am
    w_cols = w_ptr + rn[None, :].to(tl.int64) * stride_wn

    # A BLOCK_K step is split into chunks of CH channels (see _chunk): one dot per chunk, its group's scale
    # applied to that dot; an INT4 chunk is two dots on unshuffled nibbles.
    HALF: tl.constexpr = CH // 2
    offs_c = tl.arange(0, CH)
    offs_h = tl.arange(0, HALF)

    # Only one accumulator is live through the loop: two would double the registers and spill.
    if A_INT8 and GROUP_SIZE == 0:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GROUP_SIZE == 0:  # one scale (and zero) per output channel
        s = tl.load(s_ptr + rn)
        z = tl.load(z_ptr + rn) if HAS_ZERO else s

    for k0 in range(0, K, BLOCK_K):
        for j in tl.static_range(BLOCK_K // CH):
            kc = k0 + j * CH
            if GROUP_SIZE > 0:
                g = kc // GROUP_SIZE
                s = tl.load(s_ptr + g * N + rn)
                z = tl.load(z_ptr + g * N + rn) if HAS_ZERO else s
            if W_BITS == 4:
                wb = tl.load(w_cols + (kc // 2 + offs_h)[:, None])  # [HALF, BLOCK_N] bytes
                a_lo = tl.load(a_rows + (kc + offs_h)[None, :])
                a_hi = tl.load(a_rows + (kc + HALF + offs_h)[None, :])
                lo, hi = wb & 0xF, wb >> 4
                if A_INT8:
                    part = tl.dot(a_lo, _w4_int8(lo, z, HAS_ZERO), out_dtype=tl.int32)
                    part = tl.dot(a_hi, _w4_int8(hi, z, HAS_ZERO), part, out_dtype=tl.int32)
                else:
                    acc = tl.dot(a_lo, _w4_float(lo, z, s, HAS_ZERO).to(a_lo.dtype), acc)
                    acc = tl.dot(a_hi, _w4_float(hi, z, s, HAS_ZERO).to(a_hi.dtype), acc)
            else:
                if EVEN_K:
                    a = tl.load(a_rows + (kc + offs_c)[None, :])
                    w = tl.load(w_cols + (kc + offs_c)[:, None])
                else:
                    a = tl.load(a_rows + (kc + offs_c)[None, :], mask=(kc + offs_c)[None, :] < K, other=0)
                    w = tl.load(w_cols + (kc + offs_c)[:, None], mask=(kc + offs_c)[:, None] < K, other=0)
                if A_INT8:
                    part = tl.dot(a, w, out_dtype=tl.int32)
                else:
                    acc = tl.dot(a, (_exact_float(w.to(tl.int32)) * s[None, :]).to(a.dtype), acc)
            if A_INT8:
                if GROUP_SIZE > 0:
                    acc = tl.fma(_exact_float(part), s[None, :], acc)
                else:
                    acc_i += part

    if A_INT8:
        if GROUP_SIZE == 0:
            acc = acc_i.to(tl.float32) * s[None, :]
        acc = acc * tl.load(as_ptr + rm)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    acc = apply_act(acc, ACT)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


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
    weights (4096 x 11008 on H100: 33.7 against 35.0 us). Here a weight tile dequantizes in registers
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


def _skinny_ok(a: torch.Tensor, w: KernelWeight) -> bool:
    """INT4 weights, 1..16 tokens, on Hopper+ (the warpgroup MMA's register operand). One token too: on H100
    W4A16 beats the GEMV at Llama-7B's MLP shapes (4096 x 11008: 17.9 against 19.1 us; 11008 x 4096: 19.2
    against 37.3), and loses only where the weight is small (4096^2: 9.6 against 8.0)."""
    return w.bits == 4 and a.shape[0] <= 16 and a.is_cuda and device_info(device_index(a))[0] >= 9


def _skinny_split(w: KernelWeight, sms: int) -> int:
    """K slices per output tile: about five programs per SM, so all of them are resident at once (80
    registers a thread) and keep enough weight loads in flight; at least 256 channels a slice. On H100 at
    M = 16 anything from 4 to 10 programs per SM is within 10% of the best; 1 per SM (no split) is 2-2.7x
    slower at 4096 x 4096 and 11008 x 4096."""
    tiles = triton.cdiv(w.out_features, SKINNY_BLOCK_N)
    return max(1, min(round(5 * sms / tiles), w.in_features // 256, 16))


def _w4_skinny(a, xs, w: KernelWeight, bias, act, c, split: int | None = None) -> None:
    """Launch _w4_skinny_kernel; xs: float32 per-token scales of int8 a, or None for fp16/bf16 a."""
    m, k = a.shape
    n = w.out_features
    tiles = triton.cdiv(n, SKINNY_BLOCK_N)
    split = split or _skinny_split(w, device_info(device_index(a))[1])
    ws = torch.empty(split * tiles * SKINNY_BLOCK_N * 16, dtype=torch.float32, device=a.device) if split > 1 else c
    _w4_skinny_kernel[(tiles, split)](
        a, xs if xs is not None else c, w.qweight, w.scale, w.zero if w.zero is not None else w.scale,
        bias if bias is not None else c, c, ws, w.counters, m, n, k, a.stride(0), w.qweight.stride(0), c.stride(0),
        A_INT8=xs is not None, HAS_ZERO=w.zero is not None, GROUP_SIZE=w.kernel_group,
        HAS_BIAS=bias is not None, ACT=act_code(act), SPLIT=split, BLOCK_N=SKINNY_BLOCK_N,
    )


def _tma_block_shapes(nargs):
    """Autotune pre-hook: a TMA descriptor's box is the tile each config loads."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    nargs["c_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"]]


def _tma_cfg(bm, bn, bk, warps, stages, persist=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PERSIST": persist}, num_warps=warps,
                         num_stages=stages, pre_hook=_tma_block_shapes)


# Persistent configs (one program per SM looping over tiles) win where K is short and N long (BERT-large's
# FFN1, 4096 x 1024 -> 4096: 39 vs 44 us on H100): the flattened loop issues the next tile's loads while
# this tile's epilogue runs. One tile per program wins at K = 4096 and up. 128 x 256 x 128 with 4 stages
# does not fit shared memory next to the TMA store's 64 KiB output tile.
_TMA_CONFIGS = [_tma_cfg(*c) for c in [
    (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (128, 256, 64, 8, 4),
    (64, 256, 128, 4, 4), (128, 256, 128, 8, 3, True), (128, 128, 128, 4, 4, True)]]


@triton.autotune(
    configs=_TMA_CONFIGS,
    key=["M_BUCKET", "N", "K", "HAS_BIAS", "ACT"],
    do_bench=_gpu_time,
)
@triton.jit
def _w8a8_tma_kernel(
    a_desc, w_desc, c_desc, as_ptr, s_ptr, b_ptr, M, N, K, M_BUCKET,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PERSIST: tl.constexpr, PDL: tl.constexpr,
):
    """Prefill W8A8 with per-channel weights: the int8 x int8 tiles arrive by TMA (Hopper's bulk copy
    engine, out-of-range parts zero-filled), which frees the warps' load instructions and registers for the
    MMAs; 3-12% faster than the pointer-based _qlinear_kernel at M = 4096 on H100. One int32 accumulator,
    the same epilogue, stored by TMA. Each program takes tiles pid, pid + programs, ... (one tile unless
    PERSIST)."""
    wait_for_producer(PDL)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for t in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=PERSIST):
        pid_m, pid_n = _tile(t, M, N, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m % M
        rn = offs_n % N
        out = acc.to(tl.float32) * tl.load(s_ptr + rn)[None, :] * tl.load(as_ptr + rm)[:, None]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        out = apply_act(out, ACT)
        # A TMA store: asynchronous, clipped to the tensor's bounds, and the registers are free sooner.
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(c_desc.dtype))


def _tma_ok(a: torch.Tensor, w: KernelWeight) -> bool:
    """Large-M per-channel W8A8 with TMA-legal operands (16-byte aligned bases and row strides) on Hopper+."""
    return (TensorDescriptor is not None and a.is_cuda and a.shape[0] > 256 and w.bits == 8 and w.scale.shape[0] == 1
            and a.shape[1] % 16 == 0 and a.stride(0) % 16 == 0 and w.qweight.stride(0) % 16 == 0
            and w.out_features % 8 == 0  # the fp16/bf16 output's rows, 16-byte aligned for the TMA store
            and a.data_ptr() % 16 == 0 and w.qweight.data_ptr() % 16 == 0
            and device_info(device_index(a))[0] >= 9)


def _w8a8_tma(a, xs, w: KernelWeight, bias, act, c, config: triton.Config | None = None) -> None:
    """Launch _w8a8_tma_kernel (autotuned, or one given configuration: the tests run each of them)."""
    m, k = a.shape
    n = w.out_features
    sms = device_info(device_index(a))[1]

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(tiles, sms) if meta["PERSIST"] else tiles,)

    # Placeholder boxes: the autotune pre-hook sets each config's own before it launches.
    descs = {name: TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])
             for name, t in (("a_desc", a), ("w_desc", w.qweight), ("c_desc", c))}
    m_bucket = min(triton.next_power_of_2(m), 16384)
    args = (*descs.values(), xs, w.scale, bias if bias is not None else c, m, n, k, m_bucket)
    flags = {"HAS_BIAS": bias is not None, "ACT": act_code(act), **pdl_flags(a, graph_only=True)}
    if config is None:
        _w8a8_tma_kernel[grid](*args, **flags)
        return
    config.pre_hook({**descs, **config.kwargs})
    _w8a8_tma_kernel.fn[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                              num_stages=config.num_stages)


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



def quant_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    w: KernelWeight,
    bias: torch.Tensor | None = None,
    act: str | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """act(x [* x_scale] @ W^T + bias) -> [..., N] in out_dtype; twin: reference.quant_linear.

    x: int8 [..., K] with float32 per-token x_scale [..., 1] (W8A8/W4A8), or fp16/bf16 with x_scale None.
    """
    k = x.shape[-1]
    if k != w.in_features:
        raise ValueError(f"input has {k} features, weight expects {w.in_features}")
    a_int8 = x_scale is not None
    if a_int8 != (x.dtype == torch.int8):
        raise ValueError("pass x_scale exactly when x is int8")
    lead = x.shape[:-1]
    a = x.reshape(-1, k)
    if a.stride(-1) != 1:
        a = a.contiguous()
    m, n = a.shape[0], w.out_features
    c = torch.empty((m, n), dtype=out_dtype if a_int8 else x.dtype, device=x.device)
    if m == 0:
        return c.reshape(*lead, n)
    xs = x_scale.reshape(-1).float().contiguous() if a_int8 else c
    group = w.kernel_group
    if _skinny_ok(a, w):
        _w4_skinny(a, xs if a_int8 else None, w, bias, act, c)
        return c.reshape(*lead, n)
    if m == 1 and k % 64 == 0:
        _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            a, xs, w.qweight, w.scale, w.zero if w.zero is not None else w.scale, bias if bias is not None else c, c,
            n, k, w.qweight.stride(0), A_INT8=a_int8, W_BITS=w.bits, HAS_ZERO=w.zero is not None,
            GROUP_SIZE=group, HAS_BIAS=bias is not None, ACT=act_code(act), **pdl_flags(a, graph_only=True),
        )
        return c.reshape(*lead, n)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    if a_int8 and _tma_ok(a, w):
        _w8a8_tma(a, xs, w, bias, act, c)
        return c.reshape(*lead, n)
    _qlinear_kernel[grid](
        a, xs, w.qweight, w.scale, w.zero if w.zero is not None else w.scale, bias if bias is not None else c, c,
        m, n, k, a.stride(0), w.qweight.stride(0), c.stride(0), _m_bucket(m),
        A_INT8=a_int8, W_BITS=w.bits, HAS_ZERO=w.zero is not None, GROUP_SIZE=group,
        HAS_BIAS=bias is not None, ACT=act_code(act),
    )
    return c.reshape(*lead, n)


def w8a8_linear(q_x, s_x, w: KernelWeight, bias=None, act=None, out_dtype=torch.float16) -> torch.Tensor:
    """INT8 activations (per-token scale) x INT8 weights (per-channel or group-wise scales)."""
    assert w.bits == 8
    return quant_linear(q_x, s_x, w, bias, act, out_dtype)


def w4a8_linear(q_x, s_x, w: KernelWeight, bias=None, act=None, out_dtype=torch.float16) -> torch.Tensor:
    """INT8 activations x packed INT4 weights, unpacked in registers."""
    assert w.bits == 4
    return quant_linear(q_x, s_x, w, bias, act, out_dtype)


def w4a16_linear(x, w: KernelWeight, bias=None, act=None) -> torch.Tensor:
    """fp16/bf16 activations x packed INT4 weights dequantized in registers."""
    assert w.bits == 4
    return quant_linear(x, None, w, bias, act)
