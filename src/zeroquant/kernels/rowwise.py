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

from ..quant import EPS
from . import act_code

NORM_NONE = 0
NORMS = {"layernorm": 1, "rmsnorm": 2}


@triton.jit
def erf(x):
    """erf to 6e-7 absolute (Abramowitz & Stegun 7.1.26): one reciprocal, one exp2 and five FMAs, against
    libdevice's two polynomials and their selects. GELU + token quant on 4096 x 4096 (H100): 26.8 vs 31.9 us,
    the same int8 values as the reference in all but 3e-6 of elements (by 1), as with libdevice."""
    a = tl.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    p = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    r = 1.0 - p * tl.exp2(-a * a * 1.4426950408889634)
    return tl.where(x < 0, -r, r)


@triton.jit
def apply_act(y, ACT: tl.constexpr):
    if ACT == 1:  # gelu (erf)
        y = 0.5 * y * (1.0 + erf(y * 0.7071067811865476))
    elif ACT == 2:  # gelu, tanh approximation (GPT-2's gelu_new)
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))  # tanh(u)
    elif ACT == 3:
        y = tl.maximum(y, 0.0)
    elif ACT == 4:  # silu
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _row_quant_kernel(
    x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, q_ptr, s_ptr,
    K, stride_x, stride_r, stride_g, stride_y, stride_q, eps, qeps,
    NORM: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_Y: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    out_ty = x.dtype
    y = x.to(tl.float32)
    if HAS_RES:  # the residual add before a post-LN norm, rounded to the model dtype as torch's add is
        y = (y + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(out_ty).to(tl.float32)
    if NORM == 1:
        mean = tl.sum(y, 0) / K
        d = tl.where(mask, y - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, 0) / K + eps)
        y = d * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    elif NORM == 2:
        rstd = tl.rsqrt(tl.sum(y * y, 0) / K + eps)
        # HF's RMSNorm rounds x * rstd to the model dtype before the weight multiply; so do we.
        y = (y * rstd).to(out_ty).to(tl.float32) * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = apply_act(y, ACT)
    if HAS_GATE:
        y = y.to(out_ty).to(tl.float32) * tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    y = y.to(out_ty)
    if WRITE_Y:
        tl.store(y_ptr + row * stride_y + cols, y, mask=mask)
    y = tl.where(mask, y.to(tl.float32), 0.0)
    # IEEE division (div_rn) for the scale, as torch does: Triton's default '/' is approximate and would
    # move ties. Per element, y / scale is y * (1 / scale) plus one FMA correction from the exact residual,
    # the correctly rounded quotient in all but rare last-ulp cases; div_rn per element made GELU + quant
    # on a 4096 x 4096 tile compute-bound (39 vs 34 us on H100).
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(y), 0), qeps), 127.0)
    inv = tl.math.div_rn(1.0, scale)
    t = y * inv
    t = tl.fma(tl.fma(-t, scale, y), inv, t)
    # Round half to even like torch.round: adding 1.5 * 2^23 leaves no fraction bits, so the float add
    # rounds; exact for |y / scale| <= 127.
    q = (t + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(q_ptr + row * stride_q + cols, q.to(tl.int8), mask=mask)
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
    # Activation rows of 4096 (no y store): 4 warps beat 8 (32 vs 39 us on H100, GELU 4096 x 4096); norms'
    # y stores and two reductions want more warps in flight.
    warps = max(1, min(16, block // (1024 if act else 512)))
    if m:
        _row_quant_kernel[(m,)](
            x2, r2, g2, weight if weight is not None else x2, bias if bias is not None else x2, y, q, s,
            k, x2.stride(0), r2.stride(0), g2.stride(0), y.stride(0), q.stride(0), eps, EPS,
            NORM=norm, ACT=act_code(act), HAS_RES=residual is not None, HAS_GATE=gate is not None,
            HAS_BIAS=bias is not None, WRITE_Y=write_y, BLOCK=block, num_warps=warps,
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
