"""QuantizedWeight: a quantized weight as QuantLinear stores it, and the views each backend reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeroquant.core import quant as Q
from zeroquant.kernels.weight_format import KernelWeight


@dataclass(frozen=True)
class QuantizedWeight:
    """Integers (INT4 packed two to a byte), group scales and zero points ([N, G], stored G-major), bit width,
    input channels per group (the last group may be shorter) and symmetry. Views, not copies: QuantLinear's
    buffers are the storage."""

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.bits <= 4 else 1)

    def ints(self) -> torch.Tensor:
        """The integers [N, K], unpacked."""
        return Q.unpack_int4(self.qweight, self.symmetric) if self.bits <= 4 else self.qweight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] the integers stand for."""
        zero = self.zero if self.zero is not None else torch.zeros_like(self.scale)
        return Q.dequantize_weight(self.ints(), self.scale, zero, self.group_size).to(dtype)

    def int8(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """int8 weight w8 [N, K] and per-group integer offsets c [N, G] (None if 0) with w ~= (w8 + c) * scale:
        the integer reference's operands."""
        q = self.ints()
        if self.zero is None:
            return q, None
        z = self.zero.to(torch.int16)
        if self.bits <= 7:  # q - z fits int8 exactly
            return (q.to(torch.int16) - Q.expand_groups(z, self.in_features, self.group_size)).to(torch.int8), None
        return (q.to(torch.int16) - 128).to(torch.int8), (128 - z).to(torch.int32)

    def kernel(self) -> KernelWeight:
        """The kernels' layout of this weight (views of the same storage)."""
        return KernelWeight.from_quant(self.qweight, self.scale, self.zero, self.bits, self.group_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)
