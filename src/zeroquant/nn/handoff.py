"""A float activation that carries its token-wise INT8 copy to the quantized linears that read it.

A fused op (zeroquant.models.fusion: norm -> quant, activation -> quant) computes the INT8 form of its output in the
same kernel and returns a QuantizedActivation: to every other reader it is the float output (any torch
operation on it sees the plain tensor), while a QuantLinear that takes INT8 inputs reads `q` and `scale`
instead of quantizing the same values again. The data travels with the tensor, through the model's own code,
so nothing is kept on modules between calls and torch.compile traces it like any tensor subclass.

A norm whose linears run as one packed GEMM (zeroquant.nn.packing) hands over their outputs too: `outputs[i]` is
what the linear at packed_slot i returns for this input.

When the producer never wrote the float values (a fused activation whose only reader is the next linear),
`value` is None and any other use is an error: the model's code does not match its adapter entry.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from zeroquant.core.errors import ZeroQuantError


class QuantizedActivation(torch.Tensor):
    """The float tensor `value` [..., K] (or None, see the module docstring) with its token-wise INT8 copy `q`
    [..., K] and float32 scales `scale` [..., 1] (None where no linear reads INT8), and the outputs of the
    linears it feeds where they ran packed (else None)."""

    value: torch.Tensor | None
    q: torch.Tensor | None
    scale: torch.Tensor | None
    outputs: tuple[torch.Tensor, ...] | None

    @staticmethod
    def __new__(cls, value: torch.Tensor | None, q: torch.Tensor | None, scale: torch.Tensor | None,
                dtype: torch.dtype | None = None, outputs: tuple[torch.Tensor, ...] | None = None
                ) -> QuantizedActivation:
        like = value if value is not None else q
        return torch.Tensor._make_wrapper_subclass(
            cls, like.shape, strides=like.stride() if value is not None else None,
            dtype=dtype or like.dtype, device=like.device, requires_grad=False)

    def __init__(self, value: torch.Tensor | None, q: torch.Tensor | None, scale: torch.Tensor | None,
                 dtype: torch.dtype | None = None, outputs: tuple[torch.Tensor, ...] | None = None) -> None:
        self.value, self.q, self.scale = value, q, scale
        self.outputs = None if outputs is None else tuple(outputs)
        for i, t in enumerate(self.outputs or ()):
            setattr(self, f"out{i}", t)  # named attributes: what __tensor_flatten__ lists

    def __tensor_flatten__(self):
        names = [n for n in ("value", "q", "scale") if getattr(self, n) is not None]
        n_out = len(self.outputs or ())
        return names + [f"out{i}" for i in range(n_out)], (self.dtype, n_out)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        dtype, n_out = ctx
        outputs = tuple(inner[f"out{i}"] for i in range(n_out)) if n_out else None
        return QuantizedActivation(inner.get("value"), inner.get("q"), inner.get("scale"), dtype, outputs)

    def packed_output(self, slot: int, features: int) -> torch.Tensor | None:
        """The output of the linear at packed slot `slot` (with `features` outputs), or None where this tensor
        carries none (no packed GEMM ran, or an in-place operation changed the values since)."""
        if self.outputs is None or slot >= len(self.outputs) or self.outputs[slot].shape[-1] != features:
            return None
        return self.outputs[slot]

    def __repr__(self) -> str:
        return f"QuantizedActivation({self.value if self.value is not None else 'float values not written'})"

    def float_value(self) -> torch.Tensor:
        """The float tensor; raises where the producer did not write it."""
        if self.value is None:
            raise ZeroQuantError(
                "a fused activation computed only the INT8 input of its quantized linear, but another operation "
                "read its output: the model's code does not match its adapter's mlp_act entry "
                "(zeroquant.models.adapters)")
        return self.value

    def int8(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(q, scale), or None once an in-place operation changed the float values."""
        return None if self.q is None else (self.q, self.scale)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handed = [a for a in (*args, *kwargs.values()) if isinstance(a, QuantizedActivation)]
        plain = lambda t: t.float_value() if isinstance(t, QuantizedActivation) else t
        out = func(*tree_map(plain, args), **tree_map(plain, kwargs))
        if func._schema.is_mutable:
            for a in handed:  # the INT8 copy and the outputs no longer match the float values
                a.q = a.scale = a.outputs = None
        return out
