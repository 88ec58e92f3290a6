"""The weight format the GEMM kernels read (KernelWeight), and which formats they take.

Pure PyTorch: QuantLinear asks whether its format runs on the kernels without importing Triton.
Scales and zero points are read as [G, N], so one program's loads of a group's scales are contiguous;
QuantLinear stores its [N, G] scale buffers G-major, so `KernelWeight.from_quant` copies nothing. Float16 INT4
scales and zero points are interleaved (`interleave`): one [G, N, 2] allocation, each row's scale and zero point
side by side, so a kernel reads both as one 4-byte word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeroquant.core import quant as Q

# INT4 channels per half-split chunk: the storage layout of zeroquant.core.quant.pack_int4 (byte j of a chunk =
# channel j | channel j + PACK/2 << 4), read as stored. Unpacking is two nibble masks with no register
# shuffle, and each half feeds its own dot against a contiguous slice of the activations.
PACK = Q.INT4_CHUNK

# The Gluon small-M kernel (skinny_mma) relabels the channels of each 128-channel step so that a thread's
# unpacked weights are its MMA operand registers (why: that module's docstring). Its A operand starts as the
# unpacked nibbles [rows, t1, t0, w1, w0, q, p, h] (word 4t + w of a row's 16, byte 2p + q of the word, h: the
# high nibble), its B operand as the tokens' stored channels [tokens, t1, h, t0, w1, w0, p, q]; these
# permutations bring both to the operand's column order (w1 w0 h p t1 t0 q), B with the tokens last.
MMA_A_ORDER = (0, 3, 4, 7, 6, 1, 2, 5)
MMA_B_ORDER = (4, 5, 2, 6, 1, 3, 7, 0)


@dataclass(frozen=True)
class KernelWeight:
    """A quantized weight in the layout the GEMM kernel reads."""

    qweight: torch.Tensor  # int8 [N, K] (bits 8, symmetric) or uint8 [N, K/2] packed by quant.pack_int4
    scale: torch.Tensor  # float32 or float16 [G, N] (the rule's scale_dtype; kernels compute in float32)
    zero: torch.Tensor | None  # [G, N] like scale, integer-valued; None: symmetric
    bits: int
    in_features: int
    out_features: int
    group_size: int  # input channels per scale (in_features for one scale per row); the last group may be shorter
    # progressive INT4: float32 [N], the row scales s1; `scale` then holds the integer group scales s2 (int8)
    row_scale: torch.Tensor | None = None

    @property
    def sz_step(self) -> int:
        """Elements between one row's scale and the next: 2 where scales and zero points are interleaved."""
        return self.scale.stride(1)

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
        cls, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, bits: int, group_size: int,
        check: bool = True, row_scale: torch.Tensor | None = None,
    ) -> KernelWeight:
        """From QuantLinear storage: qweight as stored, w_scale / w_zero [N, G]; group_size as QuantLinear's.
        check=False skips the format check (the custom op: its caller checked the format once)."""
        n = qweight.shape[0]
        k = qweight.shape[1] * (2 if bits == 4 else 1)
        group_size = k if w_scale.shape[1] == 1 else group_size
        if check:
            why = cls.unsupported(k, bits, w_zero is None, group_size)
            if bits == 8 and qweight.dtype != torch.int8:
                why = "8-bit kernel weights must be int8"
            if why:
                raise ValueError(why)
        # No copies when QuantLinear's buffers are in place: its scales are stored [G, N]-major already, float16
        # INT4 ones interleaved with their zero points.
        scale, zero = _stored(w_scale).t(), None if w_zero is None else _stored(w_zero).t()
        if not (interleaved(scale, zero) and scale.stride(0) == 2 * n):
            scale, zero = scale.contiguous(), None if zero is None else zero.contiguous()
        rows = None if row_scale is None else row_scale.reshape(-1).float().contiguous()
        return cls(qweight.contiguous(), scale, zero, bits, k, n, group_size, rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)


def interleavable(bits: int, scale_dtype: torch.dtype, symmetric: bool, int8_tokens: bool) -> bool:
    """Whether a weight format's scales and zero points are stored interleaved: INT4 with float16 zero points
    against INT8 tokens. Half-precision tokens keep separate buffers: on interleaved ones their decode was no
    faster end to end (docs/kernels.md)."""
    return bits == 4 and scale_dtype == torch.float16 and not symmetric and int8_tokens


def interleave(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of [G, N] float16 scale and zero as the two halves of one [G, N, 2] allocation.

    Why: the small-M INT4 kernel then reads a row's scale and zero point as one 4-byte word, which Triton's
    pipeliner prefetches (cp.async) stages ahead; two 2-byte loads it issues in the step and waits for
    (docs/kernels.md). Same bytes as two [G, N] buffers."""
    base = torch.stack((scale, zero), -1)
    return base[..., 0], base[..., 1]


def interleaved(scale: torch.Tensor, zero: torch.Tensor | None) -> bool:
    """Whether [G, N] views scale and zero are the halves of one float16 [G, N', 2] allocation (N' >= N), each
    pair a 4-byte-aligned word."""
    return (zero is not None and scale.dtype == zero.dtype == torch.float16 and scale.stride(1) == zero.stride(1) == 2
            and scale.stride(0) == zero.stride(0) and zero.data_ptr() == scale.data_ptr() + 2
            and scale.data_ptr() % 4 == 0)


def _stored(t: torch.Tensor) -> torch.Tensor:
    """Scales and zero points as the kernels read them: float16, float32 or int8 (progressive INT4's integer
    group scales and their zero points) as stored, anything else float32."""
    return t if t.dtype in (torch.float16, torch.float32, torch.int8) else t.float()
