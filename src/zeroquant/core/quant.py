"""Linear quantization primitives: ranges, scales, quantize/dequantize, STE fake-quant, INT4 packing.

Conventions used everywhere in the package:
- symmetric: q in [-(2^(b-1) - 1), 2^(b-1) - 1] (the "restricted" range, so -q is representable), zero = 0.
- asymmetric: q in [0, 2^b - 1] with an integer zero point z; x ~= (q - z) * scale.
- weights are [N, K] (out, in); scales and zero points are [N, n_groups] float32, where a group is
  `group_size` consecutive input channels of one row, the last one shorter when group_size does not divide
  K (per-row = one group, per-tensor = one group with every row holding the same value).
- activations are quantized per token (last dim) at run time, or per tensor with static calibration.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range (inclusive) for `bits` bits."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return -m, m
    return 0, 2**bits - 1


def storage_dtype(bits: int, symmetric: bool) -> torch.dtype:
    """Narrowest torch integer dtype that holds the quantized values (before any packing)."""
    return torch.int8 if symmetric else torch.uint8


def scale_zero_from_range(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (both float32, zero integer-valued) that map [x_min, x_max] onto the q range."""
    qmin, qmax = qrange(bits, symmetric)
    x_min = x_min.float()
    x_max = x_max.float()
    if symmetric:
        amax = torch.maximum(x_min.abs(), x_max.abs())
        scale = amax.clamp_min(EPS) / qmax
        return scale, torch.zeros_like(scale)
    # The range must contain 0 so that zero padding / exact zeros stay exact.
    x_min = x_min.clamp_max(0)
    x_max = x_max.clamp_min(0)
    scale = (x_max - x_min).clamp_min(EPS) / (qmax - qmin)
    zero = (qmin - x_min / scale).round().clamp(qmin, qmax)
    return scale, zero


