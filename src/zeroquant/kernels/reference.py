"""Pure-PyTorch twins of every Triton kernel: same signatures, same numbers up to float rounding.

They are built from `zeroquant.core.quant`, the package's single definition of the number formats, so a
kernel that matches its twin matches the QuantLinear reference path (see tests/kernels and tests/gpu).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeroquant.core import quant as Q


def apply_act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act is None:
        return y
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "relu":
        return F.relu(y)
    if act == "silu":
        return F.silu(y)
    raise ValueError(f"unsupported fused activation {act!r}")


def apply_act_(y: torch.Tensor, act: str | None) -> torch.Tensor:
    """apply_act in place on a 16-bit y, rounded once as apply_act(y.float()) is (PyTorch computes these in float32
    for 16-bit tensors; gelu_tanh's tanh may differ below 1e-6 in the far negative tail). One pass over y where the
    float32 round trip made three, over twice the bytes."""
    if act == "relu":
        return torch.relu_(y)
    if act == "silu":
        return F.silu(y, inplace=True)
    if act in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_(y, approximate="tanh" if act == "gelu_tanh" else "none")
    return apply_act(y, act)  # None, or the one-line error


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 [..., K], float32 scale [..., 1]), symmetric, scale = amax / 127."""
    return Q.quantize_per_token(x, 8)


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, kind: str) -> torch.Tensor:
    """LayerNorm (torch's) or RMSNorm (as Hugging Face's Llama computes it) in x's dtype."""
    if kind == "layernorm":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    if kind == "rmsnorm":
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    raise ValueError(f"unknown norm kind {kind!r}")


def norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    kind: str = "layernorm",
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm or RMSNorm of x (+ residual, added first) in x's dtype, then token-wise INT8 -> (y, q, scale)."""
    y = norm(x if residual is None else x + residual, weight, bias, eps, kind)
    q, s = quantize_per_token(y)
    return y, q, s


