"""zeroquant's kernels as PyTorch custom ops (`torch.ops.zeroquant.*`), so torch.compile sees them.

Each op has three implementations: the Triton kernel on CUDA, its pure-PyTorch twin (kernels.reference) on
every other device, and a fake one that only says the outputs' shapes, dtypes and strides, which is all
dynamo and inductor need to trace through it. Dynamo never looks inside the Triton code (its kernel analysis
does not know the inline-asm helpers), and every op is functional: no input is written, so a compiled graph
may place it where it likes. The INT8 copy a fused op makes reaches its linears as a tensor
(zeroquant.nn.handoff), in eager and compiled models alike.
"""

from __future__ import annotations

import torch

from zeroquant.kernels import HAS_TRITON, reference

LIB = "zeroquant"


def _rows(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape[:-1])


def _cuda_kernel(op):
    """Register the decorated function as op's CUDA implementation where Triton exists; without Triton the
    op's default implementation, the reference twin, serves CUDA tensors too."""
    def register(fn):
        if HAS_TRITON:
            op.register_kernel("cuda")(fn)
        return fn
    return register


# ------------------------------------------------------------------------------ token-wise quantization


@torch.library.custom_op(f"{LIB}::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 [..., K], float32 scale [..., 1]), symmetric, scale = amax / 127."""
    q, s = reference.quantize_per_token(x)
    return q.contiguous(), s.contiguous()


@_cuda_kernel(quantize_per_token)
def _(x):
    from zeroquant.kernels.triton import rowwise

    return rowwise.quantize_per_token(x)


@quantize_per_token.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*_rows(x), 1), dtype=torch.float32)


@torch.library.custom_op(f"{LIB}::norm_quant", mutates_args=())
def norm_quant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, kind: str,
               residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm/RMSNorm of x (+ residual, added first) -> (y in x's dtype, its int8 [..., K], scale [..., 1])."""
    return tuple(t.contiguous() for t in reference.norm_quant(x, weight, bias, eps, kind, residual))


@_cuda_kernel(norm_quant)
def _(x, weight, bias, eps, kind, residual=None):
    from zeroquant.kernels.triton import rowwise

    return rowwise.norm_quant(x, weight, bias, eps, kind, residual=residual)


@norm_quant.register_fake
def _(x, weight, bias, eps, kind, residual=None):
    return (x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty((*_rows(x), 1), dtype=torch.float32))


@torch.library.custom_op(f"{LIB}::act_quant", mutates_args=())
def act_quant(x: torch.Tensor, act: str | None, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """act(x) [* gate] in x's dtype -> (int8 [..., K], float32 scale [..., 1]); the float result is not kept."""
    q, s = reference.act_quant(x, act, gate)
    return q.contiguous(), s.contiguous()


@_cuda_kernel(act_quant)
def _(x, act, gate=None):
    from zeroquant.kernels.triton import rowwise

    return rowwise.act_quant(x, act, gate=gate)


@act_quant.register_fake
def _(x, act, gate=None):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*_rows(x), 1), dtype=torch.float32)


# ------------------------------------------------------------------------------------ quantized linear


