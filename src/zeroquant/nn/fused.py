"""The fused modules a quantized model runs with (placed by zeroquant.models.fusion, which knows where): a norm
that hands its INT8 copy and packed GEMM outputs to the linears it feeds, an MLP activation fused into the next
linear's quantization, a gated MLP's activation and product fused into one kernel, a post-LN residual add fused
into its norm. Each computes exactly what the modules it replaces compute on the reference path, and keeps
their parameters under the same names."""

from __future__ import annotations

import torch
from torch import nn

from zeroquant.kernels import ops, reference
from zeroquant.nn import packing
from zeroquant.nn.handoff import QuantizedActivation
from zeroquant.nn.qlinear import QuantLinear


def inference(x: torch.Tensor) -> bool:
    """Whether x flows without autograd: the fused kernels have no backward."""
    return not (torch.is_grad_enabled() and x.requires_grad)


class FusedNorm(nn.Module):
    """LayerNorm/RMSNorm that hands the QuantLinears it feeds what they would compute from its output, as one
    QuantizedActivation (zeroquant.nn.handoff): its token-wise INT8 copy, made in the norm's kernel, where they
    take INT8; and, where `pack` is set and they share a format (zeroquant.nn.packing), their outputs from one GEMM
    over their packed weights (a decoder's q/k/v: one GEMM instead of three).

    Same parameters under the same names as the norm it replaces. Only on the kernel path at inference;
    otherwise this is the reference norm.
    """

    def __init__(self, norm: nn.Module, kind: str, eps: float, consumers: list[QuantLinear], pack: bool) -> None:
        super().__init__()
        self.kind, self.eps, self.pack = kind, eps, pack
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None)
        # A tuple, not a ModuleList: the consumers belong to (and are saved with) their own parents.
        self.consumers = tuple(consumers)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x), or norm(x + residual) with the add inside the same kernel (ResidualNorm)."""
        if inference(x):
            int8 = any(c.takes_int8(x) for c in self.consumers)
            packed = self._packed(x)
            if int8 or packed is not None:
                if int8:
                    y, q, s = ops.norm_quant(x, self.weight, self.bias, self.eps, self.kind, residual)
                else:
                    y, q, s = self._norm(x, residual), None, None
                outs = None if packed is None else packed_linears(packed, list(self.consumers), y,
                                                                  None if q is None else (q, s))
                return QuantizedActivation(y, q, s, outputs=outs)
        return self._norm(x, residual)

    def _norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return reference.norm(x if residual is None else x + residual, self.weight, self.bias, self.eps, self.kind)

    def _packed(self, x: torch.Tensor) -> dict | None:
        return packing.cached_pack(self, list(self.consumers), x) if self.pack else None

    def _apply(self, fn, recurse=True):
        packing.drop_pack(self)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        how = ", packed" if self.pack else ""
        return f"{self.kind}, eps={self.eps}, feeds {len(self.consumers)} quantized linear(s){how}"


class FusedAct(nn.Module):
    """An MLP activation whose output feeds one INT8-activation linear: on CUDA, one row kernel reads the
    first linear's output, applies the activation, writes only its token-wise INT8 form, and hands that to
    the second linear. In the first GEMM's epilogue erf GELU stalls the tensor cores; here it adds a little
    to a pass the quantization needs anyway (docs/history.md, kernel choices).

    The float activation is never written: the adapter's mlp_act entry says the consumer is its only
    reader, so forward returns a QuantizedActivation holding only the INT8 form (zeroquant.nn.handoff); any
    other reader raises. Elsewhere (CPU, training) it computes the same activation in
    float32, as an epilogue would."""

    def __init__(self, name: str, consumer: QuantLinear) -> None:
        super().__init__()
        self.name = name
        self.consumer = (consumer,)  # a tuple: the consumer belongs to (and is saved with) its own parent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (c,) = self.consumer
        if inference(x) and c.takes_int8(x):
            q, s = ops.act_quant(x, self.name)
            return QuantizedActivation(None, q, s, dtype=x.dtype)
        # In float32 like the kernel (and like an epilogue activation): GPT-2's own gelu_new rounds to fp16
        # after every op, which the reference path must not add on top of quantization error.
        return reference.apply_act(x.float(), self.name).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.name}, quantized for the next linear"


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with its activation and product fused into a kernel on CUDA.

    Where `down` takes INT8, the activation, product and token-wise INT8 quantization for `down` run as one
    row kernel; the float product is never written. With `glu` (weight-only formats), gate and up run as one
    GEMM over their packed weights (zeroquant.nn.packing); for one token (decode at batch 1) that GEMM's
    epilogue applies the activation and the product (ops.gated_linear: one kernel instead of two GEMVs and
    an elementwise product), for more tokens the model's activation and product follow it.

    Holds the original MLP's gate/up/down linears and activation module under their own names (the adapter's), so
    parameter names do not change. `act` names the activation for the kernel (None: unknown to the
    kernels, so the model's own module applies it first).
    """

    def __init__(self, mlp: nn.Module, gate: str, up: str, down: str, act_module: str, act: str | None,
                 glu: bool = False) -> None:
        super().__init__()
        self.names, self.act, self.glu = (gate, up, down, act_module), act, glu
        for n in self.names:
            self.add_module(n, mlp.get_submodule(n))

    def _act(self, g: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.names[3])(g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names[:3])
        if self.glu and inference(x):
            packed = packing.cached_pack(self, [gate, up], x)
            if packed is not None:
                if x.shape[:-1].numel() == 1:
                    return down(ops.gated_linear(x, None, *_packed_weight(packed, gate), self.act, x.dtype,
                                                 row_scale=packed["w_row_scale"]))
                g, u = packed_linears(packed, [gate, up], x)  # one GEMM; the product outside (inductor fuses it)
                return down(self._act(g) * u)
        g, u = gate(x), up(x)
        if inference(x) and down.takes_int8(g):
            q, s = ops.act_quant(g if self.act else self._act(g), self.act, u)
            return down.forward_quantized(q, s, g.dtype)
        return down(self._act(g) * u)

    def _apply(self, fn, recurse=True):
        packing.drop_pack(self)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        if self.glu:
            return f"act={self.act}, {self.names[0]} and {self.names[1]} as one GEMM with the product in its epilogue"
        return f"act={self.act}, quantized with the product for {self.names[2]}"


