"""Row-wise Triton kernels: token-wise INT8 quantization, fused with the op that produces its input.

One program per token row reads the row once, computes (norm | activation), rounds the result to the
model dtype (so the int8 values are those of quantizing the op's fp16 output, like the reference), takes
the row's absmax, and writes int8 + one float32 scale; optionally the fp16 result too, for consumers that
are not quantized linears (the residual stream after BERT's post-LN, for example).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroquant.core.quant import EPS
from zeroquant.kernels import act_code
from zeroquant.kernels.triton.launch import pdl_flags, wait_for_producer

NORM_NONE = 0
NORMS = {"layernorm": 1, "rmsnorm": 2}


@triton.jit
def _rcp(x):
    # One MUFU.RCP. Triton's fp32 '/' is div.full, which adds range checks and rescaling (~8 instructions).
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def gelu_erf(y):
    """y * Phi(y), Phi the normal CDF, to ~3e-7 absolute in Phi: Phi(y) = 1 - h for y >= 0 and h for y < 0,
    h = erfc(|y| / sqrt 2) / 2 by Abramowitz & Stegun 7.1.26 (one reciprocal, one exp2, five FMAs; its
    coefficients halved and the 1/sqrt 2 folded in). Token quantization after it is bound by instruction
    issue, not memory: against 0.5 y (1 + erf(y / sqrt 2)) this drops the sign select, the cancellation
    1 - (1 - h) for negative y, and div.full's range checks."""
    t = _rcp(1.0 + 0.23164189972 * tl.abs(y))  # 0.3275911 / sqrt 2
    h = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145))))
    h = h * tl.exp2(y * y * -0.7213475204444817)  # exp(-y^2 / 2)
    return y * tl.where(y < 0, h, 1.0 - h)


@triton.jit
def apply_act(y, ACT: tl.constexpr):
    if ACT == 1:  # gelu (erf)
        y = gelu_erf(y)
    elif ACT == 2:  # gelu, tanh approximation (GPT-2's gelu_new)
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))  # tanh(u)
    elif ACT == 3:
        y = tl.maximum(y, 0.0)
    elif ACT == 4:  # silu
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _load(ptr, cols, K, EVEN: tl.constexpr):
    if EVEN:  # the row fills the block: no mask compares and selects (the GELU pass is issue-bound)
        v = tl.load(ptr + cols)
    else:
        v = tl.load(ptr + cols, mask=cols < K, other=0.0)
    return v


@triton.jit
def _store(ptr, cols, v, K, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptr + cols, v)
    else:
        tl.store(ptr + cols, v, mask=cols < K)


@triton.jit
def token_scale(absmax, qeps):
    """A token's INT8 scale from its absmax, as torch computes it: IEEE division (div_rn), not Triton's
    approximate '/', which would move ties."""
    return tl.math.div_rn(tl.maximum(absmax, qeps), 127.0)