@torch.library.custom_op(f"{LIB}::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, x_scale: torch.Tensor | None, qweight: torch.Tensor, w_scale: torch.Tensor,
                 w_zero: torch.Tensor | None, bits: int, group_size: int, bias: torch.Tensor | None,
                 act: str | None, out_dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """act(x [* x_scale] @ dequant(W)^T + bias) -> [..., N] in out_dtype.

    x: int8 [..., K] with per-token float32 x_scale [..., 1], or fp16/bf16/fp32 with x_scale None (then
    out_dtype is x's dtype). qweight as QuantLinear stores it (int8 [N, K], or uint8 [N, K/2] for 4 bits);
    w_scale / w_zero [N, G] (QuantLinear's G-major buffers are read in place); group_size: channels per
    scale (K for one per row); row_scale [N, 1]: progressive INT4's float row scales (w_scale then holds the
    integer group scales)."""
    return _reference_rows(reference.quant_linear, x, x_scale, qweight, w_scale, w_zero, bits, group_size, bias, act,
                           out_dtype, row_scale)


def _reference_rows(fn, x, x_scale, *weight_args):
    """A linear's reference twin (fn: x [M, K], x_scale [M, 1] or None, then the op's other arguments) on the
    rows of x [..., K]."""
    xs = None if x_scale is None else x_scale.reshape(-1, 1)
    return fn(x.reshape(-1, x.shape[-1]), xs, *weight_args).reshape(*_rows(x), -1)


def _launch(x, x_scale, qweight, w_scale, w_zero, bits, group_size, bias, act, out_dtype, row_scale, glu):
    """The CUDA implementation of quant_linear and gated_linear: gemm.quant_linear on QuantLinear's buffers."""
    from zeroquant.kernels.triton.gemm import KernelWeight
    from zeroquant.kernels.triton.gemm import quant_linear as launch

    kw = KernelWeight.from_quant(qweight, w_scale, w_zero, bits, group_size, check=False, row_scale=row_scale)
    return launch(x, x_scale, kw, bias, act=act, out_dtype=out_dtype, glu=glu)


@_cuda_kernel(quant_linear)
def _(x, x_scale, qweight, w_scale, w_zero, bits, group_size, bias, act, out_dtype, row_scale=None):
    return _launch(x, x_scale, qweight, w_scale, w_zero, bits, group_size, bias, act, out_dtype, row_scale,
                   glu=False)


@quant_linear.register_fake
def _(x, x_scale, qweight, w_scale, w_zero, bits, group_size, bias, act, out_dtype, row_scale=None):
    return x.new_empty((*_rows(x), qweight.shape[0]), dtype=out_dtype)


@torch.library.custom_op(f"{LIB}::gated_linear", mutates_args=())
def gated_linear(x: torch.Tensor, x_scale: torch.Tensor | None, qweight: torch.Tensor, w_scale: torch.Tensor,
                 w_zero: torch.Tensor | None, bits: int, group_size: int, bias: torch.Tensor | None,
                 act: str | None, out_dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A gated MLP's act(x W_gate^T + b) * (x W_up^T + b) -> [..., N / 2] from one weight (arguments as
    quant_linear's) whose N rows are the gate projection's, then the up projection's (zeroquant.nn.packing)."""
    return _reference_rows(reference.gated_linear, x, x_scale, qweight, w_scale, w_zero, bits, group_size, bias,
                           act, out_dtype, row_scale)


@_cuda_kernel(gated_linear)
def _(x, x_scale, qweight, w_scale, w_zero, bits, group_size, bias, act, out_dtype, row_scale=None):
    return _launch(x, x_scale, qweight, w_scale, w_zero, bits, group_size, bias, act, out_dtype, row_scale,
                   glu=True)


@gated_linear.register_fake
def _(x, x_scale, qweight, w_scale, w_zero, bits, group_size, bias, act, out_dtype, row_scale=None):
    return x.new_empty((*_rows(x), qweight.shape[0] // 2), dtype=out_dtype)


# -------------------------------------------------------------------------------------- attention


def _attention_layout(o: torch.Tensor) -> torch.Tensor:
    """[B, H, Sq, D] as a transposed view of a [B, Sq, H, D] tensor: what the kernel writes, since the output
    projection reads that layout."""
    return o.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op(f"{LIB}::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, H, Sq, D], k/v [B, HK, Sk, D] (HK divides H: grouped heads);
    mask None, bool (True = attend) or additive float, broadcastable to [B, H, Sq, Sk]."""
    return _attention_layout(reference.attention(q, k, v, mask, scale))


@_cuda_kernel(attention)
def _(q, k, v, mask, scale):
    from zeroquant.kernels.triton import attention as attn

    return attn.attention(q, k, v, mask, scale)


@attention.register_fake
def _(q, k, v, mask, scale):
    b, h, sq, d = q.shape
    return q.new_empty((b, sq, h, d)).transpose(1, 2)