class ResidualNorm(nn.Module):
    """A post-LN sublayer, norm(dropout(linear(h)) + residual) (BERT's BertSelfOutput and BertOutput),
    whose residual add runs in its FusedNorm's kernel: one pass over the tensor instead of an add kernel
    (read two, write one) before the norm. Holds the sublayer's own modules under their own names."""

    def __init__(self, sub: nn.Module, linear: str, dropout: str, norm: str) -> None:
        super().__init__()
        self.names = (linear, dropout, norm)
        for n, m in sub.named_children():
            self.add_module(n, m)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        linear, dropout, norm = (getattr(self, n) for n in self.names)
        return norm(dropout(linear(hidden_states)), residual=input_tensor)

    def extra_repr(self) -> str:
        return f"{self.names[2]}({self.names[1]}({self.names[0]}(h)) + residual), add fused into the norm"


def _packed_weight(packed: dict[str, torch.Tensor | None], first: QuantLinear) -> tuple:
    """The weight arguments of ops.quant_linear / ops.gated_linear for packed buffers (packing.packed_buffers):
    qweight, w_scale, w_zero, bits, group_size, bias; the row scales go as the ops' keyword row_scale."""
    zero = None if packed["w_zero"] is None else packed["w_zero"].t()
    return packed["qweight"], packed["w_scale"].t(), zero, first.wq.bits, first.group_size, packed["bias"]


def packed_linears(packed: dict[str, torch.Tensor | None], linears: list[QuantLinear], x: torch.Tensor,
                   int8: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Each linear's output from one kernel GEMM over their packed buffers (packing.packed_buffers): x [..., K],
    or its token-wise INT8 form `int8` where the caller already has it."""
    first = linears[0]
    q8, s = (x, None) if first.aq is None else (int8 or first.int8_input(x))
    y = ops.quant_linear(q8, s, *_packed_weight(packed, first), None, x.dtype, row_scale=packed["w_row_scale"])
    return list(y.split([m.out_features for m in linears], -1))