def act_quant(
    x: torch.Tensor, act: str | None, gate: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """act(x) (times `gate`'s partner for gated MLPs: act(x) * gate) then token-wise INT8 -> (q, scale)."""
    y = apply_act(x, act)
    if gate is not None:
        y = y * gate
    return quantize_per_token(y.to(x.dtype))


def int_weight(qweight: torch.Tensor, w_zero: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Zero-shifted integer weight [N, K] (float64, exact) from kernel-format storage.

    bits=8: int8 [N, K], symmetric (w_zero None).  bits=4: uint8 [N, K/2] packed by quant.pack_int4; values
    are q - w_zero when w_zero is given, else q - 8 (the symmetric offset). group_size: input channels per
    zero point (the last group may be shorter).
    """
    if bits == 4:
        q = Q.unpack_int4(qweight, symmetric=False).double()  # raw nibbles 0..15
    else:
        q = qweight.double()
    k = q.shape[1]
    if w_zero is not None:
        return q - Q.expand_groups(w_zero, k, group_size).double()
    return q - 8.0 if bits == 4 else q


def dequantize_weight(
    qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Float32 [N, K] weight: int_weight times the group scales."""
    q = int_weight(qweight, w_zero, bits, group_size)
    return q.float() * Q.expand_groups(w_scale, q.shape[1], group_size)


def unpacked_weight(qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """INT4 kernel-format storage as one [N, K] tensor (twin of triton/unpack.unpack_int4): int8 s2 * (q - z) for
    progressive weights (w_scale holding s2), else the weight dequantized as quant_linear rounds it for 16-bit
    tokens (progressive: (q - z) times s1 * s2 in float32)."""
    if dtype == torch.int8:
        k = qweight.shape[1] * 2
        return (int_weight(qweight, w_zero, 4, group_size) * Q.expand_groups(w_scale.double(), k, group_size)).to(dtype)
    if row_scale is not None:
        w_scale = w_scale.float() * row_scale.reshape(-1, 1).float()
    return dequantize_weight(qweight, w_scale, w_zero, 4, group_size).to(dtype)


def quant_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    act: str | None = None,
    out_dtype: torch.dtype = torch.float16,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = act((x [* x_scale]) @ dequant(W)^T + bias).

    x int8 with per-token x_scale [M, 1] (W8A8 / W4A8), or fp16/bf16 with x_scale None (W8A16 / W4A16);
    group_size: input channels per weight scale (KernelWeight.group_size).
    Integer inputs are multiplied exactly per weight group (float64 holds every int32 sum), then scaled,
    which is what the kernels do in int32 on tensor cores. row_scale [N, 1]: progressive INT4, w_scale
    holding integer group scales s2: INT8 weights s2 * (q - z), one float scale a row.
    """
    if row_scale is not None and x_scale is not None:
        w8 = unpacked_weight(qweight, w_scale, w_zero, group_size, torch.int8)
        return int_linear(x, x_scale, None, w8, None, row_scale.reshape(-1, 1).float(), x.shape[1], bias, act,
                          out_dtype)
    if row_scale is not None:  # 16-bit tokens: s1 * s2 is the group's float scale, exact in float32
        w_scale = w_scale.float() * row_scale.reshape(-1, 1).float()
    if x_scale is not None:
        if bits == 8 and w_zero is not None:
            raise ValueError("the kernels take symmetric INT8 weights only")
        w8 = int_weight(qweight, w_zero, bits, group_size).to(torch.int8)
        return int_linear(x, x_scale, None, w8, None, w_scale, group_size, bias, act, out_dtype)
    y = x.float() @ dequantize_weight(qweight, w_scale, w_zero, bits, group_size).to(x.dtype).float().t()
    if bias is not None:
        y = y + bias.float()
    return apply_act(y, act).to(out_dtype)


def int_linear(x8: torch.Tensor, x_scale: torch.Tensor, x_offset: torch.Tensor | None, w8: torch.Tensor,
               w_offset: torch.Tensor | None, w_scale: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
               act: str | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The integer reference: act(sum over groups g of ((x8 + cx) . (w8 + cw_g)) * w_scale_g, times x_scale, plus
    bias), each group's sum exact in int32, then float32 as the kernels' epilogues compute it.

    x8 int8 [M, K] with scale [M, 1] (per token) or [] and an optional int32 offset cx (asymmetric static
    activations); w8 int8 [N, K] with optional int32 per-group offsets cw [N, G] (asymmetric 8-bit weights);
    w_scale [N, G]. QuantLinear's integer path and the kernels' twin (quant_linear) both come here.
    """
    k = x8.shape[1]
    y = None
    for g, sl in enumerate(Q.group_slices(k, group_size, w_scale.shape[1])):
        # sum_k (x8 + cx)(w8 + cw) = x8.w8 + cw * sum x8 + cx * sum w8 + K * cx * cw, all exact in int32
        acc = Q.int_matmul(x8[:, sl], w8[:, sl])
        if w_offset is not None:
            acc += x8[:, sl].sum(1, keepdim=True, dtype=torch.int32) * w_offset[:, g]
        if x_offset is not None:
            acc += x_offset * w8[:, sl].sum(1, dtype=torch.int32)
            if w_offset is not None:
                acc += (sl.stop - sl.start) * x_offset * w_offset[:, g]
        part = acc.float() * w_scale[:, g]
        y = part if y is None else y + part
    y = y * x_scale
    if bias is not None:
        y = y + bias.float()
    return apply_act(y, act).to(out_dtype)


def gated_linear(x: torch.Tensor, x_scale: torch.Tensor | None, qweight: torch.Tensor, w_scale: torch.Tensor,
                 w_zero: torch.Tensor | None, bits: int, group_size: int, bias: torch.Tensor | None, act: str | None,
                 out_dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A gated MLP's act(gate) * up from one weight holding the gate rows, then the up rows: [M, N / 2], the
    product in float32 from the float32 sums, as the GEMV's epilogue computes it."""
    return glu(quant_linear(x, x_scale, qweight, w_scale, w_zero, bits, group_size, bias, None, torch.float32,
                            row_scale=row_scale), act, out_dtype)


def glu(y: torch.Tensor, act: str | None, out_dtype: torch.dtype) -> torch.Tensor:
    """act(gate) * up in float32 from y [..., 2H], the gate projection's outputs then the up projection's
    (zeroquant.nn.packing's order): [..., H] in out_dtype."""
    gate, up = y.float().chunk(2, -1)
    return (apply_act(gate, act) * up).to(out_dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in float32, returned in q's dtype; mask None, bool (True = attend) or
    additive float, broadcastable to [B, H, Sq, Sk]. Rows with every key masked give zeros. k/v may have
    fewer heads than q (grouped heads): query head h reads head h // (H / HK)."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(rep, dim=1) if rep > 1 else t for t in (k, v))
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v.float()).to(q.dtype)
