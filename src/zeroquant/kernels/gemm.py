"""Quantized linear layers as one Triton GEMM with a fused dequantizing epilogue.

One kernel body, specialised by constexprs, covers the four weight/activation combinations:
- A_INT8 (W8A8, W4A8): int8 x int8 -> int32 on tensor cores. Per-channel weights keep one int32
  accumulator for the whole K loop; group-wise weights (group_size < K) convert each BLOCK_K partial
  product to float and multiply it by its group's scale (BLOCK_K divides group_size), so groups are
  accumulated in the K loop. The per-token activation scale, bias and activation come last.
- A16 (W8A16, W4A16): weights are dequantized in registers to the activation dtype and fed to an fp16/bf16
  tensor-core dot with float32 accumulation.
INT4 weights arrive packed two per byte (low nibble = even channel, the checkpoint format) and are
unpacked in registers, so only K/2 bytes per row leave memory.

Scales and zero points are stored transposed, [G, N], so one program's loads of a group's scales are
contiguous; `KernelWeight.from_quant` makes that layout once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import act_code
from .rowwise import apply_act


@dataclass(frozen=True)
class KernelWeight:
    """A quantized weight in the layout the GEMM kernel reads."""

    qweight: torch.Tensor  # int8 [N, K] (bits 8, symmetric) or uint8 [N, K/2] (bits 4)
    scale: torch.Tensor  # float32 [G, N]
    zero: torch.Tensor | None  # float32 [G, N], integer-valued; None: symmetric
    bits: int
    in_features: int
    out_features: int

    @property
    def group_size(self) -> int:
        return self.in_features // self.scale.shape[0]

    @classmethod
    def from_quant(
        cls, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, bits: int
    ) -> KernelWeight:
        """From QuantLinear storage: qweight as stored, w_scale / w_zero [N, G]."""
        if bits not in (4, 8):
            raise ValueError(f"kernels take 4- or 8-bit weights, got {bits}")
        if bits == 8 and (qweight.dtype != torch.int8 or w_zero is not None):
            raise ValueError("8-bit kernel weights must be symmetric int8")
        n = qweight.shape[0]
        k = qweight.shape[1] * (2 if bits == 4 else 1)
        zero = None if w_zero is None else w_zero.float().t().contiguous()
        return cls(qweight.contiguous(), w_scale.float().t().contiguous(), zero, bits, k, n)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)


def _m_bucket(m: int) -> int:
    return 16 if m <= 16 else 64 if m <= 64 else 128 if m <= 256 else 1024


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Decode (M <= 16) is bound by weight bytes: narrow N tiles so that every SM streams weights, deep pipelines.
# Prefill is bound by tensor-core throughput: large tiles, BLOCK_K 128 for int8 (64 suits fp16 better).
_CONFIGS = {
    16: [_cfg(16, 32, 128, 4, 4), _cfg(16, 64, 128, 4, 4), _cfg(16, 32, 256, 4, 3), _cfg(16, 64, 256, 4, 3),
         _cfg(16, 128, 128, 4, 4), _cfg(16, 16, 256, 2, 4)],
    64: [_cfg(64, 64, 128, 4, 4), _cfg(64, 128, 128, 4, 3), _cfg(64, 64, 64, 4, 4), _cfg(32, 64, 128, 4, 4)],
    128: [_cfg(128, 128, 128, 8, 3), _cfg(64, 128, 128, 4, 4), _cfg(128, 64, 128, 4, 4), _cfg(128, 128, 64, 4, 4)],
    1024: [_cfg(128, 128, 128, 8, 3), _cfg(128, 256, 128, 8, 3), _cfg(256, 128, 128, 8, 3), _cfg(128, 128, 64, 4, 4),
           _cfg(128, 256, 64, 8, 4), _cfg(128, 128, 128, 4, 4)],
}
_ALL = [c for cs in _CONFIGS.values() for c in cs]


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    bucket, gs = args["M_BUCKET"], args["group_size"]
    keep = [c for c in configs if c in _CONFIGS[bucket]]
    if args["GROUPED"]:  # a BLOCK_K step must stay inside one group
        keep = [c for c in keep if gs % c.kwargs["BLOCK_K"] == 0]
    return keep or [_cfg(16 if bucket == 16 else 64, 64, 32, 4, 2)]


@triton.autotune(
    configs=_ALL,
    key=["M_BUCKET", "N", "K", "group_size", "A_INT8", "W_BITS", "HAS_ZERO"],
    prune_configs_by={"early_config_prune": _prune},
    # Short timing runs: the ranking of configs is stable long before the default 100 ms.
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _qlinear_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, z_ptr, b_ptr, c_ptr,
    M, N, K, stride_am, stride_wn, stride_cm, group_size, M_BUCKET,
    A_INT8: tl.constexpr, W_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, GROUPED: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tile order: GROUP_M row-tiles share each column of weight tiles, so weights are reused from L2.
    GROUP_M: tl.constexpr = 8
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns load a valid row instead (wrapped); their results are never stored.
    rm = (offs_m % M).to(tl.int64)
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]
    if W_BITS == 4:
        KW: tl.constexpr = BLOCK_K // 2
    else:
        KW: tl.constexpr = BLOCK_K
    offs_kw = tl.arange(0, KW)
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + offs_kw[:, None]  # [KW, BLOCK_N], K-contiguous

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if A_INT8 and not GROUPED:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if not GROUPED:  # one scale (and zero) per output channel
        s = tl.load(s_ptr + rn)
        if HAS_ZERO:
            z = tl.load(z_ptr + rn)

    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0)
            w = tl.load(w_ptrs, mask=offs_kw[:, None] < (K - k0) // (BLOCK_K // KW), other=0)
        if GROUPED:
            g = k0 // group_size
            s = tl.load(s_ptr + g * N + rn)
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + rn)
        if W_BITS == 4:  # [K/2, N] bytes -> [K, N] nibbles, even channel from the low nibble
            w = tl.reshape(tl.permute(tl.join(w & 0xF, w >> 4), (0, 2, 1)), (BLOCK_K, BLOCK_N))
        if A_INT8:
            if W_BITS == 4:
                if HAS_ZERO:
                    wi = (w.to(tl.int32) - z.to(tl.int32)[None, :]).to(tl.int8)
                else:
                    wi = (w.to(tl.int32) - 8).to(tl.int8)
            else:
                wi = w
            if GROUPED:
                acc += tl.dot(a, wi, out_dtype=tl.int32).to(tl.float32) * s[None, :]
            else:
                acc_i = tl.dot(a, wi, acc_i, out_dtype=tl.int32)
        else:
            wf = w.to(tl.float32)
            if HAS_ZERO:
                wf = wf - z[None, :]
            elif W_BITS == 4:
                wf = wf - 8.0
            acc = tl.dot(a, (wf * s[None, :]).to(a.dtype), acc)
        a_ptrs += BLOCK_K
        w_ptrs += KW

    if A_INT8:
        if not GROUPED:
            acc = acc_i.to(tl.float32) * s[None, :]
        acc = acc * tl.load(as_ptr + rm)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    acc = apply_act(acc, ACT)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


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
    grouped = w.scale.shape[0] > 1
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _qlinear_kernel[grid](
        a, xs, w.qweight, w.scale, w.zero if w.zero is not None else w.scale, bias if bias is not None else c, c,
        m, n, k, a.stride(0), w.qweight.stride(0), c.stride(0), w.group_size, _m_bucket(m),
        A_INT8=a_int8, W_BITS=w.bits, HAS_ZERO=w.zero is not None, GROUPED=grouped,
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
