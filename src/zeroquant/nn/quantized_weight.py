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
    buffers are the storage. Progressive INT4 (row_scale set): `scale` holds integer group scales s2 and
    row_scale [N, 1] the float s1, with w = s1 * s2 * (q - z)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool
    row_scale: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.bits <= 4 else 1)

    def ints(self) -> torch.Tensor:
        """The integers [N, K], unpacked."""
        return Q.unpack_int4(self.qweight, self.symmetric) if self.bits <= 4 else self.qweight

    def group_scale(self) -> torch.Tensor:
        """The float scale of each group [N, G] (progressive: s1 * s2, exact in float32)."""
        return self.scale if self.row_scale is None else self.scale.float() * self.row_scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] the integers stand for."""
        scale = self.group_scale()
        zero = self.zero if self.zero is not None else torch.zeros_like(scale)
        return Q.dequantize_weight(self.ints(), scale, zero.float(), self.group_size).to(dtype)

    def int8(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
        """The integer reference's weight operands (w8, c, scale, group_size): int8 w8 [N, K] and per-group
        integer offsets c [N, G] (None if 0) with w ~= (w8 + c) * scale per group of group_size channels.
        Progressive INT4 is an INT8 weight with one scale per row: w8 = s2 * (q - z), scale s1."""
        q, k = self.ints(), self.in_features
        if self.row_scale is not None:
            w8 = Q.expand_groups(self.scale.to(torch.int16), k, self.group_size) * (
                q.to(torch.int16) - Q.expand_groups(self.zero.to(torch.int16), k, self.group_size))
            return w8.to(torch.int8), None, self.row_scale, k
        if self.zero is None:
            return q, None, self.scale, self.group_size
        z = self.zero.to(torch.int16)
        if self.bits <= 7:  # q - z fits int8 exactly
            w8 = (q.to(torch.int16) - Q.expand_groups(z, k, self.group_size)).to(torch.int8)
            return w8, None, self.scale, self.group_size
        return (q.to(torch.int16) - 128).to(torch.int8), (128 - z).to(torch.int32), self.scale, self.group_size

    def kernel(self) -> KernelWeight:
        """The kernels' layout of this weight (views of the same storage)."""
        return KernelWeight.from_quant(self.qweight, self.scale, self.zero, self.bits, self.group_size,
                                       row_scale=self.row_scale)

    def nbytes(self) -> int:
        parts = (self.qweight, self.scale, self.zero, self.row_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)