def stored_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight scale as it will be stored in `dtype`, returned as float32: quantizing with the stored value
    keeps the integers consistent with it. float16 is kept at or above its smallest normal number, so a
    degenerate group (all zeros: scale EPS) never stores 0 and no group loses precision to subnormals."""
    if dtype == torch.float32:
        return scale.float()
    return scale.float().clamp_min(torch.finfo(dtype).tiny).to(dtype).float()


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest quantization; returns integers in the storage dtype."""
    qmin, qmax = qrange(bits, symmetric)
    q = torch.round(x.float() / scale) + zero
    return q.clamp(qmin, qmax).to(storage_dtype(bits, symmetric))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize with the straight-through estimator.

    Gradients reach `x` (zero outside the clamp range), `scale` and `zero` when they require grad (LSQ-style),
    and `offset`, a learned shift of each value before rounding (AutoRound's rounding offsets), all of
    which layer-wise distillation can train.
    """
    return ((fake_quantize_int(x, scale, zero, bits, symmetric, offset) - zero) * scale).to(x.dtype)


def fake_quantize_int(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """The integers of `fake_quantize` (as floats, straight-through gradients)."""
    qmin, qmax = qrange(bits, symmetric)
    v = x / scale if offset is None else x / scale + offset
    return torch.clamp(round_ste(v) + zero, qmin, qmax)


# ---------------------------------------------------------------------------------------------- weights


def group_len(in_features: int, group_size: int) -> int:
    """Input channels per group: `group_size`, or the whole row when it is <= 0 or >= in_features."""
    return in_features if group_size <= 0 or group_size >= in_features else group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row. When group_size does not divide in_features the last group is shorter (576 channels
    in groups of 128: four of 128 and one of 64), as GPTQ implementations do, so every real size quantizes."""
    return -(-in_features // group_len(in_features, group_size))


def weight_scale_zero(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, per_tensor: bool = False,
    progressive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales/zero points for an [N, K] weight: [N, n_groups] each (progressive: the effective s1 * s2 of
    progressive_scale_zero)."""
    if progressive:
        return progressive_scale_zero(w, group_size)[:2]
    n, k = w.shape
    if per_tensor:
        s, z = scale_zero_from_range(w.min(), w.max(), bits, symmetric)
        return s.expand(n, 1).contiguous(), z.expand(n, 1).contiguous()
    gs = group_len(k, group_size)
    g = num_groups(k, gs)
    wf = w.float()
    if g * gs > k:  # a short last group: pad it with copies of its own last column (same min and max)
        wf = torch.cat([wf, wf[:, -1:].expand(n, g * gs - k)], dim=1)
    wg = wf.reshape(n, g, gs)
    return scale_zero_from_range(wg.amin(-1), wg.amax(-1), bits, symmetric)


PROTECT = 119  # progressive INT4: rows are brought to [-PROTECT, PROTECT] before their groups take integer scales


def progressive_row_scale(w: torch.Tensor) -> torch.Tensor:
    """The float row scale s1 [N, 1] of progressive INT4 (see progressive_scale_zero), float16-representable."""
    return stored_scale(w.float().abs().amax(1, keepdim=True).clamp_min(EPS) / PROTECT, torch.float16)


def progressive_zero_range(s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero points z (lowest, highest) of a progressive group with integer scale s2 for which every level
    s2 * (q - z), q in 0..15, lies in int8 [-128, 127]: a group whose z is outside cannot be an INT8 weight."""
    return (15 - 127 / s2).ceil().clamp_min(0), (128 / s2).floor().clamp_max(15)


def progressive_fits(s2: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether every group's levels lie in int8 (progressive_zero_range) and 1 <= s2 <= 16."""
    lo, hi = progressive_zero_range(s2)
    return bool(((s2 >= 1) & (s2 <= 16) & (z >= lo) & (z <= hi)).all())


def progressive_group(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer scales s2 and UINT4 zero points z [...] of groups wg [..., gs] given in row-scale units.

    An integer s2 cannot follow a group's range closely (a group spanning a tenth of its row gets s2 = 2
    where 1.6 would fit), so each group takes, of the smallest s2 that covers its range and the two below
    it (which clip its extremes), the one with the least squared error. s2 <= 16 and z is kept where every
    level of the group, s2 * (q - z) for q in 0..15, lies in [-128, 127]: the INT8 weight can never
    overflow, whatever values (GPTQ's updated ones, say) are rounded onto the grid."""
    lo = wg.amin(-1).clamp_max(0)
    cover = ((wg.amax(-1).clamp_min(0) - lo) / 15).ceil().clamp(1, 16)
    best = s2 = z = None
    for step in (0, 1, 2):
        c = (cover - step).clamp_min(1)
        zlo, zhi = progressive_zero_range(c)
        zc = torch.minimum(torch.maximum((-lo / c).round(), zlo), zhi)
        w8 = c[..., None] * (((wg / c[..., None]).round() + zc[..., None]).clamp(0, 15) - zc[..., None])
        err = (w8 - wg).square().sum(-1)
        take = torch.ones_like(err, dtype=torch.bool) if best is None else err < best
        best = err if best is None else torch.where(take, err, best)
        s2 = c if s2 is None else torch.where(take, c, s2)
        z = zc if z is None else torch.where(take, zc, z)
    return s2, z


def progressive_scale_zero(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    """Two-level INT4 scales for an [N, K] weight (QServe's progressive group quantization): a float row scale
    s1 [N, 1] and integer group scales s2 [N, G] with UINT4 zero points z [N, G], so that s2 * (q - z) is an
    INT8 weight and a W4A8 GEMM runs its whole K loop in integers: w ~= s1 * s2 * (q - z).

    Returns (s1 * s2, z, s1, s2): the first two are an ordinary group scale and zero point (exact in float32:
    11 significant bits times at most 5), the last two the factors a kernel reads."""
    n, k = w.shape
    s1 = progressive_row_scale(w)
    gs = group_len(k, group_size)
    g = num_groups(k, gs)
    wf = w.float()
    if g * gs > k:  # a short last group: copies of its last column change neither its range nor its best s2
        wf = torch.cat([wf, wf[:, -1:].expand(n, g * gs - k)], dim=1)
    s2, z = progressive_group(wf.reshape(n, g, gs) / s1[:, :, None])
    return s1 * s2, z, s1, s2


def expand_groups(t: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[N, n_groups] -> [N, K] by repeating each group's value over its channels (the last group may be
    shorter). One column means one group for the whole row, whatever group_size says."""
    gs = in_features if t.shape[1] == 1 else group_len(in_features, group_size)
    return t.repeat_interleave(gs, dim=1)[:, :in_features]


def group_slices(in_features: int, group_size: int, n_groups: int) -> list[slice]:
    """The input-channel slice of each of a row's n_groups groups."""
    gs = in_features if n_groups == 1 else group_len(in_features, group_size)
    return [slice(i * gs, min((i + 1) * gs, in_features)) for i in range(n_groups)]


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, per_tensor: bool = False,
    progressive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise RTN quantization of an [N, K] weight -> (q [N, K], scale [N, G], zero [N, G])."""
    scale, zero = weight_scale_zero(w, bits, group_size, symmetric, per_tensor, progressive)
    k = w.shape[1]
    q = quantize(w, expand_groups(scale, k, group_size), expand_groups(zero, k, group_size), bits, symmetric)
    return q, scale, zero


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    k = q.shape[1]
    return dequantize(q, expand_groups(scale, k, group_size), expand_groups(zero, k, group_size))


# ------------------------------------------------------------------------------------------ activations


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization over the last dim -> (int8 q, float32 scale [..., 1])."""
    _, qmax = qrange(bits, True)
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(EPS) / qmax
    q = torch.round(x.float() / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def fake_quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """STE fake-quant with a per-token scale (the scale itself is not differentiated through)."""
    _, qmax = qrange(bits, True)
    scale = (x.detach().float().abs().amax(dim=-1, keepdim=True).clamp_min(EPS) / qmax).to(x.dtype)
    return fake_quantize(x, scale, torch.zeros_like(scale), bits, True)


# ---------------------------------------------------------------------------------------------- packing


INT4_CHUNK = 64  # channels per half-split chunk of the INT4 storage layout


def _chunks(k: int) -> list[tuple[int, int]]:
    """(start, size) of the half-split chunks of a row of k channels: whole INT4_CHUNKs, then the rest."""
    full = k - k % INT4_CHUNK
    out = [(s, INT4_CHUNK) for s in range(0, full, INT4_CHUNK)]
    return out + ([(full, k - full)] if k > full else [])


def pack_int4(q: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Pack 4-bit values two per byte along the last dim, half-split within chunks of 64 channels.

    In a chunk of c channels (64, or what is left at the end of the row), byte j holds channel j in its
    low nibble and channel j + c/2 in its high nibble. This is the layout the GPU kernels read, so the
    stored weight is used as is: a nibble mask gives each half, and each half multiplies a contiguous
    slice of the activations. Symmetric values (-7..7) are stored offset by +8 so every nibble is unsigned.
    """
    k = q.shape[-1]
    if k % 2:
        raise ValueError("INT4 packing needs an even number of input channels")
    u = q.to(torch.int16) + (8 if symmetric else 0)
    parts = []
    for s, c in _chunks(k):
        h = c // 2
        parts.append(u[..., s:s + h] | (u[..., s + h:s + c] << 4))
    return torch.cat(parts, dim=-1).to(torch.uint8)


def unpack_int4(p: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Inverse of pack_int4."""
    p16 = p.to(torch.int16)
    lo, hi = p16 & 0xF, (p16 >> 4) & 0xF
    parts = []
    for s, c in _chunks(p.shape[-1] * 2):
        b = slice(s // 2, (s + c) // 2)
        parts += [lo[..., b], hi[..., b]]
    u = torch.cat(parts, dim=-1)
    if symmetric:
        return (u - 8).to(torch.int8)
    return u.to(torch.uint8)


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer a [M, K] @ b[N, K]^T -> int32 [M, N].

    int8 x int8 goes through torch._int_mm (int32 accumulation, like the tensor-core kernels) where the
    backend accepts the shape; other integer inputs (zero-point-shifted values) use int32 matmul on
    CPU, or float64 on GPU, which is exact for |sum| < 2^53.
    """
    if a.dtype == torch.int8 and b.dtype == torch.int8:
        m, k = a.shape
        n = b.shape[0]
        if a.device.type == "cpu":
            return torch._int_mm(a.contiguous(), b.t().contiguous())
        if m > 16 and k % 8 == 0 and n % 8 == 0:
            try:
                return torch._int_mm(a.contiguous(), b.t().contiguous())
            except RuntimeError:  # cuBLASLt has no int8 kernel for some shapes; the float64 product is exact too
                pass
    if a.device.type == "cpu":
        return a.to(torch.int32) @ b.to(torch.int32).t()
    return (a.double() @ b.double().t()).round().to(torch.int32)