@triton.jit
def to_int8(y, scale, inv):
    """round_half_even(y / scale) as int8, inv = div_rn(1, scale). Per element, y / scale is y * inv plus one
    FMA correction from the exact residual, the correctly rounded quotient in all but rare last-ulp cases
    (div_rn per element made GELU + quant compute-bound: docs/history.md, kernel choices). Rounding:
    adding 1.5 * 2^23 leaves no fraction bits, so the float add rounds half to even like torch.round, and
    the sum's low mantissa bits are the integer itself (two's complement): its low byte is the int8, with
    no float -> int conversion. No clamp to [-127, 127] is needed: |y| <= absmax and scale = RN(absmax /
    127), so |y * inv| <= 127 (1 + 2^-23) and rounds to at most 127."""
    t = y * inv
    t = tl.fma(tl.fma(-t, scale, y), inv, t)
    return (t + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _row_quant_kernel(
    x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, q_ptr, s_ptr,
    K, stride_x, stride_r, stride_g, stride_y, stride_q, eps, qeps,
    NORM: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_Y: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_producer(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = _load(x_ptr + row * stride_x, cols, K, EVEN)
    out_ty = x.dtype
    y = x.to(tl.float32)
    if HAS_RES:  # the residual add before a post-LN norm, rounded to the model dtype as torch's add is
        y = (y + _load(r_ptr + row * stride_r, cols, K, EVEN).to(tl.float32)).to(out_ty).to(tl.float32)
    if NORM == 1:
        mean = tl.sum(y, 0) / K
        d = y - mean
        if not EVEN:
            d = tl.where(cols < K, d, 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, 0) / K + eps)
        y = d * rstd * _load(w_ptr, cols, K, EVEN).to(tl.float32)
        if HAS_BIAS:
            y += _load(b_ptr, cols, K, EVEN).to(tl.float32)
    elif NORM == 2:
        rstd = tl.rsqrt(tl.sum(y * y, 0) / K + eps)
        # HF's RMSNorm rounds x * rstd to the model dtype before the weight multiply; so do we.
        y = (y * rstd).to(out_ty).to(tl.float32) * _load(w_ptr, cols, K, EVEN).to(tl.float32)
    y = apply_act(y, ACT)
    if HAS_GATE:
        y = y.to(out_ty).to(tl.float32) * _load(g_ptr + row * stride_g, cols, K, EVEN).to(tl.float32)
    y = y.to(out_ty)
    if WRITE_Y:
        _store(y_ptr + row * stride_y, cols, y, K, EVEN)
    y = y.to(tl.float32)
    if not EVEN:
        y = tl.where(cols < K, y, 0.0)
    scale = token_scale(tl.max(tl.abs(y), 0), qeps)
    q = to_int8(y, scale, tl.math.div_rn(1.0, scale))
    _store(q_ptr + row * stride_q, cols, q, K, EVEN)
    tl.store(s_ptr + row, scale)


def _rows(t: torch.Tensor, k: int) -> torch.Tensor:
    t2 = t.reshape(-1, k)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(x, *, norm=NORM_NONE, weight=None, bias=None, eps=0.0, act=None, gate=None, residual=None,
            write_y=False):
    k = x.shape[-1]
    x2 = _rows(x, k)
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    y = torch.empty_like(x2) if write_y else q  # y_ptr unused unless WRITE_Y
    g2 = _rows(gate, k) if gate is not None else x2
    r2 = _rows(residual, k) if residual is not None else x2
    block = triton.next_power_of_2(k)
    # Activation rows (no y store) were fastest with 4 warps per 4096 columns; norms' y stores and two
    # reductions want more warps in flight (docs/history.md, kernel choices).
    warps = max(1, min(16, block // (1024 if act else 512)))
    if m:
        _row_quant_kernel[(m,)](
            x2, r2, g2, weight if weight is not None else x2, bias if bias is not None else x2, y, q, s,
            k, x2.stride(0), r2.stride(0), g2.stride(0), y.stride(0), q.stride(0), eps, EPS,
            NORM=norm, ACT=act_code(act), HAS_RES=residual is not None, HAS_GATE=gate is not None,
            HAS_BIAS=bias is not None, WRITE_Y=write_y, BLOCK=block, EVEN=block == k, num_warps=warps,
            **pdl_flags(x2),
        )
    lead = x.shape[:-1]
    out = (q.reshape(*lead, k), s.reshape(*lead, 1))
    return (y.reshape(*lead, k), *out) if write_y else out


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] fp16/bf16/fp32 -> (int8 [..., K], float32 scale [..., 1]); twin: reference.quantize_per_token."""
    return _launch(x)


def norm_quant(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, kind: str = "layernorm",
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm/RMSNorm of x (+ residual, added first) + token-wise INT8 in one pass -> (y, q, scale);
    twin: reference.norm_quant."""
    return _launch(x, norm=NORMS[kind], weight=weight, bias=bias, eps=eps, residual=residual, write_y=True)


def norm_quant_only(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, kind: str = "layernorm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """As norm_quant without writing y: for norms whose only consumers are quantized linears."""
    return _launch(x, norm=NORMS[kind], weight=weight, bias=bias, eps=eps)


def act_quant(
    x: torch.Tensor, act: str | None, gate: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """act(x) [* gate] + token-wise INT8 in one pass -> (q, scale); twin: reference.act_quant."""
    return _launch(x, act=act, gate=gate)
